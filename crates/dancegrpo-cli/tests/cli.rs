//! Tests that run the real `dancegrpo` binary.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dancegrpo::io::safetensors::{write_safetensors, SafetensorsFile};
use tch::Tensor;

use common::{case_dir, copy_dir};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("running dancegrpo")
}

fn temp_dir(name: &str) -> PathBuf {
    common::temp_dir("cli", name)
}

#[test]
fn align_json_passes_on_the_public_case() {
    let out = run(&["align", case_dir().to_str().unwrap(), "--json"]);
    common::assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["case"], "flux_tiny_a");
    assert_eq!(report["pass"], true);
    let names: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "text_encoding",
            "schedule",
            "transformer",
            "sampling",
            "decode",
            "reward",
            "advantages",
            "train",
            "grads",
            "optimizer",
            "end_to_end"
        ]
    );
    for s in report["stages"].as_array().unwrap() {
        for key in [
            "worst",
            "rel_err",
            "abs_err",
            "truth_err",
            "ref_err",
            "bound",
            "pass",
        ] {
            assert!(s.get(key).is_some(), "stage lacks {key}: {s}");
        }
        // judged against the float64 truth: within 4x the reference's own error
        let (ours, reference) = (s["truth_err"].as_f64(), s["ref_err"].as_f64());
        let floor = if s["name"] == "end_to_end" {
            1e-4
        } else {
            1e-6
        };
        if let (Some(ours), Some(reference)) = (ours, reference) {
            assert!(ours <= (4.0 * reference).max(floor), "{s}");
        }
    }
}

#[test]
fn align_table_and_exit_status_on_a_broken_model() {
    let out = run(&["align", case_dir().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("transformer") && text.contains("PASS"),
        "{text}"
    );

    // A copy of the case whose transformer has one perturbed weight must fail the
    // transformer stage (and only it), with exit status 1.
    let dir = temp_dir("broken");
    copy_dir(&case_dir(), &dir);
    let weights = dir.join("transformer/diffusion_pytorch_model.safetensors");
    let file = SafetensorsFile::open(&weights).unwrap();
    let tensors: Vec<(String, Tensor)> = file
        .names()
        .map(|n| {
            let t = file.tensor(n).unwrap();
            (
                n.to_string(),
                if n == "proj_out.bias" { t + 1e-3 } else { t },
            )
        })
        .collect();
    drop(file);
    write_safetensors(&weights, &tensors, &BTreeMap::new()).unwrap();
    let out = run(&["align", dir.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["pass"], false);
    let pass_of = |name: &str| {
        report["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["pass"]
            .clone()
    };
    // the velocity feeds the transformer, sampling and GRPO stages; the others do not use the model
    for stage in [
        "transformer",
        "sampling",
        "train",
        "grads",
        "optimizer",
        "end_to_end",
    ] {
        assert_eq!(pass_of(stage), false, "{stage}");
    }
    for stage in ["schedule", "decode", "reward", "advantages"] {
        assert_eq!(pass_of(stage), true, "{stage}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn align_reports_bad_arguments() {
    let out = run(&["align", "/nonexistent/case"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/case"));
    let out = run(&["align", case_dir().to_str().unwrap(), "--stages", "bogus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("unknown stage `bogus`")
            && err.contains("end_to_end"),
        "{err}"
    );
}

#[test]
fn env_reports_the_loaded_libtorch() {
    let out = run(&["env", "--json"]);
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        info["libtorch"].as_str().unwrap().starts_with("2.11.0"),
        "{info}"
    );
    assert_eq!(info["cuda_feature"], cfg!(feature = "cuda"));
    assert!(info["cuda_device_count"].as_i64().unwrap() >= 0);
}

#[test]
fn demo_reward_rises_and_generate_reads_its_checkpoints() {
    // the README's first command, as shipped: the reward must rise by >= 1 kB
    let dir = temp_dir("demo");
    let out = run(&["demo", "--out", dir.to_str().unwrap(), "--threads", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rewards: Vec<f64> = std::fs::read_to_string(dir.join("rewards.txt"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(rewards.len(), 150);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let rise = mean(&rewards[140..]) - mean(&rewards[..10]);
    assert!(rise >= 1.0, "reward rose by {rise}");
    let eval: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(eval.len(), 2);
    let (before, after) = (
        eval[0]["reward_mean"].as_f64().unwrap(),
        eval[1]["reward_mean"].as_f64().unwrap(),
    );
    assert!(after > before + 1.0, "eval {before} -> {after}");
    for f in [
        "reward_curve.png",
        "eval/iter-000000.png",
        "eval/iter-000150.png",
        "metrics.jsonl",
        "config.toml",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    // generate from the newest checkpoint and from the base model: same images as eval
    let png = dir.join("gen.png");
    for (ck, want) in [(None, after), (Some("base"), before)] {
        let mut args = vec![
            "generate",
            "--run",
            dir.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ];
        if let Some(c) = ck {
            args.extend(["--checkpoint", c]);
        }
        let out = run(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        common::assert_ok(&out);
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // generate uses other noise than eval: compare loosely with the eval reward
        let got = mean_reward(&text);
        assert!(
            (got - want).abs() < 0.6 * (after - before),
            "{ck:?}: {got} vs eval {want}"
        );
    }
    // the seed's block cache changes the images a little, not the reward's level
    let out = run(&[
        "generate",
        "--run",
        dir.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--cache",
        "seed",
    ]);
    common::assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    let got = mean_reward(&text);
    assert!(
        (got - after).abs() < 0.6 * (after - before),
        "cached: {got} vs eval {after}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The mean reward `generate` printed.
fn mean_reward(stdout: &str) -> f64 {
    let after = stdout.split("mean reward ").nth(1).expect("a mean reward");
    after.split(';').next().unwrap().parse().unwrap()
}

#[test]
fn bench_generate_measures_caches_against_no_cache() {
    let out = run(&[
        "bench",
        "generate",
        "tiny",
        "--steps",
        "12",
        "--images",
        "2",
        "--rounds",
        "1",
        "--threads",
        "1",
        "--cache",
        "seed",
        "--cache",
        "fast={kind=\"steps\",threshold=0.3}",
    ]);
    common::assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("| seed |") && stdout.contains("| fast |"),
        "{stdout}"
    );
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let f = json["figures"].as_array().unwrap();
    let names: Vec<&str> = f.iter().map(|x| x["label"].as_str().unwrap()).collect();
    assert_eq!(names, ["none", "seed", "fast"]);
    // the baseline against itself: identical (PSNR infinite, written null)
    assert_eq!(
        (f[0]["speedup"].as_f64(), f[0]["ssim"].as_f64()),
        (Some(1.0), Some(1.0))
    );
    assert!(f[0]["psnr"].is_null() && f[0]["latent_rel_l2"].as_f64() == Some(0.0));
    // the seed's schedule on 12 steps and 3 blocks: steps 5..11, every second one re-uses block 1
    assert_eq!(f[1]["cache"]["block_start"], 1);
    assert_eq!(
        (f[1]["full_steps"].as_i64(), f[1]["block_steps"].as_i64()),
        (Some(9), Some(3))
    );
    let share = f[1]["blocks_run"].as_f64().unwrap();
    assert!((share - (36.0 - 3.0) / 36.0).abs() < 1e-12, "{share}");
    let (psnr, rel) = (
        f[1]["psnr"].as_f64().unwrap(),
        f[1]["latent_rel_l2"].as_f64().unwrap(),
    );
    assert!(psnr > 20.0 && rel > 0.0 && rel < 0.2, "{psnr} {rel}");
    // whole steps skipped: the first and last steps always run
    let skipped = f[2]["skipped_steps"].as_i64().unwrap();
    assert!(skipped > 0 && skipped <= 10, "{skipped}");
    assert!(f[2]["ssim"].as_f64().unwrap() < 1.0);
    // settings that cannot run are refused, naming the field
    for (spec, needle) in [
        ("{kind=\"blocks\",step_start=1}", "step_interval"),
        (
            "{kind=\"blocks\",step_start=0,step_interval=2,step_end=12,block_start=2,block_end=9}",
            "cache.block_end",
        ),
        ("{kind=\"steps\",threshold=-1}", "cache.threshold"),
    ] {
        let o = run(&[
            "bench", "generate", "tiny", "--steps", "12", "--rounds", "1", "--cache", spec,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{spec}: {err}");
        assert!(err.contains(needle), "{spec}: {err}");
    }
}

/// `bench train` for one untimed-warm-up-free iteration on one thread, plus `extra`.
fn bench_train(extra: &[&str]) -> Output {
    let mut args = vec![
        "bench",
        "train",
        "--iterations",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
    ];
    args.extend(extra);
    run(&args)
}

#[test]
fn bench_train_prints_stage_times_and_a_json_line() {
    let out = bench_train(&[case_dir().to_str().unwrap(), "--rollout-batch", "4"]);
    common::assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    for key in [
        "rollout",
        "decode",
        "reward",
        "update",
        "seconds_per_iteration",
    ] {
        assert!(json[key].as_f64().unwrap() > 0.0, "{key}: {json}");
    }
    assert_eq!(json["case"], "flux_tiny_a");
    assert_eq!(json["layout"], "fixture");
    assert_eq!(json["rollout_batch"], 4);
    assert!(json["peak_rss_mib"].as_f64().unwrap() > 10.0);
    assert_eq!(json["gflop_per_iteration"], 0.285364224);
}

/// `--first-window rollout-graphs` runs, says so, and counts the forward
/// passes it leaves out (tiny: the first window's 2 samples x 3 transitions,
/// each a rollout call's work: the rollout makes 4 x 6); with checkpointing
/// it refuses.
#[test]
fn bench_train_keeps_the_first_window_from_the_rollout() {
    let out = bench_train(&["--preset", "tiny", "--first-window", "rollout-graphs"]);
    common::assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(json["first_window"], "rollout_graphs");
    let gflop = json["gflop_per_iteration"].as_f64().unwrap();
    let call = json["gflop_rollout"].as_f64().unwrap() / 24.0;
    assert!((gflop - (0.285364224 - 6.0 * call)).abs() < 1e-9, "{json}");
    assert!((call - 0.004700416).abs() < 1e-9, "{json}");
    let refused = bench_train(&[
        "--preset",
        "tiny",
        "--first-window",
        "rollout-graphs",
        "--checkpointing",
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("rollout_graphs") && err.contains("checkpointing"),
        "{err}"
    );
}

/// With the update recomputing in the rollout's batches, a rollout batch of 4
/// over the preset's accumulation windows of 2 samples runs as batches of 2,
/// and `bench train` says so.
#[test]
fn bench_train_says_when_rollout_batches_end_with_a_window() {
    let args = ["--preset", "tiny", "--rollout-batch", "4"];
    let out = bench_train(&[&args[..], &["--update-batching", "rollout"]].concat());
    common::assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: sampler.rollout_batch = 4 runs as model batches of 2"),
        "{err}"
    );
    let per_sample = bench_train(&args);
    common::assert_ok(&per_sample);
    assert!(!String::from_utf8_lossy(&per_sample.stderr).contains("warning"));
}

/// The built-in tiny preset runs in the benchmark layout (seeded weights, no
/// tokenizer files), counts the reference's 0.285 GFLOP per iteration and
/// reports the rate; a directory in that layout runs the same way.
#[test]
fn bench_train_runs_the_shipped_preset_and_its_directory() {
    let preset = ["--preset", "tiny"];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dancegrpo/presets/tiny");
    for source in [&preset[..], &[dir.to_str().unwrap()][..]] {
        let out = bench_train(source);
        common::assert_ok(&out);
        let text = String::from_utf8_lossy(&out.stdout);
        let json: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(json["case"], "bench_tiny");
        assert_eq!(json["layout"], "benchmark (seeded weights)");
        assert_eq!(json["gflop_per_iteration"], 0.285364224);
        assert!(json["gflops"].as_f64().unwrap() > 0.0, "{json}");
        assert!(text.contains("GFLOP/s"), "{text}");
    }
    let events = common::temp_dir("cli", "bench-profile").join("events.tsv");
    let out = bench_train(&["--preset", "tiny", "--profile", events.to_str().unwrap()]);
    common::assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("operator (self time)") && text.contains("aten::addmm"),
        "{text}"
    );
    let lines = std::fs::read_to_string(&events).unwrap();
    assert!(
        lines.lines().count() > 1000,
        "{} events",
        lines.lines().count()
    );
    let bad = run(&["bench", "train", "--preset", "huge"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tiny, small, medium"));
}
