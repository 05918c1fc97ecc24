//! Runs that go wrong stop with an error instead of finishing with exit 0:
//! a non-finite optimizer state (non-finite weights: `hostile_inputs.rs`), failing rewards, a second process
//! on the same run directory, failed image writes, a run too big to fit.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, temp_dir};
use dancegrpo::io::safetensors::SafetensorsFile;
use dancegrpo::rewards::remote::{LoopbackServer, Reply};

fn train(out: &Path, args: &[&str]) -> Output {
    bin()
        .args(["train", "--threads", "1", "--out", out.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_nan_optimizer_state_is_refused_on_resume() {
    let root = temp_dir("health", "nan-optimizer");
    let out = root.join("run");
    let o = train(
        &out,
        &["--set", "run.iterations=2", "--set", "run.image_every=0"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let opt = out.join("checkpoints/iter-000002/optimizer.safetensors");
    let name = {
        let f = SafetensorsFile::open(&opt).unwrap();
        let n = f.names().find(|n| n.starts_with("exp_avg_sq.")).unwrap();
        n.to_string()
    };
    common::poison_tensor(&opt, &name);
    let o = train(&out, &["--resume", "--set", "run.iterations=3"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("`{name}` holds non-finite")), "{err}");
    assert!(err.contains("iter-000002"), "{err}");
    assert!(!out.join("checkpoints/iter-000003").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

/// A loopback server's answer to request `i` with body `b`.
type Handler = dyn Fn(usize, &[u8]) -> Reply + Send + Sync;

/// The tiny run with one remote reward at `url`.
fn remote_run(out: &Path, url: &str, extra: &[&str]) -> Output {
    let reward = format!(
        "rewards=[{{kind=\"remote\", url=\"{url}\", timeout_s=2.0, retries=1, backoff_s=0.01}}]"
    );
    let args = [&["--set", &reward, "--set", "run.iterations=2"][..], extra].concat();
    train(out, &args)
}

#[test]
fn a_reward_that_fails_for_every_item_stops_the_run_and_writes_no_zero() {
    let root = temp_dir("health", "remote-fails");
    let cases: Vec<(&str, Box<Handler>, &str)> = vec![
        (
            "http-500",
            Box::new(|_, _| Reply {
                status: 500,
                body: "down".into(),
                delay: Duration::ZERO,
                location: None,
            }),
            "HTTP 500",
        ),
        (
            "nulls",
            Box::new(|_, _| {
                let scores = vec![serde_json::Value::Null; 16];
                Reply::ok(serde_json::json!({ "scores": scores }).to_string())
            }),
            "null",
        ),
        (
            "count",
            Box::new(|_, _| Reply::ok(r#"{"scores": [1.0]}"#.into())),
            "1 scores for 16 images",
        ),
        (
            "hangs",
            Box::new(|_, _| Reply {
                status: 200,
                body: "{}".into(),
                delay: Duration::from_secs(5),
                location: None,
            }),
            "2 attempt(s)",
        ),
    ];
    for (name, handler, cause) in cases {
        let server = LoopbackServer::start(handler).unwrap();
        let out = root.join(name);
        let start = Instant::now();
        let o = remote_run(&out, &server.url(), &[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains("rewards of `remote` failed") && err.contains(cause),
            "{name}: {err}"
        );
        assert!(err.contains("run stopped at iteration 1"), "{name}: {err}");
        let rewards = std::fs::read_to_string(out.join("rewards.txt")).unwrap_or_default();
        assert!(
            rewards.trim().is_empty(),
            "{name}: rewards.txt holds {rewards:?}"
        );
        assert!(!out.join("checkpoints").join("iter-000001").exists());
        assert!(start.elapsed() < Duration::from_secs(30), "{name}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn failed_items_are_left_out_and_shown_as_failures() {
    let root = temp_dir("health", "remote-partial");
    // item 0 of every batch (16 samples) fails; the others score their index
    let server = LoopbackServer::start(|_, body| {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        let n = v["prompts"].as_array().unwrap().len();
        let scores: Vec<Option<usize>> = (0..n).map(|i| (i > 0).then_some(i)).collect();
        Reply::ok(serde_json::json!({ "scores": scores }).to_string())
    })
    .unwrap();
    let out = root.join("run");
    let o = remote_run(&out, &server.url(), &[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("(1 failed)"),
        "the progress line shows the failure: {err}"
    );
    let m = common::metrics(&out);
    assert_eq!(m[0]["failed_rewards"], 1);
    // the mean of 1..=15, not of 0..=15 with a 0 for the failure
    assert_eq!(m[0]["reward_mean"], 8.0);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_second_process_on_the_same_run_directory_is_refused() {
    let root = temp_dir("health", "lock");
    let out = root.join("run");
    let mut first = bin()
        .args(["train", "--threads", "1", "--out", out.to_str().unwrap()])
        .args([
            "--set",
            "run.iterations=100000",
            "--set",
            "run.image_every=0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.join(".lock");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.ends_with('\n')) {
        assert!(
            Instant::now() < deadline,
            "the first run never took the lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = train(&out, &["--resume", "--set", "run.iterations=3"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("in use by process {}", first.id())),
        "{err}"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // a killed holder leaves no stale lock behind
    let o = train(&out, &["--set", "run.iterations=3"]);
    assert!(!stderr(&o).contains("in use"), "{}", stderr(&o));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_failed_image_write_stops_the_run_or_turns_images_off() {
    let root = temp_dir("health", "images");
    for (policy, ok) in [("stop", false), ("disable", true)] {
        let out = root.join(policy);
        // a directory where the first grid goes: writing it fails
        std::fs::create_dir_all(out.join("images/iter-000001.png")).unwrap();
        let set = format!("health.on_image_error=\"{policy}\"");
        let o = train(
            &out,
            &[
                "--set",
                "run.iterations=4",
                "--set",
                "run.image_every=1",
                "--set",
                &set,
            ],
        );
        let err = stderr(&o);
        assert_eq!(o.status.success(), ok, "{policy}: {err}");
        assert!(
            err.contains("writing an image failed") && err.contains("iter-000001.png"),
            "{policy}: {err}"
        );
        if ok {
            assert_eq!(err.matches("writing an image failed").count(), 1, "{err}");
            assert!(
                !out.join("images/iter-000004.png").exists(),
                "images were still written"
            );
        } else {
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert!(err.contains("the last good checkpoint is"), "{err}");
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_run_too_big_for_memory_is_refused_before_anything_is_written() {
    let root = temp_dir("health", "memory");
    let out = root.join("run");
    let size = [
        "--set",
        "sampler.height=16384",
        "--set",
        "sampler.width=16384",
    ];
    let o = train(&out, &size);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("sampler.height, sampler.width"), "{err}");
    assert!(!out.exists(), "the run directory was created");
    let o = train(&out, &[&size[..], &["--dry-run"]].concat());
    assert_eq!(o.status.code(), Some(2), "--dry-run checks the memory too");
    let warn = ["--set", "health.memory_check=\"warn\"", "--dry-run"];
    let o = train(&out, &[&size[..], &warn].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: "), "{}", stderr(&o));
    std::fs::remove_dir_all(&root).unwrap();
}
