//! TensorBoard event files of `dancegrpo train`, read back with a reader
//! written here (TFRecord framing with both CRCs checked by a bitwise CRC-32C,
//! and the `tensorflow.Event` protobuf fields decoded by hand), compared with
//! `metrics.jsonl` and `eval.jsonl`; a resumed run's new file and its
//! `SessionLog START`.

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
            "run.image_every=0",
        ])
        .args(["--set", "eval.every=2", "--set", "eval.prompts=2"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// CRC-32C bit by bit (independent of the library's table-driven one).
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The mask as the format describes it.
#[allow(clippy::manual_rotate)]
fn masked(crc: u32) -> u32 {
    ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
}

/// The payloads of a TFRecord file, both CRCs of every record checked.
fn records(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let (mut out, mut at) = (Vec::new(), 0usize);
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(
            u32_at(at + 8),
            masked(crc32c(&bytes[at..at + 8])),
            "length crc"
        );
        let payload = &bytes[at + 12..at + 12 + len];
        assert_eq!(
            u32_at(at + 12 + len),
            masked(crc32c(payload)),
            "payload crc"
        );
        out.push(payload.to_vec());
        at += 12 + len + 4;
    }
    assert_eq!(at, bytes.len(), "{}: trailing bytes", path.display());
    out
}

/// The fields of an `Event` this test looks at.
#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    scalars: Vec<(String, f32)>,
    session_status: Option<u64>,
}

/// A protobuf field: its number and value.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn varint(b: &[u8], at: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let byte = b[*at];
        *at += 1;
        v |= ((byte & 0x7F) as u64) << shift;
        if byte < 0x80 {
            return v;
        }
        shift += 7;
    }
}

fn fields(b: &[u8]) -> Vec<(u64, Field<'_>)> {
    let (mut out, mut at) = (Vec::new(), 0);
    while at < b.len() {
        let key = varint(b, &mut at);
        let field = match key & 7 {
            0 => Field::Varint(varint(b, &mut at)),
            1 => {
                at += 8;
                Field::Fixed64(b[at - 8..at].try_into().unwrap())
            }
            2 => {
                let n = varint(b, &mut at) as usize;
                at += n;
                Field::Bytes(&b[at - n..at])
            }
            5 => {
                at += 4;
                Field::Fixed32(b[at - 4..at].try_into().unwrap())
            }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, field));
    }
    out
}

fn decode_value(b: &[u8]) -> (String, f32) {
    let (mut tag, mut value) = (None, None);
    for (n, f) in fields(b) {
        match (n, f) {
            (1, Field::Bytes(s)) => tag = Some(String::from_utf8(s.to_vec()).unwrap()),
            (2, Field::Fixed32(x)) => value = Some(f32::from_le_bytes(x)),
            _ => panic!("unexpected Summary.Value field {n}"),
        }
    }
    (tag.unwrap(), value.unwrap())
}

fn decode_event(b: &[u8]) -> Event {
    let mut e = Event::default();
    for (n, f) in fields(b) {
        match (n, f) {
            (1, Field::Fixed64(x)) => e.wall_time = f64::from_le_bytes(x),
            (2, Field::Varint(v)) => e.step = v as i64,
            (3, Field::Bytes(s)) => e.file_version = Some(String::from_utf8(s.to_vec()).unwrap()),
            (5, Field::Bytes(s)) => {
                for (n, f) in fields(s) {
                    match (n, f) {
                        (1, Field::Bytes(v)) => e.scalars.push(decode_value(v)),
                        _ => panic!("unexpected Summary field {n}"),
                    }
                }
            }
            (7, Field::Bytes(s)) => match fields(s).as_slice() {
                [(1, Field::Varint(status))] => e.session_status = Some(*status),
                _ => panic!("unexpected SessionLog"),
            },
            _ => panic!("unexpected Event field {n}"),
        }
    }
    e
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
