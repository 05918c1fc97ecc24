//! `dancegrpo train` end to end: exact resume after SIGKILL, partial
//! checkpoints, checkpoint layout, and configuration errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::metrics;
use dancegrpo::io::safetensors::SafetensorsFile;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dancegrpo-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const RUN: [&str; 8] = [
    "--threads",
    "1",
    "--set",
    "run.iterations=9",
    "--set",
    "run.checkpoint_every=2",
    "--set",
    "run.keep_checkpoints=0",
];

fn train(out: &Path, extra: &[&str]) -> Output {
    let out = bin()
        .args(["train", "--out", out.to_str().unwrap()])
        .args(RUN)
        .args(extra)
        .output()
        .unwrap();
    common::assert_ok(&out);
    out
}

fn final_weights(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let path = dir.join("checkpoints/iter-000009/transformer/diffusion_pytorch_model.safetensors");
    let f = SafetensorsFile::open(&path).unwrap();
    f.names()
        .map(|n| (n.to_string(), f.bytes(n).unwrap().to_vec()))
        .collect()
}

fn assert_same_run(a: &Path, b: &Path) {
    assert_eq!(metrics(a), metrics(b), "metrics differ");
    assert_eq!(metrics(a).len(), 9);
    assert!(final_weights(a) == final_weights(b), "final weights differ");
    let opt =
        |d: &Path| std::fs::read(d.join("checkpoints/iter-000009/optimizer.safetensors")).unwrap();
    assert!(opt(a) == opt(b), "optimizer state differs");
    assert_eq!(
        std::fs::read_to_string(a.join("rewards.txt")).unwrap(),
        std::fs::read_to_string(b.join("rewards.txt")).unwrap()
    );
}

/// `train` of `RUN` in `dir`: resumed from its newest complete checkpoint, or
/// from scratch when it has none.
fn continue_cmd(dir: &Path) -> Command {
    let mut cmd = bin();
    cmd.args(["train", "--out", dir.to_str().unwrap()])
        .args(RUN);
    if dancegrpo::train::checkpoint::latest(&dir.join("checkpoints")).is_some() {
        cmd.arg("--resume");
    }
    cmd
}

/// Runs `dir` to its end ([`continue_cmd`]).
fn finish_run(dir: &Path) {
    let out = continue_cmd(dir).output().unwrap();
    common::assert_ok(&out);
}

#[test]
fn sigkill_and_resume_reproduce_an_uninterrupted_run_bit_for_bit() {
    let root = temp_dir("kill");
    let clean = root.join("clean");
    train(&clean, &[]);
    // checkpoint layout: diffusers transformer directory + optimizer + state
    let ck = clean.join("checkpoints/iter-000009");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("transformer/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["_class_name"], "FluxTransformer2DModel");
    assert!(final_weights(&clean)
        .iter()
        .any(|(n, _)| n == "transformer_blocks.0.attn.to_q.weight"));
    assert!(ck.join("state.json").is_file() && clean.join("config.toml").is_file());

    let killed = root.join("killed");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut kills = 0;
    for attempt in 0..20u64 {
        let mut child = continue_cmd(&killed)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = 250
            + (nanos
                .wrapping_mul(6364136223846793005)
                .wrapping_add(attempt * 1442695040888963407)
                >> 33)
                % 900;
        std::thread::sleep(Duration::from_millis(delay));
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "run {attempt} failed");
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                eprintln!("killed attempt {attempt} after {delay} ms");
            }
        }
    }
    finish_run(&killed);
    eprintln!("{kills} kills");
    assert_same_run(&clean, &killed);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_half_written_checkpoint_is_ignored_on_resume() {
    let root = temp_dir("partial");
    let clean = root.join("clean");
    train(&clean, &[]);
    // run 5 iterations, then make its last checkpoint look interrupted: a
    // temporary directory and a final-named one without state.json
    let part = root.join("part");
    train(&part, &["--set", "run.iterations=5"]);
    let ck = part.join("checkpoints");
    std::fs::remove_file(ck.join("iter-000005/state.json")).unwrap();
    std::fs::write(ck.join("iter-000005/optimizer.safetensors"), "garbage").unwrap();
    std::fs::create_dir_all(ck.join(".iter-000006.tmp/transformer")).unwrap();
    std::fs::write(ck.join(".iter-000006.tmp/transformer/config.json"), "{").unwrap();
    // the resume starts from iteration 4; metrics of iteration 5 are dropped and redone
    let out = bin()
        .args(["train", "--out", part.to_str().unwrap(), "--resume"])
        .args(RUN)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resumed after iteration 4"), "{err}");
    // the longer run is named as the one change, which keeps the trajectory
    assert!(
        err.contains("resume: run.iterations changed: 5 -> 9"),
        "{err}"
    );
    assert_eq!(err.matches("resume: ").count(), 1, "{err}");
    assert_same_run(&clean, &part);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn configuration_and_run_directory_errors_name_the_problem() {
    let root = temp_dir("errors");
    let check = |args: &[&str], want: &[&str]| {
        let out = bin()
            .arg("train")
            .args(args)
            .args(["--threads", "1"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: `{w}` not in {err}");
        }
    };
    let out = root.join("run");
    let o = out.to_str().unwrap();
    check(
        &["--out", o, "--set", "sampler.bogus=1"],
        &["sampler", "unknown field `bogus`"],
    );
    check(
        &["--out", o, "--set", "optim.learning_rate=\"fast\""],
        &["optim.learning_rate", "invalid type"],
    );
    check(
        &["--out", o, "--set", "grpo.timestep_fraction=1.5"],
        &["grpo.timestep_fraction", "(0, 1]"],
    );
    check(
        &["--out", o, "--set", "sampler.height=50"],
        &["sampler.height", "multiple of 16"],
    );
    check(
        &["--out", o, "--set", "optim.gradient_accumulation=5"],
        &["optim.gradient_accumulation", "16 samples"],
    );
    let cfg = root.join("bad.toml");
    std::fs::write(&cfg, "[model]\nkind = \"tiny\"\nseed = 0\n[data]\nkind = \"synthetic\"\nprompts = 4\nseed = 0\n[[rewards]]\nkind = \"jpeg\"\nobjective = \"sharpness\"\n").unwrap();
    check(
        &["--out", o, "--config", cfg.to_str().unwrap()],
        &["rewards[0]", "sharpness"],
    );
    let broken = root.join("broken.toml");
    std::fs::write(&broken, "[sampler\nheight = 64\n").unwrap();
    check(
        &["--out", o, "--config", broken.to_str().unwrap()],
        &["broken.toml: invalid TOML", "line 1"],
    );
    check(
        &["--out", o, "--config", "/nonexistent/run.toml"],
        &["/nonexistent/run.toml"],
    );
    // --resume never creates the directory, nor runs on the built-in default
    check(&["--out", o, "--resume"], &["no such run directory"]);
    assert!(!out.exists());
    std::fs::create_dir_all(&out).unwrap();
    check(
        &["--out", o, "--resume"],
        &["has no config.toml", "--config"],
    );
    let tiny = root.join("tiny.toml");
    let dry = bin().args(["train", "--dry-run"]).output().unwrap();
    std::fs::write(&tiny, &dry.stdout).unwrap();
    let with = ["--out", o, "--resume", "--config", tiny.to_str().unwrap()];
    check(&with, &["no complete checkpoint"]);
    // invalid numbers are refused by name, before anything runs
    for (set, want) in [
        ("optim.learning_rate=inf", "optim.learning_rate"),
        ("optim.learning_rate=1e30", "optim.learning_rate"),
        ("sampler.guidance=nan", "sampler.guidance"),
        ("sampler.height=100000", "sampler.height"),
        ("optim.eps=0.0", "optim.eps"),
        (
            "health.max_failed_reward_share=0.0",
            "health.max_failed_reward_share",
        ),
    ] {
        check(&["--out", o, "--set", set], &[want]);
    }
    check(
        &[
            "--out",
            o,
            "--set",
            "model={kind=\"dir\", path=\"/no/such/flux\"}",
            "--dry-run",
        ],
        &["model.path", "/no/such/flux"],
    );
    std::fs::remove_dir_all(&out).unwrap();
    // a finished run refuses a fresh start in the same directory
    train(&out, &["--set", "run.iterations=2"]);
    check(&["--out", o], &["already holds checkpoint", "--resume"]);
    // an unwritable output directory
    let file = root.join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    check(
        &["--out", file.join("run").to_str().unwrap()],
        &["not-a-dir"],
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn rollout_batch_1_and_g_give_bit_identical_runs() {
    let root = temp_dir("batch");
    let run_with = |batch: &str| {
        let dir = root.join(format!("b{batch}"));
        let rollout = format!("sampler.rollout_batch={batch}");
        train(
            &dir,
            &[
                "--set",
                &rollout,
                "--set",
                "optim.update_batching=\"per_sample\"",
                "--set",
                "optim.gradient_accumulation=8",
                "--set",
                "run.image_every=9",
            ],
        );
        dir
    };
    let (one, group) = (run_with("1"), run_with("8"));
    assert_same_run(&one, &group);
    let png = |d: &Path| std::fs::read(d.join("images/iter-000009.png")).unwrap();
    assert!(png(&one) == png(&group), "rollout images differ");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn evaluation_runs_on_its_cadence_with_gold_rewards() {
    let root = temp_dir("eval");
    let dir = root.join("run");
    let out = bin()
        .args(["train", "--out", dir.to_str().unwrap(), "--threads", "1"])
        .args([
            "--set",
            "run.iterations=4",
            "--set",
            "eval.every=2",
            "--set",
            "eval.prompts=2",
        ])
        .args([
            "--set",
            "eval.gold_rewards=[{kind = \"jpeg\", objective = \"incompressibility\"}]",
        ])
        .output()
        .unwrap();
    common::assert_ok(&out);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let its: Vec<u64> = lines
        .iter()
        .map(|l| l["iteration"].as_u64().unwrap())
        .collect();
    assert_eq!(its, vec![0, 2, 4]);
    for l in &lines {
        // the gold reward (incompressibility, +kB) mirrors the trained one (-kB)
        let gold = l["gold"]["jpeg_incompressibility"].as_f64().unwrap();
        assert_eq!(gold, -l["reward_mean"].as_f64().unwrap(), "{l}");
    }
    for i in [0, 2, 4] {
        assert!(dir.join(format!("eval/iter-{i:06}.png")).is_file());
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_write_failure_mid_checkpoint_loses_nothing_and_resume_finishes_the_run() {
    let root = temp_dir("efbig");
    let args = |out: &Path, iterations: u32| -> Vec<String> {
        let mut a: Vec<String> = ["train", "--out", out.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(RUN.iter().map(|s| s.to_string()));
        a.extend(["--set".into(), format!("run.iterations={iterations}")]);
        a
    };
    let run = |a: Vec<String>| bin().args(a).output().unwrap();
    let whole = root.join("whole");
    assert!(run(args(&whole, 4)).status.success());
    let cut = root.join("cut");
    assert!(run(args(&cut, 2)).status.success());
    let ckpt = cut.join("checkpoints/iter-000002");
    let before = std::fs::read(ckpt.join("optimizer.safetensors")).unwrap();
    // files may not grow past 150 KiB (as a full disk would refuse them):
    // the next checkpoint's weights cannot be written
    let mut resume = args(&cut, 4);
    resume.push("--resume".into());
    let script = format!(
        "trap '' XFSZ; ulimit -f 300; exec \"$0\" {}",
        resume
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let o = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_dancegrpo")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(".iter-000004.tmp/") && err.contains("File too large"),
        "{err}"
    );
    assert_eq!(err.matches("File too large").count(), 1, "{err}");
    // the last complete checkpoint is untouched and still the newest
    assert_eq!(
        std::fs::read(ckpt.join("optimizer.safetensors")).unwrap(),
        before
    );
    assert!(!cut.join("checkpoints/iter-000004").exists());
    // with room again, the run resumes from it and ends as if never interrupted
    assert!(run(resume).status.success());
    let final_of = |d: &Path| {
        std::fs::read(
            d.join("checkpoints/iter-000004/transformer/diffusion_pytorch_model.safetensors"),
        )
        .unwrap()
    };
    assert!(final_of(&whole) == final_of(&cut), "final weights differ");
    assert_eq!(metrics(&whole), metrics(&cut));
    std::fs::remove_dir_all(&root).unwrap();
}

/// The first temporary checkpoint directory (`.iter-N.tmp`) under `ckpts`, if any.
fn temporary_checkpoint(ckpts: &Path) -> Option<PathBuf> {
    std::fs::read_dir(ckpts)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".iter-") && n.ends_with(".tmp"))
        })
}

#[test]
fn sigkill_during_a_checkpoint_write_loses_nothing() {
    let root = temp_dir("kill-in-checkpoint");
    let clean = root.join("clean");
    train(&clean, &[]);
    let killed = root.join("killed");
    let ckpts = killed.join("checkpoints");
    let name = |i: u64| dancegrpo::train::checkpoint::checkpoint_name(i);
    // Run k waits for checkpoint 2k to be written (`.iter-N.tmp` appears) and
    // SIGKILLs the process at once; each run resumes what the last one left.
    // A kill counts when the temporary directory is still there afterwards:
    // the process died inside `checkpoint::save`.
    let mut caught = Vec::new();
    for target in [2u64, 4, 6, 8] {
        let mut child = continue_cmd(&killed)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let tmp = ckpts.join(format!(".{}.tmp", name(target)));
        while !tmp.exists() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "run ended before {tmp:?}"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if tmp.is_dir() {
            // the newest complete checkpoint is the one before, intact
            let before = (target > 2).then(|| ckpts.join(name(target - 2)));
            assert_eq!(dancegrpo::train::checkpoint::latest(&ckpts), before);
            caught.push(target);
        }
    }
    eprintln!("killed inside the writes of checkpoints {caught:?}");
    assert!(
        caught.len() >= 2,
        "kills inside checkpoint writes: {caught:?}"
    );
    finish_run(&killed);
    assert!(
        temporary_checkpoint(&ckpts).is_none(),
        "a temporary directory is left"
    );
    assert_same_run(&clean, &killed);
    std::fs::remove_dir_all(&root).unwrap();
}
