//! Bad checkpoints and configs give clear errors naming the file and the problem.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dancegrpo::io::safetensors::{write_safetensors, SafetensorsFile};
use dancegrpo::models::flux::{FluxConfig, FluxTransformer};
use dancegrpo::models::vae::Vae;
use dancegrpo::models::VelocityModel;
use dancegrpo::weights::Source;
use tch::{Device, Kind, Tensor};

fn tiny_model_dir(name: &str) -> PathBuf {
    let dir = common::temp_dir(name);
    let model = FluxTransformer::new(
        FluxConfig::tiny(),
        Source::Seeded(9),
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    model.save_dir(&dir).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match FluxTransformer::from_dir(dir, Kind::Float, Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn weights_path(dir: &Path) -> PathBuf {
    dir.join("diffusion_pytorch_model.safetensors")
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let file = SafetensorsFile::open(weights_path(dir)).unwrap();
    let mut tensors: Vec<(String, Tensor)> = file
        .names()
        .map(|n| (n.to_string(), file.tensor(n).unwrap()))
        .collect();
    drop(file);
    edit(&mut tensors);
    write_safetensors(weights_path(dir), &tensors, &BTreeMap::new()).unwrap();
}

#[test]
fn missing_directory_and_files() {
    let err = load_err(Path::new("/nonexistent/transformer"));
    assert!(err.contains("/nonexistent/transformer"), "{err}");
    let dir = tiny_model_dir("missing-file");
    std::fs::remove_file(weights_path(&dir)).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("config.json"), "{err}");
    let err = Vae::from_dir(&dir.join("vae"), Kind::Float, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("vae"), "{err}");
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let dir = tiny_model_dir("missing-tensor");
    rewrite_weights(&dir, |t| {
        t.retain(|(n, _)| n != "single_transformer_blocks.1.proj_mlp.bias")
    });
    let err = load_err(&dir);
    assert!(
        err.contains("missing tensor `single_transformer_blocks.1.proj_mlp.bias`"),
        "{err}"
    );

    let dir = tiny_model_dir("extra-tensor");
    rewrite_weights(&dir, |t| {
        t.push((
            "lora.up.weight".into(),
            Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
        ))
    });
    let err = load_err(&dir);
    assert!(
        err.contains("unexpected") && err.contains("lora.up.weight"),
        "{err}"
    );
}

#[test]
fn shape_mismatch_names_expected_and_found() {
    let dir = tiny_model_dir("shape");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["joint_attention_dim"] = 16.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("`context_embedder.weight` has shape [32, 32], expected [32, 16]"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = tiny_model_dir("truncated");
    let bytes = std::fs::read(weights_path(&dir)).unwrap();
    std::fs::write(weights_path(&dir), &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(weights_path(&dir), &bytes[..4]).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("shorter than the 8-byte header"), "{err}");
}

#[test]
fn unsupported_or_malformed_config_values() {
    let dir = tiny_model_dir("config");
    let path = dir.join("config.json");
    let good = std::fs::read_to_string(&path).unwrap();
    for (field, value, needle) in [
        ("patch_size", serde_json::json!(2), "field `patch_size`"),
        (
            "axes_dims_rope",
            serde_json::json!([4, 4, 4]),
            "field `axes_dims_rope`",
        ),
        (
            "num_layers",
            serde_json::json!("two"),
            "field `num_layers`: invalid type: string \"two\"",
        ),
        (
            "_class_name",
            serde_json::json!("UNet2DConditionModel"),
            "field `_class_name`",
        ),
    ] {
        let mut cfg: serde_json::Value = serde_json::from_str(&good).unwrap();
        cfg[field] = value;
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = load_err(&dir);
        assert!(
            err.contains(needle) && err.contains("config.json"),
            "{field}: {err}"
        );
    }
    std::fs::write(&path, "{ not json").unwrap();
    assert!(load_err(&dir).contains("invalid JSON"));
}

#[test]
fn sharded_checkpoint_with_index_loads() {
    let dir = tiny_model_dir("sharded");
    let file = SafetensorsFile::open(weights_path(&dir)).unwrap();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let tensors: Vec<(String, Tensor)> = part
            .iter()
            .map(|n| (n.clone(), file.tensor(n).unwrap()))
            .collect();
        write_safetensors(dir.join(shard), &tensors, &BTreeMap::new()).unwrap();
        for n in part {
            map.insert(n.clone(), shard.into());
        }
    }
    drop(file);
    std::fs::remove_file(weights_path(&dir)).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let model = FluxTransformer::from_dir(&dir, Kind::Float, Device::Cpu).unwrap();
    let reference = FluxTransformer::new(
        FluxConfig::tiny(),
        Source::Seeded(9),
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    for ((n, p), (_, q)) in model.parameters().iter().zip(reference.parameters()) {
        assert!(p.equal(&q), "{n}");
    }
    let bf16 = FluxTransformer::from_dir(&dir, Kind::BFloat16, Device::Cpu).unwrap();
    assert!(bf16
        .parameters()
        .iter()
        .all(|(_, p)| p.kind() == Kind::BFloat16));
    // an index naming a file outside the directory is refused before it is opened
    let first = map.keys().next().unwrap().clone();
    for outside in ["../../x.safetensors", "/etc/passwd", "sub/../x.safetensors"] {
        let mut bad = map.clone();
        bad.insert(first.clone(), outside.into());
        let index = serde_json::json!({"metadata": {}, "weight_map": bad});
        let path = dir.join("diffusion_pytorch_model.safetensors.index.json");
        std::fs::write(&path, index.to_string()).unwrap();
        let err = load_err(&dir);
        assert!(
            err.contains(&format!("shard `{outside}`, not a file name inside")),
            "{err}"
        );
    }
}
