//! One writer per run directory: an exclusive advisory lock (`flock(2)`, called
//! through `libc`: `File::try_lock` needs a newer Rust than our MSRV) on
//! `<run>/.lock`, held for the run's lifetime.
//!
//! The kernel releases the lock when its holder exits, however it exits, so a
//! run killed with `kill -9` leaves no stale lock behind; the file itself
//! stays and only tells the next holder's pid.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file's name inside the run directory.
pub const LOCK_FILE: &str = ".lock";

/// The held lock of a run directory (released when dropped).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of `dir` (which must exist) or fails naming the
    /// process that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match try_lock(&file) {
            Ok(true) => {}
            Ok(false) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim().parse::<u32>() {
                    Ok(pid) => format!("process {pid}"),
                    Err(_) => "another process".to_string(),
                };
                return Err(Error::Input(format!(
                    "{} is in use by {holder} (it holds {}); wait for it to end or choose another output directory",
                    dir.display(),
                    path.display()
                )));
            }
            Err(e) => return Err(Error::io(&path, e)),
        }
        let pid = std::process::id();
        let written = file
            .set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| writeln!(file, "{pid}"))
            .and_then(|_| file.flush());
        written.map_err(|e| Error::io(&path, e))?;
        Ok(RunLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes an exclusive `flock` on `file` without waiting: false when another
/// open file description holds it.
fn try_lock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor this `File` owns and keeps open.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = std::env::temp_dir().join(format!("dg-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = RunLock::acquire(&dir).unwrap();
        let held = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(held.trim(), std::process::id().to_string());
        // flock locks belong to the open file: a second open is refused even in this process
        let err = RunLock::acquire(&dir).unwrap_err().to_string();
        let want = format!("in use by process {}", std::process::id());
        assert!(err.contains(&want), "{err}");
        drop(first);
        let again = RunLock::acquire(&dir).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
