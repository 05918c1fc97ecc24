//! Tests that run the real `dancegrpo` binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dancegrpo::io::safetensors::{write_safetensors, SafetensorsFile};
use tch::Tensor;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("running dancegrpo")
}

fn case_dir() -> PathBuf {
    let root = std::env::var_os("DANCEGRPO_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
        });
    let case = root.join("public/flux_tiny_a");
    assert!(
        case.join("case.json").is_file(),
        "fixture case missing at {}",
        case.display()
    );
    case
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dancegrpo-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[test]
fn align_json_passes_on_the_public_case() {
    let out = run(&["align", case_dir().to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["case"], "flux_tiny_a");
    assert_eq!(report["pass"], true);
    let names: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "text_encoding",
            "schedule",
            "transformer",
            "sampling",
            "decode",
            "advantages",
            "train",
            "grads",
            "optimizer",
            "end_to_end"
        ]
    );
    for s in report["stages"].as_array().unwrap() {
        for key in ["worst", "rel_err", "abs_err", "tol", "pass"] {
            assert!(s.get(key).is_some(), "stage lacks {key}: {s}");
        }
        let tol = if s["name"] == "end_to_end" {
            1e-4
        } else {
            1e-5
        };
        assert!(s["tol"].as_f64().unwrap() <= tol, "{s}");
        assert!(s["rel_err"].as_f64().unwrap() <= tol, "{s}");
    }
}

#[test]
fn align_table_and_exit_status_on_a_broken_model() {
    let out = run(&["align", case_dir().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("transformer") && text.contains("PASS"),
        "{text}"
    );

    // A copy of the case whose transformer has one perturbed weight must fail the
    // transformer stage (and only it), with exit status 1.
    let dir = temp_dir("broken");
    copy_dir(&case_dir(), &dir);
    let weights = dir.join("transformer/diffusion_pytorch_model.safetensors");
    let file = SafetensorsFile::open(&weights).unwrap();
    let tensors: Vec<(String, Tensor)> = file
        .names()
        .map(|n| {
            let t = file.tensor(n).unwrap();
            (
                n.to_string(),
                if n == "proj_out.bias" { t + 1e-3 } else { t },
            )
        })
        .collect();
    drop(file);
    write_safetensors(&weights, &tensors, &BTreeMap::new()).unwrap();
    let out = run(&["align", dir.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["pass"], false);
    let pass_of = |name: &str| {
        report["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["pass"]
            .clone()
    };
    // the velocity feeds the transformer, sampling and GRPO stages; the others do not use the model
    for stage in [
        "transformer",
        "sampling",
        "train",
        "grads",
        "optimizer",
        "end_to_end",
    ] {
        assert_eq!(pass_of(stage), false, "{stage}");
    }
    for stage in ["schedule", "decode", "advantages"] {
        assert_eq!(pass_of(stage), true, "{stage}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn align_reports_bad_arguments() {
    let out = run(&["align", "/nonexistent/case"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/case"));
    let out = run(&["align", case_dir().to_str().unwrap(), "--stages", "bogus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("unknown stage `bogus`")
            && err.contains("end_to_end"),
        "{err}"
    );
}

#[test]
fn env_reports_the_loaded_libtorch() {
    let out = run(&["env", "--json"]);
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        info["libtorch"].as_str().unwrap().starts_with("2.11.0"),
        "{info}"
    );
    assert_eq!(info["cuda_feature"], cfg!(feature = "cuda"));
    assert!(info["cuda_device_count"].as_i64().unwrap() >= 0);
}

#[test]
fn demo_writes_a_png() {
    let dir = temp_dir("demo");
    let out = run(&[
        "demo",
        "--out",
        dir.to_str().unwrap(),
        "--steps",
        "3",
        "--images",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(dir.join("samples.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // width 2*64, height 64 in the IHDR chunk
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 128);
    assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 64);
    std::fs::remove_dir_all(&dir).unwrap();
}
