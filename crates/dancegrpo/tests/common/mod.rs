//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use dancegrpo::dist::{DistBackend, Launch, ProcessGroup};

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

/// Set in the children [`spawn_world`] starts.
const CHILD: &str = "DANCEGRPO_DIST_TEST_CHILD";

/// Whether this test process is one of [`spawn_world`]'s children.
pub fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Runs test `name` as `world` child processes and asserts they all succeed.
pub fn spawn_world(name: &str, world: usize) {
    let port = free_port().to_string();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args(["--exact", name, "--nocapture", "--test-threads", "1"])
                .env(CHILD, "1")
                .env("WORLD_SIZE", world.to_string())
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect::<Vec<_>>();
    let children: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let failed: Vec<String> = children
        .iter()
        .enumerate()
        .filter(|(_, out)| !out.status.success())
        .map(|(rank, out)| {
            format!(
                "rank {rank}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

pub fn join_gloo() -> ProcessGroup {
    let launch = Launch::from_env().unwrap().expect("WORLD_SIZE > 1");
    ProcessGroup::join(&launch, DistBackend::Gloo, Duration::from_secs(20)).unwrap()
}
