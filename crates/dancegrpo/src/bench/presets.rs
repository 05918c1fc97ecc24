//! The reference's three CPU timing presets, built into the binary so
//! `bench train --preset` needs no checkout (copied unchanged from
//! `../shared/bench/`, about 470 KB; no weights).

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::atomic::write_bytes_atomic;

/// One of the reference's timing presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// 64x64, FLUX inner 32 (1 double + 2 single blocks), 6 steps.
    Tiny,
    /// 128x128, FLUX inner 128 (2 + 4 blocks), 8 steps.
    Small,
    /// 256x256, FLUX inner 256 (4 + 8 blocks), 10 steps.
    Medium,
}

/// `(relative path, bytes)` of one preset's files.
type Files = [(&'static str, &'static [u8]); 6];

macro_rules! preset_files {
    ($name:literal) => {
        [
            (
                "case.json",
                include_bytes!(concat!("../../presets/", $name, "/case.json")),
            ),
            (
                "inputs.safetensors",
                include_bytes!(concat!("../../presets/", $name, "/inputs.safetensors")),
            ),
            (
                "transformer/config.json",
                include_bytes!(concat!("../../presets/", $name, "/transformer/config.json")),
            ),
            (
                "vae/config.json",
                include_bytes!(concat!("../../presets/", $name, "/vae/config.json")),
            ),
            (
                "reward/model_config.json",
                include_bytes!(concat!(
                    "../../presets/",
                    $name,
                    "/reward/model_config.json"
                )),
            ),
            (
                "reward/open_clip_config.json",
                include_bytes!(concat!(
                    "../../presets/",
                    $name,
                    "/reward/open_clip_config.json"
                )),
            ),
        ]
    };
}

impl Preset {
    /// The preset's name (`tiny`, `small`, `medium`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Medium => "medium",
        }
    }

    fn files(self) -> Files {
        match self {
            Preset::Tiny => preset_files!("tiny"),
            Preset::Small => preset_files!("small"),
            Preset::Medium => preset_files!("medium"),
        }
    }

    /// Writes the preset's case directory under `dir` (created if needed).
    pub fn write_to(self, dir: &Path) -> Result<()> {
        for (rel, bytes) in self.files() {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            write_bytes_atomic(&path, bytes)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            "medium" => Ok(Preset::Medium),
            _ => Err(format!("unknown preset `{s}` (tiny, small, medium)")),
        }
    }
}
