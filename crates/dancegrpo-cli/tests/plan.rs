//! `dancegrpo plan` through the real binary: table, JSON, exit status, bad input.

mod common;

use std::process::{Command, Output};

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
        .arg("plan")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn plan_prints_fits_or_not_and_exits_accordingly() {
    let out = plan(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("trained weights (float32 master)") && text.contains("fits in 80.00 GiB")
    );
    // the tiny model needs more than a mebibyte: exit 1, and the JSON says why
    let out = plan(&["--gpu-memory", "1MiB", "--reserve", "0MiB", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["fits"], false);
    assert!(p["total"].as_u64().unwrap() > 1 << 20);
    assert_eq!(p["world"], 1);
    assert!(p["lines"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["key"] == "moments"));
}

#[test]
fn plan_names_bad_input() {
    let out = plan(&["--gpu-memory", "80XB"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
    let out = plan(&["--world", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("optim.gradient_accumulation"));
    let out = plan(&["/nonexistent/run.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/run.toml"));
}

/// The repository's `configs/` directory.
fn configs() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

#[test]
fn configs_demo_toml_is_the_built_in_default() {
    let dry = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
            .args(["train", "--dry-run"])
            .args(extra)
            .output()
            .unwrap();
        common::assert_ok(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let file = configs().join("demo.toml");
    let from_file = dry(&["--config", file.to_str().unwrap()]);
    assert!(from_file.contains("iterations = 150"), "{from_file}");
    assert_eq!(from_file, dry(&[]));
}

#[test]
fn configs_flux_dev_hps_mirrors_the_recipe_and_fits_16_gpus() {
    let text = std::fs::read_to_string(configs().join("flux-dev-hps.toml")).unwrap();
    for line in [
        "height = 720",
        "steps = 16",
        "group_size = 12",
        "clip_range = 1e-4",
        "learning_rate = 1e-5",
        "gradient_accumulation = 64",
        "prompts_per_iteration = 16",
        "mode = \"bf16\"",
        "sharding = \"full\"",
    ] {
        assert!(text.contains(line), "{line}");
    }
    // the placeholders replaced by the architecture-only test data; prompts synthetic
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dancegrpo/tests/data");
    let (head, tail) = text.split_once("[data]").unwrap();
    let tail = &tail[tail.find("\n[").unwrap()..];
    let text = format!(
        "{head}[data]\nkind = \"synthetic\"\nprompts = 16\nseed = 0\ntext_len = 512\n{tail}"
    )
    .replace(
        "/path/to/FLUX.1-dev",
        data.join("flux1-dev").to_str().unwrap(),
    )
    .replace(
        "/path/to/HPSv2.1",
        data.join("hpsv2-vit-h-14").to_str().unwrap(),
    );
    let dir = std::env::temp_dir().join(format!("dancegrpo-recipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flux-dev-hps.toml");
    std::fs::write(&path, text).unwrap();
    let out = plan(&[path.to_str().unwrap(), "--world", "16", "--json"]);
    let _ = std::fs::remove_dir_all(&dir);
    let p: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        (p["fits"].as_bool(), p["world"].as_u64()),
        (Some(true), Some(16))
    );
    assert_eq!(out.status.code(), Some(0));
}
