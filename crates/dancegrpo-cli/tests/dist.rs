//! `dancegrpo train` as several processes over c10d (Gloo): launched with the
//! variables torchrun sets, and by torchrun itself.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{bin, metrics};

use dancegrpo::io::safetensors::SafetensorsFile;

const RUN: [&str; 14] = [
    "--threads",
    "1",
    "--set",
    "run.iterations=4",
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
];

fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `world` processes of `dancegrpo train` with [`RUN`] and `extra`.
fn spawn_world(world: usize, out: &Path, extra: &[&str]) -> Vec<Output> {
    common::train_world(world, out, &[&RUN[..], extra].concat())
}

/// Largest `|a - b| / max|a|` over the tensors of checkpoint `iter`.
fn weight_difference(a: &Path, b: &Path, iter: u32) -> f64 {
    let file =
        format!("checkpoints/iter-{iter:06}/transformer/diffusion_pytorch_model.safetensors");
    let (fa, fb) = (
        SafetensorsFile::open(a.join(&file)).unwrap(),
        SafetensorsFile::open(b.join(&file)).unwrap(),
    );
    let mut worst: f64 = 0.0;
    for name in fa.names() {
        let (x, y) = (fa.tensor(name).unwrap(), fb.tensor(name).unwrap());
        let scale = x.abs().max().double_value(&[]).max(1e-12);
        worst = worst.max((&x - &y).abs().max().double_value(&[]) / scale);
    }
    worst
}

#[test]
fn two_processes_sample_the_same_trajectories_and_train_like_one() {
    let dir = common::temp_dir("dist", "two");
    let (one, two) = (dir.join("one"), dir.join("two"));
    check(
        bin()
            .args(["train", "--out", one.to_str().unwrap()])
            .args(RUN)
            .output()
            .unwrap(),
        "one process",
    );
    // the evaluations shared by both processes (Ulysses)
    let outs = spawn_world(2, &two, &["--set", "eval.parallel=\"sequence\""]);
    for (rank, o) in outs.into_iter().enumerate() {
        let o = check(o, &format!("rank {rank}"));
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        // only rank 0 reports
        assert_eq!(
            stderr.contains("4/4 reward"),
            rank == 0,
            "rank {rank}: {stderr}"
        );
    }
    // iteration 1 samples the same trajectories from the same weights:
    // identical rewards and advantages. Its second optimizer step already
    // starts from weights that differ in the last bits (the first step's summed
    // gradients differ only in the order of the additions).
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!(m1.len(), 4);
    assert_eq!(m2.len(), 4);
    for key in [
        "reward_mean",
        "reward_std",
        "rewards",
        "advantage",
        "zero_variance_group_share",
    ] {
        assert_eq!(m1[0][key], m2[0][key], "{key}");
    }
    for key in ["loss", "ratio_mean", "grad_norm"] {
        let (a, b) = (m1[0][key].as_f64().unwrap(), m2[0][key].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1e-6),
            "{key}: {a} and {b}"
        );
    }
    // after iteration 1 (two optimizer steps) the weights agree to rounding;
    // later iterations sample from those slightly different weights, and Adam
    // turns tiny gradients' rounding into steps of up to the learning rate
    let first = weight_difference(&one, &two, 1);
    let last = weight_difference(&one, &two, 4);
    eprintln!(
        "weights: worst relative difference {first:.2e} after 1 iteration, {last:.2e} after 4"
    );
    assert!(
        first < 1e-5,
        "weights after iteration 1 differ by {first:.2e}"
    );
    assert!(two.join("checkpoints/iter-000004/state.json").is_file());
    // the evaluation before training, its images split over the two
    // processes, scores like one process's (the same weights; the attention
    // sums over fewer heads per call: rounding at most)
    let evals = |d: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(d.join("eval.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (e1, e2) = (evals(&one), evals(&two));
    assert_eq!((e1.len(), e2.len()), (2, 2));
    let (a, b) = (
        e1[0]["reward_mean"].as_f64().unwrap(),
        e2[0]["reward_mean"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-6 * a.abs(), "evaluation: {a} and {b}");
}

#[test]
fn evaluation_prompts_shared_by_two_processes_score_like_one() {
    let dir = common::temp_dir("dist", "eval-prompts");
    // 3 prompts over 2 processes: 2 and 1 (padded to 2)
    let run = ["--set", "run.iterations=1", "--set", "eval.prompts=3"];
    let one = dir.join("one");
    let args = [&["train", "--out", one.to_str().unwrap()][..], &RUN, &run].concat();
    check(bin().args(args).output().unwrap(), "one process");
    let two = dir.join("two");
    let shared = [&run[..], &["--set", "eval.parallel=\"prompts\""]].concat();
    for (rank, o) in spawn_world(2, &two, &shared).into_iter().enumerate() {
        check(o, &format!("rank {rank}"));
    }
    let first = |d: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(d.join("eval.jsonl")).unwrap();
        serde_json::from_str(text.lines().next().unwrap()).unwrap()
    };
    let (a, b) = (first(&one), first(&two));
    assert_eq!(b["prompts"], 3);
    // the same images (the model is batch-invariant here), the same reward
    assert_eq!(a["reward_mean"], b["reward_mean"], "{a} {b}");
    let png = |d: &Path| std::fs::read(d.join("eval/iter-000000.png")).unwrap();
    assert_eq!(png(&one), png(&two));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_sequence_shared_evaluation_the_model_cannot_split_is_refused_at_start() {
    let dir = common::temp_dir("dist", "split");
    let run = dir.join("r");
    // 48 x 48 pixels: 3 x 3 = 9 image tokens, not divisible by 2 processes
    let size = ["--set", "sampler.height=48", "--set", "sampler.width=48"];
    let seq = ["--set", "eval.parallel=\"sequence\""];
    for (rank, o) in spawn_world(2, &run, &[&size[..], &seq].concat())
        .iter()
        .enumerate()
    {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "rank {rank}: {err}");
        assert!(
            err.contains("eval.parallel") && err.contains("image tokens (9)"),
            "rank {rank}: {err}"
        );
    }
    assert!(!run.join("checkpoints").exists());
    assert!(!run.join("eval.jsonl").exists());
}

#[test]
fn a_tree_rollout_shared_by_two_processes_trains_like_one() {
    let dir = common::temp_dir("dist", "tree");
    let (one, two) = (dir.join("one"), dir.join("two"));
    // roots of 4 leaves; each process holds one root of every 8-sample window
    let tree = [
        "--set",
        "sampler.tree={branches=2,at=[1,3]}",
        "--set",
        "optim.update_batching=\"rollout\"",
        "--set",
        "sampler.rollout_batch=4",
        "--set",
        "run.iterations=1",
    ];
    check(
        bin()
            .args(["train", "--out", one.to_str().unwrap()])
            .args(RUN)
            .args(tree)
            .output()
            .unwrap(),
        "one process",
    );
    for (rank, o) in spawn_world(2, &two, &tree).into_iter().enumerate() {
        check(o, &format!("rank {rank}"));
    }
    let (m1, m2) = (metrics(&one), metrics(&two));
    for key in ["rewards", "advantage", "transformer_rows"] {
        assert_eq!(m1[0][key], m2[0][key], "{key}");
    }
    // 4 roots of 1 + 1 + 2 + 2 + 4 + 4 + 4 + 4 = 22 states over 8 steps in the
    // rollout; the update re-evaluates the states of each root's 4 trained steps (6 to 16)
    let rows = m1[0]["transformer_rows"].as_u64().unwrap();
    assert!((4 * (22 + 6)..=4 * (22 + 16)).contains(&rows), "{rows}");
    // the second window starts from weights that differ in their last bits
    for key in ["loss", "ratio_mean"] {
        let (a, b) = (m1[0][key].as_f64().unwrap(), m2[0][key].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1e-6),
            "{key}: {a} and {b}"
        );
    }
    let diff = weight_difference(&one, &two, 1);
    assert!(
        diff < 1e-5,
        "weights after iteration 1 differ by {diff:.2e}"
    );
}

/// The first window's graphs kept from the rollout by each of two processes
/// (each holds 4 of the window's 8 samples, in a rollout batch with 4 of the
/// next window's) train exactly like recomputing them: the same metrics and
/// weights bit for bit, with the window's forward passes left out.
#[test]
fn two_processes_keep_the_first_window_from_the_rollout_exactly() {
    let dir = common::temp_dir("dist", "rollout-graphs");
    let (recompute, kept) = (dir.join("recompute"), dir.join("kept"));
    let common = [
        "--set",
        "run.iterations=2",
        "--set",
        "optim.activation_checkpointing=\"off\"",
    ];
    for (out, first) in [(&recompute, "recompute"), (&kept, "rollout_graphs")] {
        let first = format!("optim.first_window=\"{first}\"");
        let extra = [&common[..], &["--set", first.as_str()]].concat();
        for (rank, o) in spawn_world(2, out, &extra).into_iter().enumerate() {
            check(o, &format!("{first}, rank {rank}"));
        }
    }
    let (m1, m2) = (metrics(&recompute), metrics(&kept));
    assert_eq!((m1.len(), m2.len()), (2, 2));
    for it in 0..2 {
        for key in ["rewards", "advantage", "loss", "ratio_mean", "grad_norm"] {
            assert_eq!(m1[it][key], m2[it][key], "iteration {it}: {key}");
        }
        let rows = |m: &serde_json::Value| m["transformer_rows"].as_u64().unwrap();
        let fewer = rows(&m1[it]) - rows(&m2[it]);
        assert!(
            fewer > 0 && fewer % 8 == 0,
            "iteration {it}: {fewer} rows fewer"
        );
    }
    assert_eq!(weight_difference(&recompute, &kept, 2), 0.0);
}

/// `dancegrpo generate` of 2 images of run `run` into `out`.
fn generate_args<'a>(run: &'a str, out: &'a str) -> [&'a str; 7] {
    ["generate", "--run", run, "--images", "2", "--out", out]
}

#[test]
fn generate_with_sequence_parallelism_draws_the_single_process_images() {
    let dir = common::temp_dir("dist", "ulysses");
    let run = dir.join("run");
    let run_s = run.to_str().unwrap();
    check(
        bin()
            .args(["train", "--out", run_s, "--threads", "1"])
            .args(["--set", "run.iterations=1", "--set", "eval.every=0"])
            .output()
            .unwrap(),
        "the run",
    );
    let generate = |out| generate_args(run_s, out);
    let one = dir.join("one.png");
    let single = check(
        bin()
            .args(generate(one.to_str().unwrap()))
            .output()
            .unwrap(),
        "one process",
    );
    // two processes as torchrun starts them, each holding half of the image tokens
    let two = dir.join("two.png");
    let two_s = two.to_str().unwrap();
    let parallel = [
        &generate(two_s)[..],
        &["--sequence-parallel", "2", "--threads", "1"],
    ]
    .concat();
    let outs = common::run_world(2, &parallel);
    for (rank, o) in outs.into_iter().enumerate() {
        let o = check(o, &format!("rank {rank}"));
        // rank 0 reports; the images and their reward are the single process's
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        assert_eq!(text.contains("mean reward"), rank == 0, "{text}");
        if rank == 0 {
            let reward = |t: &str| {
                t.split("mean reward ")
                    .nth(1)
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap()
                    .to_string()
            };
            assert_eq!(
                reward(&text),
                reward(&String::from_utf8_lossy(&single.stdout))
            );
        }
    }
    assert_eq!(std::fs::read(&one).unwrap(), std::fs::read(&two).unwrap());
    // without the processes it names: refused, naming torchrun
    let o = bin()
        .args(generate(two.to_str().unwrap()))
        .args(["--sequence-parallel", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("torchrun --no-python --nproc-per-node 2"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_generate_times_sequence_parallelism_against_one_process() {
    let args = [
        "bench",
        "generate",
        "tiny",
        "--steps",
        "6",
        "--images",
        "2",
        "--rounds",
        "1",
        "--threads",
        "1",
        "--sequence-parallel",
        "2",
        "--cache",
        "fast={kind=\"steps\",threshold=0.3}",
    ];
    let outs = common::run_world(2, &args);
    let mut lines = Vec::new();
    for (rank, o) in outs.into_iter().enumerate() {
        let o = check(o, &format!("rank {rank}"));
        lines.push(String::from_utf8_lossy(&o.stdout).to_string());
    }
    // process 0 reports
    assert!(lines[1].is_empty(), "{}", lines[1]);
    let json: serde_json::Value = serde_json::from_str(lines[0].lines().last().unwrap()).unwrap();
    let f = json["figures"].as_array().unwrap();
    let rows: Vec<(&str, i64)> = (f.iter())
        .map(|x| {
            (
                x["label"].as_str().unwrap(),
                x["processes"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, [("none", 1), ("sequence-parallel 2", 2), ("fast", 2)]);
    // two processes draw the one-process images (to summation order)
    let rel = f[1]["latent_rel_l2"].as_f64().unwrap();
    assert!(rel < 1e-6, "{rel}");
    assert!(f[1]["speedup"].as_f64().unwrap() > 0.0);
    assert!(f[2]["skipped_steps"].as_i64().unwrap() > 0);
    // a block cache cannot be shared: refused, naming the setting
    let blocks = [&args[..13], &["--cache", "seed"]].concat();
    for o in common::run_world(2, &blocks) {
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            !o.status.success() && err.contains("seed") && err.contains("block cache"),
            "{err}"
        );
    }
}

#[test]
fn torchrun_launches_training() {
    // `torchrun` is `python -m torch.distributed.run` (its script's shebang may
    // name the environment's build directory)
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if !python.exists() {
        eprintln!("skipped: no {} (run through ./dev.sh)", python.display());
        return;
    }
    let out = common::temp_dir("dist", "torchrun").join("run");
    let o = Command::new(&python)
        .args([
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--no-python",
        ])
        .arg(env!("CARGO_BIN_EXE_dancegrpo"))
        .args([
            "train",
            "--out",
            out.to_str().unwrap(),
            "--dist-timeout",
            "60",
        ])
        .args(RUN)
        .args(["--set", "run.iterations=2"])
        .output()
        .unwrap();
    check(o, "torchrun");
    assert_eq!(metrics(&out).len(), 2);
    assert!(out.join("checkpoints/iter-000002/state.json").is_file());
}

#[test]
fn process_counts_that_cannot_share_a_step_and_bad_launches_are_named() {
    let dir = common::temp_dir("dist", "bad");
    // rank 0 of `world` processes: refused before joining, naming the field
    let refused = |world: &str, extra: &[&str], needle: &str| {
        let o = bin()
            .args(["train", "--out", dir.join("r").to_str().unwrap()])
            .args(RUN)
            .args(extra)
            .env("WORLD_SIZE", world)
            .env("RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains("optim.gradient_accumulation") && err.contains(needle),
            "{err}"
        );
    };
    // 8 samples per step cannot be split among 3 processes
    refused("3", &[], "3 processes");
    // a tree's roots of 8 leaves cannot be shared by 2 processes of 4 samples per step
    let tree = [
        "--set",
        "sampler.tree={branches=2,at=[1,3,5]}",
        "--set",
        "optim.update_batching=\"rollout\"",
    ];
    refused("2", &tree, "whole roots");
    let o = bin()
        .args(["train", "--out", dir.join("r").to_str().unwrap()])
        .args(RUN)
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .env_remove("MASTER_ADDR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("MASTER_ADDR"), "{err}");
    assert!(!dir.join("r/checkpoints").exists());
}
