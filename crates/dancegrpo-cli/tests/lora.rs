//! LoRA runs end to end: adapters saved in our, diffusers' and peft's layouts,
//! exact resume with EMA, the built-in base written once, and `export
//! --merged` / `--adapters`.

mod common;

use std::path::Path;

use common::{bin, metrics};
use dancegrpo::io::safetensors::SafetensorsFile;

fn temp_dir(name: &str) -> std::path::PathBuf {
    common::temp_dir("lora", name)
}

/// The checkpoint's `adapter_model.safetensors` and `adapter_config.json` have
/// the names, shapes and fields peft 0.13.2 writes for the same LoRA on the same
/// base (`tests/data/peft-lora`, made by `tools/peft_reference.py`; loading one
/// of our checkpoints with `PeftModel.from_pretrained` was also checked by hand:
/// no missing or unexpected keys, every adapted layer equal to W x + 2 B A x),
/// B is not scaled (peft scales), and the run wrote its built-in base once.
fn peft_layout_is_peft_s(ck: &Path, run: &Path) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dancegrpo/tests/data/peft-lora");
    let json = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let want_keys = json(&data.join("keys.json"));
    let ours = SafetensorsFile::open(ck.join("adapter_model.safetensors")).unwrap();
    let mut got = serde_json::Map::new();
    for n in ours.names() {
        got.insert(
            n.to_string(),
            serde_json::json!(ours.tensor(n).unwrap().size()),
        );
    }
    assert_eq!(serde_json::Value::Object(got), want_keys);
    let (cfg, peft) = (
        json(&ck.join("adapter_config.json")),
        json(&data.join("adapter_config.json")),
    );
    let fields = |v: &serde_json::Value| -> std::collections::BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(fields(&cfg), fields(&peft));
    assert_eq!(
        (cfg["r"].as_f64(), cfg["lora_alpha"].as_f64()),
        (Some(4.0), Some(8.0))
    );
    assert_eq!(cfg["peft_type"], "LORA");
    let set = |v: &serde_json::Value| -> std::collections::BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(set(&cfg["target_modules"]), set(&peft["target_modules"]));
    let native = SafetensorsFile::open(ck.join("lora.safetensors")).unwrap();
    let b = "transformer_blocks.0.attn.to_q.lora_B.weight";
    let peft_b = ours.tensor(&format!("base_model.model.{b}")).unwrap();
    assert!(
        peft_b.equal(&native.tensor(b).unwrap()),
        "B is stored unscaled"
    );
    assert!(run.join("base/transformer/config.json").is_file());
    assert!(run
        .join("base/transformer/diffusion_pytorch_model.safetensors")
        .is_file());
}

/// `export --merged` folds the adapters into the run's base (`W + alpha/r B A`:
/// bit-identical to peft's `merge_and_unload`, checked by hand with peft 0.13.2);
/// `--adapters` copies the adapter files; `--out` refuses a LoRA checkpoint.
fn exports_merge_and_copy_the_adapters(ck: &Path, run: &Path, root: &Path) {
    let (merged, adapters) = (root.join("merged"), root.join("adapters"));
    let export = |flag: &str, out: &Path| {
        bin()
            .args(["export", "--checkpoint", ck.to_str().unwrap(), flag])
            .arg(out)
            .output()
            .unwrap()
    };
    common::assert_ok(&export("--merged", &merged));
    common::assert_ok(&export("--adapters", &adapters));
    let m = SafetensorsFile::open(merged.join("diffusion_pytorch_model.safetensors")).unwrap();
    let base =
        SafetensorsFile::open(run.join("base/transformer/diffusion_pytorch_model.safetensors"))
            .unwrap();
    let lora = SafetensorsFile::open(ck.join("lora.safetensors")).unwrap();
    let module = "transformer_blocks.0.attn.to_q";
    let t = |f: &SafetensorsFile, n: &str| f.tensor(n).unwrap();
    let (a, b) = (
        t(&lora, &format!("{module}.lora_A.weight")),
        t(&lora, &format!("{module}.lora_B.weight")),
    );
    let want = t(&base, &format!("{module}.weight")) + b.matmul(&a) * 2.0; // alpha 8 / rank 4
    assert!(t(&m, &format!("{module}.weight")).equal(&want));
    let norm = "transformer_blocks.0.norm1.linear.weight";
    assert!(
        t(&m, norm).equal(&t(&base, norm)),
        "a layer without adapters is the base's"
    );
    assert!(merged.join("config.json").is_file());
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "pytorch_lora_weights.safetensors",
    ] {
        assert_eq!(
            std::fs::read(adapters.join(f)).unwrap(),
            std::fs::read(ck.join(f)).unwrap()
        );
    }
    let refused = export("--out", &root.join("whole-out"));
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--merged"));
}

#[test]
fn lora_runs_save_adapters_and_resume_exactly() {
    let root = temp_dir("lora");
    let lora = [
        "--set",
        "optim.lora.rank=4",
        "--set",
        "optim.lora.alpha=8",
        "--set",
        "optim.ema.decay=0.9",
    ];
    let run = |dir: &Path, iterations: &str, resume: bool| {
        let mut cmd = bin();
        cmd.args(["train", "--out", dir.to_str().unwrap(), "--threads", "1"])
            .args(lora)
            .args([
                "--set",
                &format!("run.iterations={iterations}"),
                "--set",
                "run.checkpoint_every=2",
            ]);
        if resume {
            cmd.arg("--resume");
        }
        let out = cmd.output().unwrap();
        common::assert_ok(&out);
    };
    let (whole, split) = (root.join("whole"), root.join("split"));
    run(&whole, "4", false);
    run(&split, "2", false);
    run(&split, "4", true);
    let ck = |d: &Path| d.join("checkpoints/iter-000004");
    for f in [
        "lora.safetensors",
        "pytorch_lora_weights.safetensors",
        "optimizer.safetensors",
    ] {
        assert!(
            std::fs::read(ck(&whole).join(f)).unwrap()
                == std::fs::read(ck(&split).join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
    assert_eq!(metrics(&whole), metrics(&split));
    assert!(
        !ck(&whole).join("transformer").exists(),
        "a LoRA checkpoint holds only adapters"
    );
    let diffusers =
        SafetensorsFile::open(ck(&whole).join("pytorch_lora_weights.safetensors")).unwrap();
    let names: Vec<&str> = diffusers.names().collect();
    assert!(
        names.contains(&"transformer.transformer_blocks.0.attn.to_q.lora_A.weight"),
        "{names:?}"
    );
    assert!(names
        .iter()
        .all(|n| n.starts_with("transformer.") && n.contains(".lora_")));
    peft_layout_is_peft_s(&ck(&whole), &whole);
    exports_merge_and_copy_the_adapters(&ck(&whole), &whole, &root);
    // the adapters moved, and only they are in the optimizer state
    let native = SafetensorsFile::open(ck(&whole).join("lora.safetensors")).unwrap();
    let b = native
        .tensor("transformer_blocks.0.attn.to_q.lora_B.weight")
        .unwrap();
    assert!(b.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0);
    let opt = SafetensorsFile::open(ck(&whole).join("optimizer.safetensors")).unwrap();
    assert!(opt.names().all(|n| n.contains(".lora_")));
    // the EMA of the adapters lags behind them
    let ema = SafetensorsFile::open(ck(&whole).join("ema.safetensors")).unwrap();
    let e = ema
        .tensor("transformer_blocks.0.attn.to_q.lora_B.weight")
        .unwrap();
    let (en, bn) = (e.norm().double_value(&[]), b.norm().double_value(&[]));
    assert!(en > 0.0 && en < bn, "ema {en} vs weights {bn}");
    std::fs::remove_dir_all(&root).unwrap();
}
