//! TensorBoard event files of `dancegrpo train`, read back independently of
//! the library's hand-written encoder (TFRecord framing with both CRCs checked
//! through the `crc32c` crate, `tensorflow.Event` decoded by `prost` from
//! messages declared after TensorFlow's `.proto`s), compared with
//! `metrics.jsonl`, `eval.jsonl`, `config.toml` and the PNG grids; a resumed
//! run's new file and its `SessionLog START`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dancegrpo-tb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn train(out: &Path, extra: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
        .args(["train", "--threads", "1", "--out", out.to_str().unwrap()])
        .args([
            "--set",
            "run.checkpoint_every=2",
            "--set",
            "run.image_every=2",
        ])
        .args(["--set", "eval.every=2", "--set", "eval.prompts=2"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// TensorFlow's mask of a CRC-32C, as the TFRecord format describes it.
#[allow(clippy::manual_rotate)]
fn masked(crc: u32) -> u32 {
    ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
}

/// The payloads of a TFRecord file, both CRCs of every record checked.
fn records(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let (mut out, mut at) = (Vec::new(), 0usize);
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let crc = |b: &[u8]| masked(crc32c::crc32c(b));
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(u32_at(at + 8), crc(&bytes[at..at + 8]), "length crc");
        let payload = &bytes[at + 12..at + 12 + len];
        assert_eq!(u32_at(at + 12 + len), crc(payload), "payload crc");
        out.push(payload.to_vec());
        at += 12 + len + 4;
    }
    assert_eq!(at, bytes.len(), "{}: trailing bytes", path.display());
    out
}

/// TensorFlow's messages (`event.proto`, `summary.proto`, `tensor.proto`),
/// declared for `prost` with their field numbers: an independent decoder.
mod proto {
    /// `tensorflow.Event`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(string, optional, tag = "3")]
        pub file_version: Option<String>,
        #[prost(message, optional, tag = "5")]
        pub summary: Option<Summary>,
        #[prost(message, optional, tag = "7")]
        pub session_log: Option<SessionLog>,
    }
    /// `tensorflow.SessionLog`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionLog {
        #[prost(int32, tag = "1")]
        pub status: i32,
    }
    /// `tensorflow.Summary`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<Value>,
    }
    /// `tensorflow.Summary.Value`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(float, optional, tag = "2")]
        pub simple_value: Option<f32>,
        #[prost(message, optional, tag = "4")]
        pub image: Option<Image>,
        #[prost(message, optional, tag = "8")]
        pub tensor: Option<TensorProto>,
        #[prost(message, optional, tag = "9")]
        pub metadata: Option<SummaryMetadata>,
    }
    /// `tensorflow.Summary.Image`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(int32, tag = "1")]
        pub height: i32,
        #[prost(int32, tag = "2")]
        pub width: i32,
        #[prost(int32, tag = "3")]
        pub colorspace: i32,
        #[prost(bytes = "vec", tag = "4")]
        pub encoded_image_string: Vec<u8>,
    }
    /// `tensorflow.TensorProto` (the fields a string tensor uses).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int32, tag = "1")]
        pub dtype: i32,
        #[prost(message, optional, tag = "2")]
        pub tensor_shape: Option<TensorShapeProto>,
        #[prost(bytes = "vec", repeated, tag = "8")]
        pub string_val: Vec<Vec<u8>>,
    }
    /// `tensorflow.TensorShapeProto`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "2")]
        pub dim: Vec<Dim>,
    }
    /// `tensorflow.TensorShapeProto.Dim`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dim {
        #[prost(int64, tag = "1")]
        pub size: i64,
    }
    /// `tensorflow.SummaryMetadata`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SummaryMetadata {
        #[prost(message, optional, tag = "1")]
        pub plugin_data: Option<PluginData>,
    }
    /// `tensorflow.SummaryMetadata.PluginData`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginData {
        #[prost(string, tag = "1")]
        pub plugin_name: String,
    }
}

/// `(tag, height, width, PNG)` of an image summary.
type ImageSummary = (String, i32, i32, Vec<u8>);

/// What this test looks at in an `Event`.
#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    scalars: Vec<(String, f32)>,
    /// `(tag, height, width, PNG)`.
    images: Vec<ImageSummary>,
    /// `(tag, text)` of text-plugin summaries.
    texts: Vec<(String, String)>,
    session_status: Option<i32>,
}

fn decode_event(b: &[u8]) -> Event {
    use prost::Message;
    let e = proto::Event::decode(b).expect("a tensorflow.Event");
    let mut out = Event {
        wall_time: e.wall_time,
        step: e.step,
        file_version: e.file_version,
        session_status: e.session_log.map(|l| l.status),
        ..Event::default()
    };
    for v in e.summary.map(|s| s.value).unwrap_or_default() {
        match (v.simple_value, v.image, v.tensor) {
            (Some(x), None, None) => out.scalars.push((v.tag, x)),
            (None, Some(i), None) => {
                assert_eq!(i.colorspace, 3, "RGB");
                out.images
                    .push((v.tag, i.height, i.width, i.encoded_image_string));
            }
            (None, None, Some(t)) => {
                let plugin = v
                    .metadata
                    .and_then(|m| m.plugin_data)
                    .map(|p| p.plugin_name);
                assert_eq!(plugin.as_deref(), Some("text"));
                assert_eq!(t.dtype, 7, "DT_STRING");
                assert!(t.tensor_shape.is_some_and(|s| s.dim.is_empty()), "a scalar");
                let [text] = &t.string_val[..] else {
                    panic!("one string")
                };
                out.texts
                    .push((v.tag, String::from_utf8(text.clone()).unwrap()));
            }
            _ => panic!("a summary value of an unexpected kind: {}", v.tag),
        }
    }
    out
}

/// The event files of a run, in TensorBoard's (name) order.
fn event_files(run: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn events(path: &Path) -> Vec<Event> {
    records(path).iter().map(|r| decode_event(r)).collect()
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every tag an iteration writes, with its value in a `metrics.jsonl` line.
fn expected_scalars(m: &serde_json::Value) -> Vec<(String, f32)> {
    let f = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
    let mut want: Vec<(String, f32)> = [
        ("reward/mean", &m["reward_mean"]),
        ("reward/std", &m["reward_std"]),
        ("reward/failed", &m["failed_rewards"]),
        ("reward/skipped_groups", &m["skipped_groups"]),
        ("train/skipped_steps", &m["skipped_steps"]),
        (
            "reward/zero_variance_group_share",
            &m["zero_variance_group_share"],
        ),
        ("advantage/mean", &m["advantage"]["mean"]),
        ("advantage/std", &m["advantage"]["std"]),
        ("advantage/min", &m["advantage"]["min"]),
        ("advantage/max", &m["advantage"]["max"]),
        ("advantage/clamped", &m["clamped_advantages"]),
        ("train/loss", &m["loss"]),
        ("train/ratio_mean", &m["ratio_mean"]),
        ("train/ratio_min", &m["ratio_min"]),
        ("train/ratio_max", &m["ratio_max"]),
        ("train/clip_fraction", &m["clip_fraction"]),
        ("train/kl", &m["kl"]),
        ("train/grad_norm", &m["grad_norm"]),
        ("train/lr", &m["lr"]),
        ("time/rollout_s", &m["seconds"]["rollout"]),
        ("time/decode_s", &m["seconds"]["decode"]),
        ("time/reward_s", &m["seconds"]["reward"]),
        ("time/update_s", &m["seconds"]["update"]),
        ("time/images_per_s", &m["images_per_second"]),
    ]
    .into_iter()
    .map(|(t, v)| (t.to_string(), f(v)))
    .collect();
    for r in m["rewards"].as_array().unwrap() {
        want.push((format!("reward/{}", r[0].as_str().unwrap()), f(&r[1])));
    }
    want.sort_by(|a, b| a.0.cmp(&b.0));
    want
}

fn sorted(mut v: Vec<(String, f32)>) -> Vec<(String, f32)> {
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The iteration events (those with `train/loss`) of a stream, by step.
fn iteration_events(evs: &[Event]) -> Vec<(i64, Vec<(String, f32)>)> {
    evs.iter()
        .filter(|e| e.scalars.iter().any(|(t, _)| t == "train/loss"))
        .map(|e| (e.step, sorted(e.scalars.clone())))
        .collect()
}

/// `(step, eval/reward_mean)` of a stream.
fn eval_events(evs: &[Event]) -> Vec<(i64, f32)> {
    evs.iter()
        .filter_map(|e| {
            e.scalars
                .iter()
                .find(|(t, _)| t == "eval/reward_mean")
                .map(|(_, v)| (e.step, *v))
        })
        .collect()
}

/// The run's `config.toml`, once, as a Markdown code block at `step`.
fn assert_config_text(evs: &[Event], run: &Path, step: i64) {
    let texts: Vec<(i64, &(String, String))> = evs
        .iter()
        .flat_map(|e| e.texts.iter().map(move |t| (e.step, t)))
        .collect();
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let block: String = config.lines().map(|l| format!("    {l}\n")).collect();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!((texts[0].0, texts[0].1 .0.as_str()), (step, "config"));
    assert_eq!(texts[0].1 .1, block);
}

/// Each `(tag, step, dir)`: an image summary whose PNG holds the pixels of
/// `<run>/<dir>/iter-<step>.png`.
fn assert_images(evs: &[Event], run: &Path, want: &[(&str, i64, &str)]) {
    let tag = want[0].0;
    let got: Vec<(i64, &ImageSummary)> = evs
        .iter()
        .flat_map(|e| e.images.iter().map(move |i| (e.step, i)))
        .filter(|(_, i)| i.0 == tag)
        .collect();
    assert_eq!(got.len(), want.len(), "{tag}");
    for ((step, (_, h, w, png)), (_, want_step, dir)) in got.iter().zip(want) {
        assert_eq!(step, want_step, "{tag}");
        let file = run.join(dir).join(format!("iter-{step:06}.png"));
        let (fh, fw, pixels) = decode_png(&std::fs::read(&file).unwrap());
        assert_eq!((*h as u32, *w as u32), (fh, fw), "{}", file.display());
        assert_eq!(decode_png(png), (fh, fw, pixels), "{tag} at {step}");
    }
}

/// `(height, width, RGB bytes)` of a PNG.
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.height, info.width, buf)
}

#[test]
fn event_files_hold_the_logged_metrics_and_a_resume_restarts_at_its_step() {
    let root = temp_dir("run");
    let run = root.join("run");
    let t0 = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    train(&run, &["--set", "run.iterations=3"]);
    let t1 = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();

    let files = event_files(&run);
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
    let secs: f64 = name["events.out.tfevents.".len()..]
        .split('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs >= t0.floor() && secs <= t1, "{name}");
    assert!(
        name.split('.').nth(4).is_some_and(|h| !h.is_empty()),
        "no hostname in {name}"
    );

    let evs = events(&files[0]);
    assert_eq!(evs[0].file_version.as_deref(), Some("brain.Event:2"));
    assert_config_text(&evs, &run, 0);
    assert_images(&evs, &run, &[("rollout/images", 2, "images")]);
    assert_images(
        &evs,
        &run,
        &[
            ("eval/images", 0, "eval"),
            ("eval/images", 2, "eval"),
            ("eval/images", 3, "eval"),
        ],
    );
    assert!(evs
        .iter()
        .all(|e| e.wall_time >= t0.floor() && e.wall_time <= t1));
    // one event per iteration, its scalars equal to metrics.jsonl (as float32)
    let metrics = jsonl(&run.join("metrics.jsonl"));
    let iterations = iteration_events(&evs);
    assert_eq!(iterations.len(), 3);
    for (m, (step, scalars)) in metrics.iter().zip(&iterations) {
        assert_eq!(*step, m["iteration"].as_i64().unwrap());
        assert_eq!(scalars, &expected_scalars(m), "step {step}");
        assert!(scalars
            .iter()
            .any(|(t, _)| t == "reward/jpeg_compressibility"));
    }
    // evaluations before training, on the cadence and at the end
    let evals: Vec<(i64, f32)> = jsonl(&run.join("eval.jsonl"))
        .iter()
        .map(|l| {
            (
                l["iteration"].as_i64().unwrap(),
                l["reward_mean"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 2, 3]);
    assert_eq!(eval_events(&evs), evals);

    // a crash after iteration 3 but before its checkpoint: resume from 2 and run to 4
    std::fs::remove_dir_all(run.join("checkpoints/iter-000003")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
        .args([
            "train",
            "--threads",
            "1",
            "--resume",
            "--out",
            run.to_str().unwrap(),
        ])
        .args(["--set", "run.iterations=4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files = event_files(&run);
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(
        files[0].file_name().unwrap().to_str().unwrap(),
        name,
        "the old file sorts first"
    );
    let new = events(&files[1]);
    assert_eq!(new[0].file_version.as_deref(), Some("brain.Event:2"));
    assert_eq!(
        (new[1].session_status, new[1].step),
        (Some(1), 3),
        "SessionLog START at step 3"
    );
    assert!(new[1].scalars.is_empty());
    assert_config_text(&new, &run, 3);

    // what TensorBoard shows: the old points at steps >= 3 purged by START
    let mut merged: Vec<Event> = events(&files[0]);
    for e in new {
        if e.session_status == Some(1) {
            merged.retain(|old| old.step < e.step || old.file_version.is_some());
        }
        merged.push(e);
    }
    let metrics = jsonl(&run.join("metrics.jsonl"));
    let iterations = iteration_events(&merged);
    assert_eq!(
        iterations.iter().map(|i| i.0).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    for (m, (_, scalars)) in metrics.iter().zip(&iterations) {
        assert_eq!(scalars, &expected_scalars(m));
    }
    let evals: Vec<(i64, f32)> = jsonl(&run.join("eval.jsonl"))
        .iter()
        .map(|l| {
            (
                l["iteration"].as_i64().unwrap(),
                l["reward_mean"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 2, 4]);
    assert_eq!(eval_events(&merged), evals);

    // a fresh run in a directory without checkpoints starts a single new file
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    train(
        &run,
        &[
            "--set",
            "run.iterations=1",
            "--set",
            "run.tensorboard=false",
        ],
    );
    assert!(event_files(&run).is_empty(), "stale event files were kept");
    std::fs::remove_dir_all(&root).unwrap();
}
