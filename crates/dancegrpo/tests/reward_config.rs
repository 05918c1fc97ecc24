//! Rewards in the training configuration: every kind parses, bad values name
//! their field, and a training step runs with two rewards mixed at advantage level.

mod common;

use std::path::Path;

use dancegrpo::grpo::RewardMixing;
use dancegrpo::rewards::remote::LoopbackServer;
use dancegrpo::rewards::spec::RewardSpec;
use dancegrpo::train::trainer::build_rewards;
use dancegrpo::train::{Resume, TrainConfig, Trainer};
use tch::Device;

const BASE: &str = r#"
[model]
kind = "tiny"
seed = 0
[data]
kind = "synthetic"
prompts = 4
seed = 0
"#;

fn load(dir: &Path, rewards: &str, overrides: &[&str]) -> dancegrpo::error::Result<TrainConfig> {
    let path = dir.join("run.toml");
    std::fs::write(&path, format!("{BASE}{rewards}")).unwrap();
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    TrainConfig::load(&path, &o)
}

#[test]
fn every_reward_kind_parses_and_round_trips() {
    let dir = common::temp_dir("reward-config");
    let cfg = load(
        &dir,
        r#"
[[rewards]]
kind = "hpsv2"
path = "/models/hps"
weight = 0.7
[[rewards]]
kind = "clip_score"
path = "/models/clip"
scale = "torchmetrics"
[[rewards]]
kind = "pickscore"
path = "/models/pickscore"
weight = 0.2
[[rewards]]
kind = "remote"
url = "http://127.0.0.1:8000/score"
timeout_s = 5.0
retries = 4
[[rewards]]
kind = "jpeg"
objective = "incompressibility"
[grpo]
reward_mixing = "advantage"
"#,
        &[],
    )
    .unwrap();
    assert_eq!(cfg.rewards.len(), 5);
    assert_eq!(cfg.grpo.reward_mixing, RewardMixing::Advantage);
    assert_eq!(cfg.rewards[0].weight(), 0.7);
    assert_eq!(cfg.rewards[1].weight(), 1.0);
    match &cfg.rewards[3] {
        RewardSpec::Remote {
            timeout_s,
            retries,
            backoff_s,
            ..
        } => assert_eq!((*timeout_s, *retries, *backoff_s), (5.0, 4, 0.5)),
        other => panic!("{other:?}"),
    }
    let again = cfg.with_overrides(&[], Path::new("x")).unwrap();
    assert_eq!(again, cfg);
    assert!(cfg.to_toml().contains("reward_mixing = \"advantage\""));
}

#[test]
fn bad_reward_values_name_their_field() {
    let dir = common::temp_dir("reward-config-bad");
    let err =
        |rewards: &str, overrides: &[&str]| load(&dir, rewards, overrides).unwrap_err().to_string();
    let remote = "[[rewards]]\nkind = \"remote\"\nurl = \"http://127.0.0.1:1/x\"\n";
    let e = err(
        remote,
        &["rewards=[{kind=\"remote\", url=\"https://h/x\", timeout_s=0.0}]"],
    );
    assert!(
        e.contains("rewards[0].timeout_s") && e.contains("(0, 86400]"),
        "{e}"
    );
    // unbounded retries (the issue's 1000000) and budgets are refused
    let many = format!("{remote}retries = 1000000\n");
    let e = err(&many, &[]);
    assert!(
        e.contains("rewards[0].retries") && e.contains("at most 10"),
        "{e}"
    );
    let e = err(&format!("{remote}budget_s = inf\n"), &[]);
    assert!(e.contains("rewards[0].budget_s"), "{e}");
    let e = err("[[rewards]]\nkind = \"remote\"\nurl = \"ftp://h/x\"\n", &[]);
    assert!(e.contains("rewards[0].url"), "{e}");
    let e = err("[[rewards]]\nkind = \"hpsv2\"\n", &[]);
    assert!(e.contains("rewards[0]") && e.contains("path"), "{e}");
    let e = err("[[rewards]]\nkind = \"aesthetic\"\npath = \"/x\"\n", &[]);
    assert!(e.contains("rewards[0]") && e.contains("aesthetic"), "{e}");
    let e = err(
        &format!("{remote}[grpo]\nreward_mixing = \"product\"\n"),
        &[],
    );
    assert!(e.contains("grpo.reward_mixing"), "{e}");
    let e = err(
        "[[rewards]]\nkind = \"pickscore\"\npath = \"/x\"\nweight = \"heavy\"\n",
        &[],
    );
    // (serde buffers a tagged entry, so the path stops at the entry; the message names the value)
    assert!(
        e.contains("rewards[0]") && e.contains("\"heavy\", expected f64"),
        "{e}"
    );
    // a directory that does not exist: the error names the field and the directory
    let cfg = load(
        &dir,
        "[[rewards]]\nkind = \"jpeg\"\nobjective = \"compressibility\"\n[[rewards]]\nkind = \"hpsv2\"\npath = \"/no/such/hps\"\n",
        &[],
    )
    .unwrap();
    let e = build_rewards(&cfg, Device::Cpu).err().unwrap().to_string();
    assert!(
        e.contains("rewards[1].path") && e.contains("/no/such/hps"),
        "{e}"
    );
}

#[test]
fn a_training_step_mixes_two_rewards_at_advantage_level() {
    let server = LoopbackServer::echo().unwrap();
    let dir = common::temp_dir("reward-mixing-run");
    let mut cfg = TrainConfig::tiny_demo();
    cfg.rewards.push(RewardSpec::Remote {
        url: server.url(),
        timeout_s: 10.0,
        retries: 0,
        backoff_s: 0.0,
        budget_s: 60.0,
        ca_file: None,
        allow_plain_http: false,
        weight: 0.5,
    });
    cfg.grpo.reward_mixing = RewardMixing::Advantage;
    cfg.run.iterations = 1;
    cfg.run.image_every = 0;
    let cfg = cfg.with_overrides(&[], Path::new("test")).unwrap();
    let mut trainer = Trainer::new(cfg, &dir, Resume::Fresh, Device::Cpu).unwrap();
    let m = trainer.step().unwrap();
    let names: Vec<&str> = m.rewards.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["jpeg_compressibility", "remote"]);
    // the echo service scores item i of the batch of 16 as i: mean 7.5
    assert_eq!(m.rewards[1].1, 7.5);
    assert_eq!(m.failed_rewards, 0);
    assert_eq!(server.requests(), 1);
}
