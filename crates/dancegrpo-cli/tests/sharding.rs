//! `parallel.sharding = "full"` through the real binary with 2 and 4 Gloo
//! processes: it trains like `none`, resumes exactly with the same process
//! count and re-shards for another, and `export` consolidates its checkpoints.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{bin, copy_dir, metrics};

use dancegrpo::io::safetensors::SafetensorsFile;

const RUN: [&str; 14] = [
    "--threads",
    "1",
    "--set",
    "run.checkpoint_every=1",
    "--set",
    "run.keep_checkpoints=0",
    "--set",
    "optim.update_batching=\"per_sample\"",
    "--set",
    "optim.gradient_accumulation=8",
    "--set",
    "eval.every=0",
    "--set",
    "optim.activation_checkpointing=\"per_block\"",
];

/// `world` processes of `dancegrpo train` with [`RUN`] and `extra`, all awaited.
fn train(world: usize, out: &Path, extra: &[&str]) -> Vec<Output> {
    common::train_world(world, out, &[&RUN[..], extra].concat())
}

fn succeeded(outs: Vec<Output>, what: &str) {
    for (rank, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "{what}, rank {rank}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

const FULL: [&str; 2] = ["--set", "parallel.sharding=\"full\""];

/// The transformer of checkpoint `iter` of `run` as a diffusers file.
fn weights(run: &Path, iter: u32) -> PathBuf {
    let ckpt = run.join(format!("checkpoints/iter-{iter:06}"));
    let out = run.join(format!("export-{iter}"));
    let o = bin()
        .args([
            "export",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out.join("diffusion_pytorch_model.safetensors")
}

/// Largest `max|a - b| / max|a|` over the tensors of two weight files.
fn difference(a: &Path, b: &Path) -> f64 {
    let (fa, fb) = (
        SafetensorsFile::open(a).unwrap(),
        SafetensorsFile::open(b).unwrap(),
    );
    assert_eq!(fa.names().count(), fb.names().count());
    fa.names()
        .map(|n| {
            let (x, y) = (fa.tensor(n).unwrap(), fb.tensor(n).unwrap());
            let scale = x.abs().max().double_value(&[]).max(1e-12);
            (&x - &y).abs().max().double_value(&[]) / scale
        })
        .fold(0.0, f64::max)
}

const ZERO1: [&str; 2] = ["--set", "parallel.sharding=\"optimizer\""];

/// Largest `max|a - b|` over the tensors of two weight files.
fn absolute_difference(a: &Path, b: &Path) -> f64 {
    let (fa, fb) = (
        SafetensorsFile::open(a).unwrap(),
        SafetensorsFile::open(b).unwrap(),
    );
    fa.names()
        .map(|n| {
            let (x, y) = (fa.tensor(n).unwrap(), fb.tensor(n).unwrap());
            (&x - &y).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn sharding_trains_like_replicas_on_2_and_4_processes() {
    let dir = common::temp_dir("shard", "like");
    let none = dir.join("none");
    // two iterations (four optimizer steps) at the reference's learning rate
    let run = [
        "--set",
        "run.iterations=2",
        "--set",
        "optim.learning_rate=1e-5",
    ];
    succeeded(train(2, &none, &run), "none");
    // 2 processes also evaluate together (Ulysses) with units gathered per block
    let shared_eval = [
        "--set",
        "eval.parallel=\"sequence\"",
        "--set",
        "parallel.gather=\"per_block\"",
    ];
    for (world, name, mode) in [(2, "full", &FULL), (4, "full", &FULL), (2, "zero1", &ZERO1)] {
        let full = dir.join(format!("{name}{world}"));
        let eval: &[&str] = if (world, name) == (2, "full") {
            &shared_eval
        } else {
            &[]
        };
        succeeded(
            train(world, &full, &[&mode[..], &run[..], eval].concat()),
            name,
        );
        // the evaluation before training: the same model, the same reward
        let first_eval = |d: &Path| -> f64 {
            let text = std::fs::read_to_string(d.join("eval.jsonl")).unwrap();
            let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
            v["reward_mean"].as_f64().unwrap()
        };
        let (e0, e1) = (first_eval(&none), first_eval(&full));
        assert!(
            (e0 - e1).abs() <= 1e-6 * e0.abs(),
            "{name}{world}: eval {e0} and {e1}"
        );
        // the same samples and rewards; weights after two optimizer steps equal
        // up to the order of the reductions (the clipping norm summed over
        // shards, not per parameter): 6.5e-7 measured, bounded like 1 vs 2 processes
        let (a, b) = (metrics(&none), metrics(&full));
        assert_eq!(a[0]["rewards"], b[0]["rewards"]);
        let d = difference(&weights(&none, 1), &weights(&full, 1));
        assert!(
            d < 1e-5,
            "{name}, {world} processes: weights differ by {d:.2e}"
        );
        // iteration 2 samples from weights that differ in the last bits, and
        // AdamW moves a weight whose near-zero gradient changed sign by up to
        // about lr per step either way: at most 4 steps x 2 x lr (8e-6 of the
        // largest element measured)
        let d = absolute_difference(&weights(&none, 2), &weights(&full, 2));
        assert!(
            d <= 4.0 * 2.0 * 1e-5,
            "{name}, {world} processes, iteration 2: {d:.2e}"
        );
        let manifest = full.join("checkpoints/iter-000001/transformer.shards.json");
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
        assert_eq!(m["world"], world);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_sharded_run_killed_mid_iteration_resumes_bit_identically() {
    let dir = common::temp_dir("shard", "kill");
    let (whole, killed) = (dir.join("whole"), dir.join("killed"));
    let run = [&FULL[..], &["--set", "run.iterations=4"]].concat();
    succeeded(train(2, &whole, &run), "uninterrupted");
    // both processes killed (a node lost) once checkpoint 2 is complete
    let mut children = common::spawn_train_world(2, &killed, &[&RUN[..], &run[..]].concat());
    let marker = killed.join("checkpoints/iter-000002/state.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !marker.is_file() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for c in &mut children {
        let _ = c.kill(); // SIGKILL
        let _ = c.wait();
    }
    assert!(marker.is_file(), "checkpoint 2 never appeared");
    let last = killed.join("checkpoints/iter-000004/state.json");
    assert!(!last.is_file(), "the run finished before the kill");
    let resumed = [&run[..], &["--resume"]].concat();
    succeeded(train(2, &killed, &resumed), "resumed");
    let ck = |r: &Path| r.join("checkpoints/iter-000004");
    for rank in 0..2 {
        for stem in ["transformer", "optimizer.exp_avg", "optimizer.exp_avg_sq"] {
            let f = format!("{stem}.shard-{rank:05}-of-00002.safetensors");
            let (a, b) = (
                SafetensorsFile::open(ck(&whole).join(&f)).unwrap(),
                SafetensorsFile::open(ck(&killed).join(&f)).unwrap(),
            );
            for n in a.names() {
                assert!(a.tensor(n).unwrap().equal(&b.tensor(n).unwrap()), "{f} {n}");
            }
        }
    }
    assert_eq!(metrics(&whole), metrics(&killed));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sharded_runs_resume_exactly_and_reshard() {
    let dir = common::temp_dir("shard", "resume");
    let (whole, split) = (dir.join("whole"), dir.join("split"));
    succeeded(
        train(
            2,
            &whole,
            &[&FULL[..], &["--set", "run.iterations=3"]].concat(),
        ),
        "uninterrupted",
    );
    succeeded(
        train(
            2,
            &split,
            &[&FULL[..], &["--set", "run.iterations=1"]].concat(),
        ),
        "first part",
    );
    succeeded(
        train(
            2,
            &split,
            &[&FULL[..], &["--set", "run.iterations=3", "--resume"]].concat(),
        ),
        "resumed",
    );
    // bit for bit: every part file and the metrics
    let ck = |run: &Path| run.join("checkpoints/iter-000003");
    for rank in 0..2 {
        for stem in ["transformer", "optimizer.exp_avg", "optimizer.exp_avg_sq"] {
            let f = format!("{stem}.shard-{rank:05}-of-00002.safetensors");
            let (a, b) = (
                SafetensorsFile::open(ck(&whole).join(&f)).unwrap(),
                SafetensorsFile::open(ck(&split).join(&f)).unwrap(),
            );
            for n in a.names() {
                assert!(a.tensor(n).unwrap().equal(&b.tensor(n).unwrap()), "{f} {n}");
            }
        }
    }
    assert_eq!(metrics(&whole), metrics(&split));
    // one process generates from the sharded checkpoint (its parts put together)
    let png = dir.join("gen.png");
    let o = bin()
        .args([
            "generate",
            "--run",
            whole.to_str().unwrap(),
            "--images",
            "2",
        ])
        .args(["--out", png.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success() && png.is_file(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // four processes continue the two-process run: the same values re-split
    let (two, four) = (dir.join("two"), dir.join("four"));
    succeeded(
        train(
            2,
            &two,
            &[&FULL[..], &["--set", "run.iterations=1"]].concat(),
        ),
        "2",
    );
    std::fs::create_dir_all(&four).unwrap();
    copy_dir(&two.join("checkpoints"), &four.join("checkpoints"));
    std::fs::copy(two.join("config.toml"), four.join("config.toml")).unwrap();
    succeeded(
        train(
            4,
            &four,
            &[&FULL[..], &["--set", "run.iterations=2", "--resume"]].concat(),
        ),
        "2 -> 4",
    );
    assert!(four
        .join("checkpoints/iter-000002/transformer.shard-00003-of-00004.safetensors")
        .is_file());
    let d = difference(&weights(&two, 1), &weights(&four, 1));
    assert_eq!(d, 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lora_trains_under_either_sharding_mode() {
    // the frozen base stays whole; the adapters' optimizer state is split
    let dir = common::temp_dir("shard", "lora");
    let lora = [
        "--set",
        "optim.lora.rank=4",
        "--set",
        "optim.lora.alpha=8.0",
    ];
    let base = [&lora[..], &["--set", "run.iterations=1"]].concat();
    let none = dir.join("none");
    succeeded(train(2, &none, &base), "none");
    for (name, mode) in [("full", &FULL), ("zero1", &ZERO1)] {
        let run = dir.join(name);
        succeeded(train(2, &run, &[&mode[..], &base[..]].concat()), name);
        let file = "checkpoints/iter-000001/lora.safetensors";
        let d = difference(&none.join(file), &run.join(file));
        assert!(d < 1e-5, "{name}: adapters differ by {d:.2e}");
        let part = "checkpoints/iter-000001/optimizer.exp_avg.shard-00001-of-00002.safetensors";
        assert!(run.join(part).is_file(), "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_sharded_checkpoints_and_settings_are_named() {
    let dir = common::temp_dir("shard", "bad");
    let run = dir.join("run");
    succeeded(
        train(
            2,
            &run,
            &[&FULL[..], &["--set", "run.iterations=1"]].concat(),
        ),
        "run",
    );
    // a missing part: the resume names it
    let part = run.join("checkpoints/iter-000001/transformer.shard-00001-of-00002.safetensors");
    std::fs::remove_file(&part).unwrap();
    let outs = train(
        2,
        &run,
        &[&FULL[..], &["--set", "run.iterations=2", "--resume"]].concat(),
    );
    let err = String::from_utf8_lossy(&outs[1].stderr).to_string();
    assert!(
        !outs[1].status.success() && err.contains("transformer.shard-00001-of-00002"),
        "{err}"
    );
    // a truncated part, and a sharded checkpoint resumed whole: both named,
    // and neither resume writes anything
    let cut = dir.join("cut");
    succeeded(
        train(
            2,
            &cut,
            &[&FULL[..], &["--set", "run.iterations=1"]].concat(),
        ),
        "cut",
    );
    let part = cut.join("checkpoints/iter-000001/transformer.shard-00000-of-00002.safetensors");
    let bytes = std::fs::read(&part).unwrap();
    std::fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();
    let outs = train(
        2,
        &cut,
        &[&FULL[..], &["--set", "run.iterations=2", "--resume"]].concat(),
    );
    let err = String::from_utf8_lossy(&outs[0].stderr).to_string();
    assert!(
        !outs[0].status.success() && err.contains("transformer.shard-00000-of-00002"),
        "{err}"
    );
    let outs = train(2, &cut, &["--set", "run.iterations=2", "--resume"]);
    let err = String::from_utf8_lossy(&outs[0].stderr).to_string();
    assert!(
        !outs[0].status.success() && err.contains("transformer"),
        "{err}"
    );
    assert!(!cut.join("checkpoints/iter-000002").exists());
    assert_eq!(metrics(&cut).len(), 1);
    // a whole-model checkpoint resumed sharded: the manifest it lacks is named
    let none = dir.join("none");
    succeeded(train(2, &none, &["--set", "run.iterations=1"]), "none");
    let outs = train(
        2,
        &none,
        &[&FULL[..], &["--set", "run.iterations=2", "--resume"]].concat(),
    );
    let err = String::from_utf8_lossy(&outs[0].stderr).to_string();
    assert!(
        !outs[0].status.success() && err.contains("transformer.shards.json"),
        "{err}"
    );
    // full sharding without per-block checkpointing
    let o = bin()
        .args(["train", "--out", dir.join("x").to_str().unwrap()])
        .args(RUN)
        .args(
            [
                &FULL[..],
                &["--set", "optim.activation_checkpointing=\"off\""],
            ]
            .concat(),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("parallel.sharding") && err.contains("per_block"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
