//! `dancegrpo pretrain` end to end with tiny step counts: the files, the JSON
//! line, replacing an earlier output, and bad arguments.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("dancegrpo-pretrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn pretrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
        .arg("pretrain")
        .args(["--threads", "1"])
        .args(args)
        .output()
        .expect("running dancegrpo")
}

const TINY: [&str; 6] = ["--vae-steps", "4", "--steps", "5", "--batch", "2"];

#[test]
fn pretrain_writes_a_model_directory_and_a_json_line() {
    let root = temp_dir("run");
    let out = root.join("model");
    let o = pretrain(&[&["--out", out.to_str().unwrap(), "--seed", "3"][..], &TINY].concat());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("[vae ] step 4/4") && stderr.contains("[flow] step 5/5"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout.lines().last().expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(
        (v["vae_steps"].as_u64(), v["flow_steps"].as_u64()),
        (Some(4), Some(5))
    );
    for key in [
        "vae_loss_first",
        "vae_loss_last20",
        "flow_loss_first",
        "flow_loss_last20",
        "seconds",
        "peak_rss_mib",
    ] {
        assert!(v[key].as_f64().is_some_and(f64::is_finite), "{key}: {line}");
    }
    for f in [
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "samples.png",
        "loss.png",
        "pretrain.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("pretrain.json")).unwrap()).unwrap();
    assert_eq!(json["config"]["seed"], 3);
    assert_eq!(json["config"]["flow"]["batch"], 2);
    // an earlier pretrain output is replaced
    let again = pretrain(&[&["--out", out.to_str().unwrap(), "--seed", "4"][..], &TINY].concat());
    common::assert_ok(&again);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("pretrain.json")).unwrap()).unwrap();
    assert_eq!(json["config"]["seed"], 4);
    let names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["model"], "no temporary or old directory is left");

    // the demo trains from it (`--base`); its resolved config names the directory
    let demo = root.join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
        .args(["demo", "--threads", "1", "--out", demo.to_str().unwrap()])
        .args(["--base", out.to_str().unwrap(), "--set", "run.iterations=2"])
        .arg("--min-rise=-100")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = std::fs::read_to_string(demo.join("config.toml")).unwrap();
    assert!(
        cfg.contains("kind = \"dir\"") && cfg.contains(out.to_str().unwrap()),
        "{cfg}"
    );
    assert_eq!(
        std::fs::read_to_string(demo.join("rewards.txt"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    let o = Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
        .args(["demo", "--out", root.join("d2").to_str().unwrap(), "--base"])
        .arg(root.join("nothing"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("nothing") && err.contains("not a model directory"),
        "{err}"
    );
}

#[test]
fn bad_arguments_give_clear_errors() {
    let root = temp_dir("bad");
    let file = root.join("file.txt");
    std::fs::write(&file, "not a directory").unwrap();
    let o = pretrain(&[&["--out", file.to_str().unwrap()][..], &TINY].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("file.txt") && err.contains("exists and is not a directory"),
        "{err}"
    );
    assert!(!err.contains("[vae ]"), "refused before training: {err}");
    let o = pretrain(&["--out", root.join("m").to_str().unwrap(), "--batch", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("vae.batch"), "{err}");
    let o = pretrain(&["--out", root.join("m").to_str().unwrap(), "--lr=-1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("learning_rate"));
    assert!(!root.join("m").exists());
}
