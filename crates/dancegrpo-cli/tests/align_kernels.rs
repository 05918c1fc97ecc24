//! `dancegrpo align` under other CPU kernels: MKL's code paths (`MKL_CBWR`)
//! and thread counts change float32 rounding the way another CPU does, so a
//! parity check that passes with one kernel only is caught here.

mod common;

use std::process::Command;

use common::case_dir;

/// The MKL code paths this CPU can run (`None`: MKL's own choice).
fn mkl_paths() -> Vec<Option<&'static str>> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut paths = vec![None, Some("COMPATIBLE"), Some("AVX2")];
    if cpuinfo.contains(" avx512f") {
        paths.push(Some("AVX512"));
    }
    paths
}

/// Runs `align --json` on the public case and returns the report.
fn align(mkl: Option<&str>, threads: &str, precision: &str) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dancegrpo"));
    cmd.args(["align", case_dir().to_str().unwrap(), "--json", "-v"])
        .args(["--threads", threads, "--precision", precision])
        .env_remove("MKL_CBWR");
    if let Some(path) = mkl {
        cmd.env("MKL_CBWR", path);
    }
    let out = cmd.output().expect("running dancegrpo");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    report
}

/// The failing tensors of a report, for the assertion message.
fn failures(report: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for s in report["stages"].as_array().unwrap() {
        for t in s["tensors"].as_array().unwrap() {
            if t["pass"] != true {
                out.push(format!("{} {t}", s["name"]));
            }
        }
    }
    out
}

#[test]
fn every_stage_passes_under_every_mkl_path_and_thread_count() {
    for mkl in mkl_paths() {
        for threads in ["1", "2"] {
            for precision in ["f32", "f64"] {
                let report = align(mkl, threads, precision);
                assert_eq!(
                    report["pass"],
                    true,
                    "MKL_CBWR={mkl:?} --threads {threads} --precision {precision}: {:?}",
                    failures(&report)
                );
                assert_eq!(report["stages"].as_array().unwrap().len(), 11);
            }
        }
    }
}
