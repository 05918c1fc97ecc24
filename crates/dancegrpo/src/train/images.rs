//! The run's PNGs (image grids, evaluation grids, the reward curve), written
//! by a background thread so training never waits on the disk.
//!
//! A failed write (a full disk, a removed directory) is reported at the next
//! write or check, not when the run ends, and the images queued after it are
//! still attempted: `health.on_image_error` says whether the run stops or
//! trains on without images.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tch::Tensor;

use super::health::ImageErrors;
use crate::error::{Error, Result};

/// A PNG to write off the training thread.
struct Job {
    path: PathBuf,
    image: Tensor, // (H, W, 3) uint8 on the CPU
}

/// Writes PNGs on a background thread; [`ImageWriter::finish`] waits for all of them.
pub struct ImageWriter {
    tx: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
    /// The first failed write, set by the thread.
    failure: Arc<Mutex<Option<String>>>,
    policy: ImageErrors,
    /// A warning not yet taken by the caller (policy `disable`).
    warning: Option<String>,
}

impl ImageWriter {
    /// Starts the writer thread; `policy` says what its first failure does.
    pub fn start(policy: ImageErrors) -> Self {
        let (tx, rx) = channel::<Job>();
        let failure = Arc::new(Mutex::new(None));
        let first = failure.clone();
        let handle = std::thread::spawn(move || {
            for job in rx {
                if let Err(e) = crate::io::image::write_png(&job.path, &job.image) {
                    let mut slot = first.lock().unwrap_or_else(|p| p.into_inner());
                    slot.get_or_insert(e.to_string());
                }
            }
        });
        ImageWriter {
            tx: Some(tx),
            handle: Some(handle),
            failure,
            policy,
            warning: None,
        }
    }

    /// Queues `image` (uint8 `(H, W, 3)`) to be written to `path`, after
    /// [`ImageWriter::check`]ing the writes before it.
    pub fn write(&mut self, path: PathBuf, image: Tensor) -> Result<()> {
        self.check()?;
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job {
                path,
                image: image.to_device(tch::Device::Cpu).contiguous(),
            });
        }
        Ok(())
    }

    /// Fails (policy `stop`) when a write has failed; under `disable`, turns
    /// image writing off and leaves a warning for [`ImageWriter::take_warning`].
    pub fn check(&mut self) -> Result<()> {
        let failed = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(why) = failed else { return Ok(()) };
        match self.policy {
            ImageErrors::Stop => Err(Error::Health(format!(
                "writing an image failed: {why} (health.on_image_error = \"disable\" trains on without images)"
            ))),
            ImageErrors::Disable if self.tx.is_some() => {
                self.tx = None;
                self.warning = Some(format!(
                    "writing an image failed: {why}; no more images are written in this run (health.on_image_error = \"disable\")"
                ));
                Ok(())
            }
            ImageErrors::Disable => Ok(()),
        }
    }

    /// The warning of a failure under policy `disable`, once.
    pub fn take_warning(&mut self) -> Option<String> {
        self.warning.take()
    }

    /// Waits until everything queued is written, then [`ImageWriter::check`]s.
    pub fn finish(&mut self) -> Result<()> {
        self.join()?;
        self.check()
    }

    /// Closes the queue and waits for the thread to write what it holds.
    fn join(&mut self) -> Result<()> {
        self.tx.take();
        match self.handle.take().map(JoinHandle::join) {
            Some(Err(_)) => Err(Error::Input("the image writer thread panicked".into())),
            _ => Ok(()),
        }
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Tensor {
        Tensor::zeros([4, 4, 3], (tch::Kind::Uint8, tch::Device::Cpu))
    }

    /// Waits for the thread to have tried everything queued so far.
    fn drain(w: &mut ImageWriter) {
        w.join().unwrap();
    }

    #[test]
    fn the_first_failure_stops_at_the_next_write_and_later_images_are_kept() {
        let dir = std::env::temp_dir().join(format!("dg-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = ImageWriter::start(ImageErrors::Stop);
        w.write(dir.join("missing/a.png"), image()).unwrap();
        w.write(dir.join("b.png"), image()).unwrap();
        drain(&mut w);
        assert!(
            dir.join("b.png").is_file(),
            "the image after the failure was dropped"
        );
        let err = w.write(dir.join("c.png"), image()).unwrap_err().to_string();
        assert!(
            err.contains("missing/a.png") && err.contains("on_image_error"),
            "{err}"
        );
        assert!(w.finish().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn disable_warns_once_and_writes_nothing_more() {
        let dir = std::env::temp_dir().join(format!("dg-images-off-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = ImageWriter::start(ImageErrors::Disable);
        w.write(dir.join("missing/a.png"), image()).unwrap();
        let done = w.failure.clone();
        while done.lock().unwrap().is_none() {
            std::thread::yield_now();
        }
        w.write(dir.join("b.png"), image()).unwrap();
        let warning = w.take_warning().expect("a warning");
        assert!(warning.contains("no more images"), "{warning}");
        assert_eq!(w.take_warning(), None);
        w.finish().unwrap();
        assert!(!dir.join("b.png").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
