//! TensorBoard event files, written without TensorFlow:
//! `<run>/tensorboard/events.out.tfevents.<unix-seconds>.<hostname>` holds
//! TFRecord-framed ([`record`]) `tensorflow.Event` protobufs ([`event`]): a
//! `file_version` header, the run's configuration as a text summary, then
//! scalar summaries per iteration and the rollout and evaluation grids as
//! image summaries. A resumed run
//! opens a new file that starts with `SessionLog START` at its first step, so
//! TensorBoard drops the points the interrupted run wrote past its checkpoint.

pub mod event;
pub mod record;

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use event::{encode_event, EventBody};
use tch::{Kind, Tensor};

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

    /// Writes `image` (uint8 `(H, W, 3)`) as the PNG image summary `tag` at
    /// `step`, averaged down when its longest side exceeds [`MAX_SIDE`].
    pub fn image(&mut self, step: u64, tag: &str, image: &Tensor) -> Result<()> {
        let image = fit(image, MAX_SIDE);
        let png = crate::io::image::encode_png(&image)?;
        let (h, w, _) = image.size3()?;
        let body = EventBody::Image {
            tag,
            png: &png,
            height: h as u32,
            width: w as u32,
        };
        self.write(step, &body)
    }

    /// Writes the Markdown `text` as the text summary `tag` at `step`.
    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        self.write(step, &EventBody::Text { tag, text })
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

/// The longest side of an image summary: larger grids are averaged down, so
/// a FLUX-sized grid does not put tens of megabytes into the event file.
pub const MAX_SIDE: i64 = 2048;

/// `image` (uint8 `(H, W, 3)`) scaled by area averaging so that its longest
/// side is at most `max_side` (unchanged when it already is).
fn fit(image: &Tensor, max_side: i64) -> Tensor {
    let (h, w) = (image.size()[0], image.size()[1]);
    let longest = h.max(w);
    if longest <= max_side {
        return image.shallow_clone();
    }
    let scale = |n: i64| (n * max_side / longest).max(1);
    image
        .permute([2, 0, 1]) // (3, H, W)
        .to_kind(Kind::Float)
        .adaptive_avg_pool2d([scale(h), scale(w)]) // (3, h', w')
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0]) // (h', w', 3)
        .contiguous()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_images_are_averaged_down_small_ones_kept() {
        // columns alternate 0 and 200: halving the width averages them to 100
        let row = Tensor::from_slice(&[0u8, 200]).repeat([3]); // (6,)
        let img = row.view([1, 6, 1]).expand([2, 6, 3], false).contiguous(); // (2, 6, 3)
        let small = fit(&img, 6);
        assert_eq!(small.size(), [2, 6, 3]);
        assert!(small.equal(&img));
        let half = fit(&img, 3);
        assert_eq!(half.size(), [1, 3, 3]);
        assert_eq!(
            Vec::<u8>::try_from(half.flatten(0, -1)).unwrap(),
            [100u8; 9]
        );
    }
}
