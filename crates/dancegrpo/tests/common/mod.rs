//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The public reference cases (`../shared/fixtures/public/*` beside the repository,
/// or `$DANCEGRPO_FIXTURES/public/*`). Panics when there are none: parity tests
/// must never pass by finding nothing to compare.
pub fn public_cases() -> Vec<PathBuf> {
    let root = std::env::var_os("DANCEGRPO_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
        });
    let public = root.join("public");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&public)
        .unwrap_or_else(|e| panic!("reference fixtures not found at {}: {e}", public.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").is_file())
        .collect();
    cases.sort();
    assert!(
        !cases.is_empty(),
        "no reference case under {}",
        public.display()
    );
    cases
}

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dancegrpo-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
