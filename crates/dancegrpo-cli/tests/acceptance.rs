//! `scripts/device-run.sh --device cpu --small` (the one command for a lent GPU
//! machine, around `scripts/gpu-acceptance.sh`): the GPU acceptance run end to
//! end on the CPU with a small shape, so the scripts work the first time a GPU
//! is lent.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_acceptance_script_runs_end_to_end_on_the_cpu() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fixtures = std::env::var_os("DANCEGRPO_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/fixtures"))
        .join("public/flux_tiny_a");
    let base = std::env::temp_dir().join(format!("dancegrpo-acceptance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    // the kit scripts/device-kit.sh makes: the binary and the fixture
    let (kit, out) = (base.join("kit"), base.join("out"));
    std::fs::create_dir_all(&kit).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_dancegrpo"), kit.join("dancegrpo")).unwrap();
    std::os::unix::fs::symlink(
        std::fs::canonicalize(&fixtures).unwrap(),
        kit.join("flux_tiny_a"),
    )
    .unwrap();
    let o = Command::new("bash")
        .arg(root.join("scripts/device-run.sh"))
        .args(["--device", "cpu", "--small"])
        .env("DEVICE_KIT", &kit)
        .env("OUT", &out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    for file in ["summary.json", "acceptance.log", "logs.tgz"] {
        assert!(out.join(file).is_file(), "{file} missing\n{stderr}");
    }
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&o.stdout)));
    assert_eq!(summary["device"], "cpu");
    assert_eq!(summary["align"]["pass"], true, "{summary}");
    assert_eq!(summary["align"]["stages"].as_object().unwrap().len(), 11);
    assert!(summary["bf16_matmul_tflops"].as_f64().unwrap() > 0.0);
    let runs = summary["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "{summary}");
    for run in runs {
        assert_eq!(run["status"], "ok", "{run}\n{stderr}");
        assert_eq!(run["iterations"], 2);
        assert!(run["seconds_per_iteration"].as_f64().unwrap() > 0.0);
        assert!(run["tflop_per_iteration"].as_f64().unwrap() > 0.0, "{run}");
        let mfu = run["mfu"].as_f64().unwrap();
        assert!(mfu > 0.0 && mfu < 1.0, "{run}");
        assert!(run["peak_memory_mib"]["peak_device_mib"].as_f64().unwrap() > 10.0);
    }
    // fast inference: two caches against none, and two processes sharing
    // each forward pass (when the environment has torch's launcher)
    let generate = summary["generate"].as_array().expect("generate figures");
    let labels: Vec<&str> = generate
        .iter()
        .map(|f| f["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["none", "seed", "steps-0.05"], "{summary}");
    match summary["sequence_parallel"]["figures"].as_array() {
        Some(f) => {
            assert_eq!(f[1]["processes"], 2, "{summary}");
            assert!(f[1]["latent_rel_l2"].as_f64().unwrap() < 1e-6, "{summary}");
        }
        None => eprintln!("sequence parallelism: {}", summary["sequence_parallel"]),
    }
    // the host CPU's float32 and bfloat16 iterations of a timing preset
    let cpu = &summary["host_cpu"];
    assert!(cpu["cores"].as_u64().unwrap() >= 1, "{cpu}");
    assert!(
        cpu["amx_bf16"].is_boolean() && cpu["avx512_bf16"].is_boolean(),
        "{cpu}"
    );
    for key in [
        "fp32_seconds_per_iteration",
        "bf16_seconds_per_iteration",
        "bf16_speedup",
    ] {
        assert!(cpu[key].as_f64().unwrap() > 0.0, "{key}: {cpu}");
    }
    std::fs::remove_dir_all(&base).unwrap();
}
