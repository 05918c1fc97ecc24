//! Sharded checkpoint files: each process writes its part of every unit
//! (`<stem>.shard-RRRRR-of-NNNNN.safetensors`, one `(part,)` tensor per unit),
//! process 0 the layout (`<stem>.shards.json`). Parts saved by as many
//! processes as are running are read back as they are (an exact resume);
//! saved by another count, every file is read, each unit's whole vector
//! rebuilt and split anew (the values are the same; which process holds which
//! element, and so the order of later reductions, is not).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::FullShard;
use crate::error::{Error, Result};
use crate::io::atomic::write_bytes_atomic;
use crate::io::safetensors::{write_safetensors, SafetensorsFile};

/// The format name in every manifest.
const FORMAT: &str = "dancegrpo-fsdp-1";

/// One unit of a sharded checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitLayout {
    /// The unit (`embed`, `transformer_blocks.3`, `head`).
    pub name: String,
    /// Its elements (before padding).
    pub numel: i64,
    /// Its parameters in flat order, with their shapes.
    pub params: Vec<(String, Vec<i64>)>,
}

/// The layout of a sharded checkpoint (`<stem>.shards.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardManifest {
    /// The format tag (`FORMAT`, checked on read).
    pub format: String,
    /// Processes that wrote it.
    pub world: i64,
    /// Units in order.
    pub units: Vec<UnitLayout>,
}

impl ShardManifest {
    /// Reads `<stem>.shards.json` in `dir`.
    pub fn read(dir: &Path, stem: &str) -> Result<Self> {
        let path = dir.join(format!("{stem}.shards.json"));
        let m: ShardManifest = crate::io::json::read_json(&path)?;
        if m.format != FORMAT || m.world < 1 {
            return Err(Error::config(
                &path,
                "format",
                format!(
                    "`{}` (world {}) is not a {FORMAT} manifest",
                    m.format, m.world
                ),
            ));
        }
        Ok(m)
    }

    /// Every unit's whole float32 vector from the part files of `stem` in `dir`.
    pub fn read_units(&self, dir: &Path, stem: &str) -> Result<Vec<Tensor>> {
        let files = (0..self.world)
            .map(|r| SafetensorsFile::open(shard_path(dir, stem, r, self.world)))
            .collect::<Result<Vec<_>>>()?;
        self.units
            .iter()
            .map(|u| {
                let parts = files
                    .iter()
                    .map(|f| f.tensor(&u.name))
                    .collect::<Result<Vec<_>>>()?;
                let whole = Tensor::cat(&parts, 0);
                if (whole.numel() as i64) < u.numel {
                    return Err(Error::Input(format!(
                        "{}: unit {} has {} elements in its parts, the manifest says {}",
                        dir.display(),
                        u.name,
                        whole.numel(),
                        u.numel
                    )));
                }
                Ok(whole.narrow(0, 0, u.numel).to_kind(Kind::Float))
            })
            .collect()
    }
}

/// `<dir>/<stem>.shard-RRRRR-of-NNNNN.safetensors`.
pub fn shard_path(dir: &Path, stem: &str, rank: i64, world: i64) -> PathBuf {
    dir.join(format!("{stem}.shard-{rank:05}-of-{world:05}.safetensors"))
}

impl FullShard {
    /// The layout of this state's units.
    pub fn manifest(&self) -> ShardManifest {
        ShardManifest {
            format: FORMAT.into(),
            world: self.c.world_size(),
            units: self
                .units
                .iter()
                .map(|u| UnitLayout {
                    name: u.name.clone(),
                    numel: u.numel,
                    params: u
                        .params
                        .iter()
                        .map(|(n, _, s)| (n.clone(), s.clone()))
                        .collect(),
                })
                .collect(),
        }
    }

    /// Writes this process's `parts` (one `(part,)` tensor per unit, in unit
    /// order: the shards, or optimizer moments shaped like them) as `stem` in
    /// `dir`, with `meta`; process 0 also writes the manifest.
    pub fn save_parts(
        &self,
        dir: &Path,
        stem: &str,
        parts: &[Tensor],
        meta: &BTreeMap<String, String>,
    ) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .units
            .iter()
            .zip(parts)
            .map(|(u, t)| (u.name.clone(), t.detach().to_device(tch::Device::Cpu)))
            .collect();
        let (rank, world) = (self.c.rank(), self.c.world_size());
        write_safetensors(shard_path(dir, stem, rank, world), &tensors, meta)?;
        if rank == 0 {
            let json =
                serde_json::to_string_pretty(&self.manifest()).expect("serialisable manifest");
            write_bytes_atomic(&dir.join(format!("{stem}.shards.json")), json.as_bytes())?;
        }
        Ok(())
    }

    /// Reads back this process's parts of `stem` in `dir` (in unit order, on
    /// the shards' device) and the metadata of its file, whatever process
    /// count wrote them; a layout that differs from this model's is an error
    /// naming the unit.
    pub fn load_parts(
        &self,
        dir: &Path,
        stem: &str,
    ) -> Result<(Vec<Tensor>, BTreeMap<String, String>)> {
        let manifest = ShardManifest::read(dir, stem)?;
        let mine = self.manifest();
        for (a, b) in manifest.units.iter().zip(&mine.units) {
            if a != b {
                return Err(Error::Input(format!(
                    "{}: unit {} is laid out differently from this model's {}",
                    dir.display(),
                    a.name,
                    b.name
                )));
            }
        }
        if manifest.units.len() != mine.units.len() {
            return Err(Error::Input(format!(
                "{}: {} units, the model has {}",
                dir.display(),
                manifest.units.len(),
                mine.units.len()
            )));
        }
        let (rank, world) = (self.c.rank(), self.c.world_size());
        let device = self
            .units
            .first()
            .map_or(tch::Device::Cpu, |u| u.shard.device());
        if manifest.world == world {
            let file = SafetensorsFile::open(shard_path(dir, stem, rank, world))?;
            let parts = self
                .units
                .iter()
                .map(|u| {
                    let t = file.tensor(&u.name)?;
                    check_part(&file, &u.name, &t, u.part)?;
                    Ok(t.to_kind(Kind::Float).to_device(device))
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok((parts, file.metadata().clone()));
        }
        let meta = SafetensorsFile::open(shard_path(dir, stem, 0, manifest.world))?
            .metadata()
            .clone();
        let wholes = manifest.read_units(dir, stem)?;
        let parts = self
            .units
            .iter()
            .zip(wholes)
            .map(|(u, whole)| {
                let padded = super::pad(&whole, u.part * world);
                padded
                    .narrow(0, rank * u.part, u.part)
                    .copy()
                    .to_device(device)
            })
            .collect();
        Ok((parts, meta))
    }
}

/// A part must have exactly `part` elements.
fn check_part(file: &SafetensorsFile, unit: &str, t: &Tensor, part: i64) -> Result<()> {
    if t.size() != [part] {
        return Err(Error::Input(format!(
            "{}: {unit} has shape {:?}, this process's part is [{part}]",
            file.path().display(),
            t.size()
        )));
    }
    Ok(())
}

/// Consolidates the sharded weights `stem` of checkpoint `dir` (written by any
/// process count) into a diffusers model directory `out`: `config.json` and
/// `diffusion_pytorch_model.safetensors` with every parameter in float32, or,
/// when they exceed `max_file_bytes`, `diffusion_pytorch_model-0000i-of-0000n.safetensors`
/// files and their `diffusion_pytorch_model.safetensors.index.json` (diffusers'
/// sharded layout). Each file is written atomically. One process, no collective.
pub fn export(dir: &Path, stem: &str, out: &Path, max_file_bytes: u64) -> Result<()> {
    let manifest = ShardManifest::read(dir, stem)?;
    let first = SafetensorsFile::open(shard_path(dir, stem, 0, manifest.world))?;
    let config = first
        .metadata()
        .get("config")
        .cloned()
        .ok_or_else(|| Error::Safetensors {
            path: first.path().to_path_buf(),
            msg: "metadata lacks the model's `config`".into(),
        })?;
    let wholes = manifest.read_units(dir, stem)?;
    let mut tensors = Vec::new();
    for (unit, whole) in manifest.units.iter().zip(&wholes) {
        let mut at = 0;
        for (name, shape) in &unit.params {
            let n: i64 = shape.iter().product();
            tensors.push((
                name.clone(),
                whole.narrow(0, at, n).view(shape.as_slice()).copy(),
            ));
            at += n;
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    write_bytes_atomic(&out.join("config.json"), config.as_bytes())?;
    write_diffusers_weights(out, &tensors, max_file_bytes)
}

/// `tensors` as diffusers' `diffusion_pytorch_model` safetensors in `out`:
/// one file, or files of at most `max_file_bytes` (a tensor larger than that
/// gets a file of its own) with the index diffusers and our loader read.
fn write_diffusers_weights(
    out: &Path,
    tensors: &[(String, Tensor)],
    max_file_bytes: u64,
) -> Result<()> {
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let size = |t: &Tensor| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64;
    let mut files: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut filled = 0;
    for (name, t) in tensors {
        let last = files.last().expect("non-empty");
        if !last.is_empty() && filled + size(t) > max_file_bytes {
            files.push(Vec::new());
            filled = 0;
        }
        filled += size(t);
        files
            .last_mut()
            .expect("non-empty")
            .push((name.clone(), t.shallow_clone()));
    }
    if files.len() == 1 {
        return write_safetensors(
            out.join("diffusion_pytorch_model.safetensors"),
            &files[0],
            &meta,
        );
    }
    let n = files.len();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in files.iter().enumerate() {
        let file = format!("diffusion_pytorch_model-{:05}-of-{n:05}.safetensors", i + 1);
        write_safetensors(out.join(&file), part, &meta)?;
        for (name, _) in part {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    let total: u64 = tensors.iter().map(|(_, t)| size(t)).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let text = serde_json::to_string_pretty(&index).expect("json");
    write_bytes_atomic(
        &out.join("diffusion_pytorch_model.safetensors.index.json"),
        text.as_bytes(),
    )
}
