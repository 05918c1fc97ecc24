//! Where `dancegrpo train` takes its prompts from: the reference's directory
//! read in place (bit-identical to training on its conversion; missing files
//! and wrong widths named), and a held-out evaluation prompt set (`eval.data`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::write_reference;
use dancegrpo::io::safetensors::SafetensorsFile;
use dancegrpo::train::config::DataSource;
use dancegrpo::train::evaluate::EvalPromptSet;
use dancegrpo::train::trainer::build_prompts;
use dancegrpo::train::{Resume, TrainConfig, Trainer};
use tch::Device;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dancegrpo-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Three tiny iterations into `out` with `data.kind = kind`, `data.path = data`.
fn train(out: &Path, extra: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
        .args(["train", "--threads", "1", "--out", s(out)])
        .args([
            "--set",
            "run.iterations=3",
            "--set",
            "run.checkpoint_every=3",
        ])
        .args(["--set", "run.image_every=0", "--set", "eval.prompts=2"])
        .args(["--set", "run.tensorboard=false"])
        .args(extra.iter().flat_map(|e| ["--set", e.as_str()]))
        .output()
        .unwrap()
}

fn ok(o: Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn fails(o: Output) -> String {
    assert!(!o.status.success(), "should fail");
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn data(section: &str, kind: &str, path: &Path) -> Vec<String> {
    vec![
        format!("{section}.kind=\"{kind}\""),
        format!("{section}.path=\"{}\"", s(path)),
    ]
}

/// metrics.jsonl without the wall-clock fields.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    jsonl(&dir.join("metrics.jsonl"))
        .into_iter()
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("images_per_second");
            v
        })
        .collect()
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn final_weights(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let path = dir.join("checkpoints/iter-000003/transformer/diffusion_pytorch_model.safetensors");
    let f = SafetensorsFile::open(&path).unwrap();
    f.names()
        .map(|n| (n.to_string(), f.bytes(n).unwrap().to_vec()))
        .collect()
}

#[test]
fn a_reference_directory_trains_in_place_like_its_conversion() {
    let root = temp_dir("reference");
    let refdir = root.join("ref");
    // 6 prompts of the tiny model's widths (d 32, p 4), Lt 8, bf16 views
    let _ = write_reference(&refdir, 6, 8, 32, 4);
    let ds = root.join("ds");
    ok(Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
        .args([
            "preprocess",
            "--threads",
            "1",
            "--from-reference",
            s(&refdir),
            "--out",
            s(&ds),
        ])
        .output()
        .unwrap());
    let (in_place, converted) = (root.join("in-place"), root.join("converted"));
    ok(train(&in_place, &data("data", "reference", &refdir)));
    ok(train(&converted, &data("data", "dataset", &ds)));
    assert_eq!(metrics(&in_place).len(), 3);
    assert_eq!(metrics(&in_place), metrics(&converted), "metrics differ");
    assert_eq!(
        jsonl(&in_place.join("eval.jsonl")),
        jsonl(&converted.join("eval.jsonl"))
    );
    assert!(
        final_weights(&in_place) == final_weights(&converted),
        "weights differ"
    );
    let config = std::fs::read_to_string(in_place.join("config.toml")).unwrap();
    assert!(config.contains("kind = \"reference\""), "{config}");
    assert!(
        !in_place.join("tensorboard").exists(),
        "run.tensorboard = false"
    );

    // a missing .pt is named with its list entry when the prompt is read
    std::fs::remove_file(refdir.join("pooled_prompt_embeds/3.pt")).unwrap();
    let e = fails(train(
        &root.join("missing"),
        &data("data", "reference", &refdir),
    ));
    assert!(
        e.contains("pooled_prompt_embeds/3.pt") && e.contains("item 3 of videos2caption.json"),
        "{e}"
    );
    // checked at start: the index file, the directory, the widths
    std::fs::remove_file(refdir.join("videos2caption.json")).unwrap();
    let e = fails(train(
        &root.join("noindex"),
        &data("data", "reference", &refdir),
    ));
    assert!(
        e.contains("data.path") && e.contains("videos2caption.json is missing"),
        "{e}"
    );
    let e = fails(train(
        &root.join("nodir"),
        &data("data", "reference", &root.join("nothing")),
    ));
    assert!(
        e.contains("data.path") && e.contains("no such directory"),
        "{e}"
    );
    let wide = root.join("wide");
    let _ = write_reference(&wide, 2, 6, 8, 4);
    let e = fails(train(
        &root.join("wide-run"),
        &data("data", "reference", &wide),
    ));
    assert!(
        e.contains("data.path") && e.contains("width 8") && e.contains("joint_attention_dim 32"),
        "{e}"
    );
    let e = fails(train(
        &root.join("eval-wide"),
        &data("eval.data", "reference", &wide),
    ));
    assert!(e.contains("eval.data.path") && e.contains("width 8"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_held_out_eval_set_is_never_the_training_set() {
    let root = temp_dir("eval");
    let held_out = [
        "eval.data.kind=\"synthetic\"".to_string(),
        "eval.data.prompts=4".into(),
        "eval.data.seed=7".into(),
    ];
    // the trainer's evaluation prompts: the held-out set, not the first training prompts
    let cfg = TrainConfig::tiny_demo()
        .with_overrides(&held_out, Path::new("test"))
        .unwrap();
    let trainer = Trainer::new(cfg.clone(), &root.join("lib"), Resume::Fresh, Device::Cpu).unwrap();
    let (eval, which) = trainer.eval_prompts();
    assert_eq!((which, eval.len()), (EvalPromptSet::HeldOut, 4));
    let training = build_prompts(&cfg, trainer.model()).unwrap();
    for i in 0..eval.len() {
        let e = eval.get(i).unwrap();
        for j in 0..training.len() {
            assert!(
                !e.text.equal(&training.get(j).unwrap().text),
                "eval {i} = training {j}"
            );
        }
    }
    let default = TrainConfig::tiny_demo();
    let trainer = Trainer::new(default, &root.join("lib2"), Resume::Fresh, Device::Cpu).unwrap();
    let (eval, which) = trainer.eval_prompts();
    assert_eq!(which, EvalPromptSet::Training);
    assert!(eval
        .get(0)
        .unwrap()
        .text
        .equal(&training.get(0).unwrap().text));

    // whole runs: evaluation differs, training does not
    let (plain, separate) = (root.join("plain"), root.join("held-out"));
    ok(train(&plain, &[]));
    ok(train(&separate, &held_out));
    assert_eq!(
        metrics(&plain),
        metrics(&separate),
        "evaluation changed training"
    );
    let (a, b) = (
        jsonl(&plain.join("eval.jsonl")),
        jsonl(&separate.join("eval.jsonl")),
    );
    assert_eq!(a.len(), 2);
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(a["iteration"], b["iteration"]);
        assert_ne!(a["reward_mean"], b["reward_mean"], "{a} vs {b}");
        assert_eq!(
            (a["prompt_set"].as_str(), b["prompt_set"].as_str()),
            (Some("training"), Some("held_out"))
        );
        assert_eq!(b["prompts"], 2);
    }
    let config = std::fs::read_to_string(separate.join("config.toml")).unwrap();
    let resolved: TrainConfig = TrainConfig::load(&separate.join("config.toml"), &[]).unwrap();
    assert_eq!(
        resolved.eval.data,
        Some(DataSource::Synthetic {
            prompts: 4,
            seed: 7,
            text_len: 32
        }),
        "{config}"
    );

    // validated like [data]
    let e = fails(train(
        &root.join("bad"),
        &data("eval.data", "dataset", &root.join("nothing")),
    ));
    assert!(
        e.contains("eval.data.path") && e.contains("no such directory"),
        "{e}"
    );
    let e = fails(train(
        &root.join("bad2"),
        &["eval.data.kind=\"dataset\"".into()],
    ));
    assert!(e.contains("`eval.data.path`: missing field"), "{e}");
    let e = fails(train(
        &root.join("bad3"),
        &[
            held_out[0].clone(),
            "eval.data.prompts=0".into(),
            "eval.data.seed=1".into(),
        ],
    ));
    assert!(e.contains("eval.data.prompts") && e.contains("1..="), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}
