//! `dancegrpo score` and `dancegrpo bench rewards`, run as the real binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dancegrpo::io::image::write_png;
use dancegrpo::io::safetensors::SafetensorsFile;
use tch::{Device, Kind, Tensor};

use common::case_dir;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
        .args(args)
        .output()
        .expect("running dancegrpo")
}

fn temp_dir(name: &str) -> PathBuf {
    common::temp_dir("score", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The JSON line (the last line of stdout).
fn json_line(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().expect("a JSON line")).unwrap()
}

fn scores(v: &serde_json::Value) -> Vec<Option<f64>> {
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["score"].as_f64())
        .collect()
}

#[test]
fn hpsv2_scores_of_the_fixture_images_equal_the_fixture_rewards() {
    let case = case_dir();
    let dir = temp_dir("hps");
    let expected = SafetensorsFile::open(case.join("expected.safetensors")).unwrap();
    let images = expected.tensor("decode/image_uint8").unwrap(); // (4, 64, 64, 3)
    let rewards = Vec::<f32>::try_from(&expected.tensor("rewards").unwrap()).unwrap();
    let case_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap()).unwrap();
    let captions: Vec<String> =
        serde_json::from_value(case_json["sample_captions"].clone()).unwrap();
    std::fs::write(dir.join("prompts.txt"), captions.join("\n")).unwrap();
    let mut paths = Vec::new();
    for i in 0..images.size()[0] {
        let p = dir.join(format!("sample{i}.png"));
        write_png(&p, &images.get(i)).unwrap();
        paths.push(p);
    }
    let spec = format!("hpsv2:{}", s(&case.join("reward")));
    let prompts = dir.join("prompts.txt");
    let mut args = vec![
        "score",
        "--reward",
        &spec,
        "--prompts",
        s(&prompts),
        "--threads",
        "1",
    ];
    args.extend(paths.iter().map(|p| s(p)));
    let out = run(&args);
    common::assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
    assert!(
        stdout.lines().next().unwrap().ends_with("sample0.png"),
        "{stdout}"
    );
    let v = json_line(&out);
    assert_eq!(v["reward"], "hpsv2");
    assert_eq!(v["failed"], 0);
    let got = scores(&v);
    for (g, r) in got.iter().zip(&rewards) {
        let g = g.expect("a score") as f32;
        assert!((g - r).abs() <= 1e-6, "{got:?} vs {rewards:?}");
    }
    // an empty prompt is a recorded failure (exit 1), never a score
    let out = run(&["score", "--reward", &spec, "--prompt", " ", s(&paths[0])]);
    assert_eq!(out.status.code(), Some(1));
    let v = json_line(&out);
    assert_eq!(v["images"][0]["error"], "empty prompt");
}

#[test]
fn jpeg_scores_png_and_jpeg_files_and_gray_images() {
    let dir = temp_dir("jpeg");
    let flat = Tensor::full([32, 48, 3], 128, (Kind::Uint8, Device::Cpu));
    let noise = Tensor::randint(256, [32, 48, 3], (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8);
    write_png(&dir.join("flat.png"), &flat).unwrap();
    write_png(&dir.join("noise.png"), &noise).unwrap();
    // the same flat image as a JPEG file and as a grayscale PNG
    let jpg = dancegrpo::rewards::jpeg::encode_rgb(
        &vec![128u8; 32 * 48 * 3],
        48,
        32,
        90,
        dancegrpo::rewards::jpeg::JpegSubsampling::S444,
    )
    .unwrap();
    std::fs::write(dir.join("flat.jpg"), jpg).unwrap();
    write_gray_png(&dir.join("gray.png"), 48, 32, 2);
    let out = run(&[
        "score",
        "--reward",
        "jpeg",
        "--prompt",
        "anything",
        s(&dir.join("flat.png")),
        s(&dir.join("noise.png")),
        s(&dir.join("flat.jpg")),
        s(&dir.join("gray.png")),
    ]);
    common::assert_ok(&out);
    let v = json_line(&out);
    assert_eq!(v["reward"], "jpeg_compressibility");
    let got: Vec<f64> = scores(&v).into_iter().map(Option::unwrap).collect();
    assert!(got[0] > got[1] && got[0] < 0.0, "{got:?}");
    assert_eq!(
        got[2], got[0],
        "the decoded JPEG of a flat image is the same flat image"
    );
    assert!(got[3] < 0.0);
}

fn write_gray_png(path: &Path, w: u32, h: u32, channels: u8) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(file, w, h);
    enc.set_color(if channels == 2 {
        png::ColorType::Grayscale
    } else {
        png::ColorType::Rgba
    });
    enc.set_depth(png::BitDepth::Eight);
    let n = if channels == 2 { 1 } else { 4 };
    let mut writer = enc.write_header().unwrap();
    writer
        .write_image_data(&vec![128u8; (w * h) as usize * n])
        .unwrap();
    writer.finish().unwrap();
}

#[test]
fn bad_inputs_exit_2_and_name_the_problem() {
    let dir = temp_dir("bad");
    let ok = dir.join("ok.png");
    write_png(&ok, &Tensor::zeros([8, 8, 3], (Kind::Uint8, Device::Cpu))).unwrap();
    let rgba = dir.join("rgba.png");
    write_gray_png(&rgba, 8, 8, 4);
    let not_image = dir.join("notes.png");
    std::fs::write(&not_image, "hello").unwrap();
    let missing = dir.join("missing.png");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--reward", "jpeg", "--prompt", "x", s(&rgba)],
            vec!["rgba.png", "Rgba", "4 channels"],
        ),
        (
            vec!["--reward", "jpeg", "--prompt", "x", s(&missing)],
            vec!["missing.png"],
        ),
        (
            vec!["--reward", "jpeg", "--prompt", "x", s(&not_image)],
            vec!["notes.png", "not a PNG or JPEG"],
        ),
        (
            vec!["--reward", "aesthetic:/m", "--prompt", "x", s(&ok)],
            vec!["unknown reward `aesthetic:/m`", "pickscore:DIR"],
        ),
        (
            vec!["--reward", "hpsv2:/no/such/dir", "--prompt", "x", s(&ok)],
            vec!["/no/such/dir"],
        ),
        (
            vec!["--reward", "jpeg", s(&ok)],
            vec!["--prompt TEXT or --prompts FILE"],
        ),
    ];
    for (args, needles) in cases {
        let mut full = vec!["score"];
        full.extend(args.iter().copied());
        let out = run(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: `{n}` not in {err}");
        }
    }
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "one\ntwo\n").unwrap();
    let out = run(&[
        "score",
        "--reward",
        "jpeg",
        "--prompts",
        s(&prompts),
        s(&ok),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("2 lines for 1 images"), "{err}");
}

#[test]
fn an_unreachable_remote_service_fails_every_image_with_exit_1() {
    let dir = temp_dir("remote");
    let ok = dir.join("ok.png");
    write_png(&ok, &Tensor::zeros([8, 8, 3], (Kind::Uint8, Device::Cpu))).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let spec = format!("remote:http://127.0.0.1:{port}/score");
    let start = std::time::Instant::now();
    let out = run(&["score", "--reward", &spec, "--prompt", "x", s(&ok), s(&ok)]);
    assert!(start.elapsed().as_secs() < 30);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_line(&out);
    assert_eq!(v["failed"], 2);
    assert_eq!(scores(&v), [None, None]);
    assert!(
        v["images"][0]["error"]
            .as_str()
            .unwrap()
            .contains("3 attempt(s)"),
        "{v}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("FAILED\t"));
}

#[test]
fn bench_rewards_reports_every_reward() {
    let out = run(&[
        "bench",
        "rewards",
        "--images",
        "2",
        "--size",
        "40",
        "--repeats",
        "1",
    ]);
    common::assert_ok(&out);
    let v = json_line(&out);
    assert_eq!(v["bench"], "rewards");
    let names: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert!(r["images_per_second"].as_f64().unwrap() > 0.0);
            r["reward"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        names,
        [
            "jpeg_compressibility",
            "hpsv2",
            "clip_score",
            "pickscore",
            "remote"
        ]
    );
}
