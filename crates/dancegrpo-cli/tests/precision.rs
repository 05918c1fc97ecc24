//! `[precision]` through the real binary: the demo trains in bf16 mixed
//! precision (bfloat16 compute, float32 master weights and optimizer state).

use std::path::PathBuf;
use std::process::Command;

use dancegrpo::io::safetensors::SafetensorsFile;
use tch::Kind;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dancegrpo-prec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn the_demo_reward_rises_in_bf16_with_float32_master_weights() {
    let dir = temp_dir("demo-bf16");
    let out = Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
        .args(["demo", "--out", dir.to_str().unwrap(), "--threads", "2"])
        .args(["--set", "precision.mode=bf16"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rewards: Vec<f64> = std::fs::read_to_string(dir.join("rewards.txt"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let rise = mean(&rewards[rewards.len() - 10..]) - mean(&rewards[..10]);
    assert!(rise >= 1.0, "bf16 reward rose by {rise}");
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(config.contains("[precision]\nmode = \"bf16\""), "{config}");
    // the trained weights and the AdamW moments are float32
    let ck = dir.join("checkpoints/iter-000150");
    let weights =
        SafetensorsFile::open(ck.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let optim = SafetensorsFile::open(ck.join("optimizer.safetensors")).unwrap();
    for file in [&weights, &optim] {
        let names: Vec<String> = file.names().map(str::to_string).collect();
        assert!(!names.is_empty());
        for name in names {
            let t = file.tensor(&name).unwrap();
            if t.is_floating_point() {
                assert_eq!(t.kind(), Kind::Float, "{name}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
