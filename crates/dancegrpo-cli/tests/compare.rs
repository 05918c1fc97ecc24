//! `dancegrpo compare` end to end on the tiny model: built-in methods and a
//! config file side by side on the same seeds, the report's files and
//! figures, finished runs reused, and bad method lists refused.

mod common;

use std::path::Path;

use common::{assert_ok, bin, metrics, temp_dir};
use dancegrpo::train::TrainConfig;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn compare_reports_methods_side_by_side_and_reuses_finished_runs() {
    let dir = temp_dir("compare", "runs");
    // a config file: the demo under LoRA with a KL term to the base model
    let sets = [
        "optim.lora={rank=4,alpha=4.0}".to_string(),
        "grpo.kl_beta=0.5".to_string(),
    ];
    let kl = TrainConfig::tiny_demo()
        .with_overrides(&sets, Path::new("test"))
        .unwrap();
    let file = dir.join("lora-kl.toml");
    std::fs::write(&file, kl.to_toml()).unwrap();
    let out = dir.join("report");
    let args = [
        "compare",
        "dancegrpo",
        "flow-grpo-fast",
        "branch-grpo",
        file.to_str().unwrap(),
        "--iterations",
        "2",
        "--seeds",
        "2",
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    let first = bin().args(args).output().unwrap();
    assert_ok(&first);
    let report = json(&out.join("compare.json"));
    let methods = report["methods"].as_array().unwrap();
    let names: Vec<&str> = methods
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["dancegrpo", "flow-grpo-fast", "branch-grpo", "lora-kl"]
    );
    // 16 samples of 8 steps; 4 trained transitions, a window of 2, 4 plus 4 reference forwards
    let calls: Vec<f64> = methods
        .iter()
        .map(|m| m["calls_per_iteration"].as_f64().unwrap())
        .collect();
    assert_eq!([calls[0], calls[1], calls[3]], [192.0, 160.0, 256.0]);
    // the tree: per group 1 + 1 + 2 + 2 + 4 + 4 + 8 + 8 = 30 states in the rollout;
    // the update re-evaluates the states of its root's 4 trained steps (6 to 18 rows)
    assert!(
        (2.0 * (30.0 + 6.0)..=2.0 * (30.0 + 18.0)).contains(&calls[2]),
        "{calls:?}"
    );
    for m in methods {
        assert_eq!(m["curve"].as_array().unwrap().len(), 2);
        assert_eq!(m["last"]["n"], 2);
    }
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("| flow-grpo-fast |"), "{stdout}");
    assert!(std::fs::metadata(out.join("compare.png")).unwrap().len() > 1000);
    // the same seed: the same prompts and noise; LoRA starts at the base model,
    // so its first iteration is DanceGRPO's bit for bit; other seeds differ
    let run = |m: &str, s: u64| metrics(&out.join(m).join(format!("seed{s}")));
    let (dance, lora) = (run("dancegrpo", 0), run("lora-kl", 0));
    assert_eq!(dance[0]["reward_mean"], lora[0]["reward_mean"]);
    assert_ne!(
        dance[0]["reward_mean"],
        run("dancegrpo", 1)[0]["reward_mean"]
    );
    // the KL is exactly 0 until the adapters have moved (one optimizer step per iteration)
    assert_eq!(lora[0]["kl"].as_f64(), Some(0.0));
    assert!(lora[1]["kl"].as_f64().unwrap() > 0.0, "{}", lora[1]);
    assert_eq!(dance[1]["kl"].as_f64(), Some(0.0));

    // run again: every finished run is reused, the report is the same
    let again = bin().args(args).output().unwrap();
    assert_ok(&again);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(stderr.matches("reused").count(), 8, "{stderr}");
    assert_eq!(json(&out.join("compare.json")), report);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_method_lists_are_refused_naming_the_method() {
    let dir = temp_dir("compare", "bad");
    let out = dir.to_str().unwrap();
    for (methods, needle) in [
        (
            vec!["grpo-zero"],
            "`grpo-zero` is neither a config file nor a built-in method",
        ),
        (
            vec!["mixgrpo", "mixgrpo"],
            "two methods are named `mixgrpo`",
        ),
    ] {
        let o = bin()
            .arg("compare")
            .args(&methods)
            .args(["--iterations", "1", "--seeds", "1", "--out", out])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{methods:?}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains(needle), "{stderr}");
    }
    let o = bin()
        .args([
            "compare",
            "mixgrpo",
            "--set",
            "sampler.window={size=9}",
            "--out",
            out,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("sampler.window.size"));
    std::fs::remove_dir_all(&dir).unwrap();
}
