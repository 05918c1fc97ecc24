//! TensorBoard event files, written without TensorFlow:
//! `<run>/tensorboard/events.out.tfevents.<unix-seconds>.<hostname>` holds
//! TFRecord-framed ([`record`]) `tensorflow.Event` protobufs ([`event`]): a
//! `file_version` header, then scalar summaries per iteration. A resumed run
//! opens a new file that starts with `SessionLog START` at its first step, so
//! TensorBoard drops the points the interrupted run wrote past its checkpoint.

pub mod crc32c;
pub mod event;
pub mod record;

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use event::{encode_event, EventBody};

use crate::error::{Error, Result};

/// The directory of a run that holds its event files.
pub const DIR: &str = "tensorboard";

/// The name every event file starts with (TensorBoard looks for `tfevents`).
const PREFIX: &str = "events.out.tfevents.";

/// One open event file, buffered; each event is flushed as it is written.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates a new event file in `dir` (made if needed) and writes its
    /// `file_version` header. A name already taken (two files in one second)
    /// gets a `.1`, `.2`, ... suffix, which sorts after it.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let base = format!("{PREFIX}{secs}.{}", crate::process::hostname());
        let mut k = 0u32;
        let (path, file) = loop {
            let name = match k {
                0 => base.clone(),
                _ => format!("{base}.{k}"),
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && k < 1000 => k += 1,
                Err(e) => return Err(Error::io(&path, e)),
            }
        };
        let mut w = EventWriter {
            path,
            file: BufWriter::new(file),
        };
        w.write(0, &EventBody::FileVersion)?;
        Ok(w)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks a restart at `step`: TensorBoard discards the points of earlier
    /// files at `step` and later.
    pub fn session_start(&mut self, step: u64) -> Result<()> {
        self.write(step, &EventBody::SessionStart)
    }

    /// Writes the scalars `(tag, value)` at `step` (as float32, TensorBoard's
    /// `simple_value`).
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let values: Vec<(String, f32)> =
            values.iter().map(|(t, v)| (t.clone(), *v as f32)).collect();
        self.write(step, &EventBody::Scalars(&values))
    }

    fn write(&mut self, step: u64, body: &EventBody) -> Result<()> {
        let wall_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let payload = encode_event(wall_time, step as i64, body);
        record::write_record(&mut self.file, &payload)
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Removes the event files of `dir` (a fresh run in a directory that held an
/// interrupted one, never checkpointed). A missing directory is not an error.
pub fn remove_event_files(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().starts_with(PREFIX) {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}
