//! Parameters: where they come from (a checkpoint or a seeded initialiser), the
//! builder that hands them to modules under their checkpoint key names, and the
//! ordered store that keeps them for the optimiser and for saving.
//!
//! Module trees mirror checkpoint keys: a module asks its builder for
//! `vb.pp("attn").pp("to_q").get("weight", ...)` and receives the tensor stored
//! as `attn.to_q.weight`, memory-mapped from disk and copied once to its device
//! and dtype.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::io::json::read_json;
use crate::io::safetensors::SafetensorsFile;
use crate::rng::Philox;

/// How a parameter is initialised when it is not loaded from a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal with standard deviation `1/sqrt(fan_in)`, fan-in = product of all dims but the first.
    FanIn,
    /// Normal with the given standard deviation (biases, embeddings).
    Normal(f64),
    /// One plus normal noise with the given standard deviation (norm scales).
    OnePlusNormal(f64),
    /// All zeros.
    Zeros,
}

/// A set of safetensors files forming one checkpoint (a single file, or shards
/// listed by an `*.safetensors.index.json`), or named tensors already in memory
/// (e.g. read from a PyTorch `.pt` file).
pub struct Checkpoint {
    desc: String,
    files: Vec<SafetensorsFile>,
    index: BTreeMap<String, usize>,
    memory: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    /// Opens the checkpoint of a diffusers/transformers model directory: `{stem}.safetensors`,
    /// or the shards named by `{stem}.safetensors.index.json`.
    pub fn open_dir(dir: &Path, stem: &str) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::not_found(dir, "no such directory"));
        }
        let single = dir.join(format!("{stem}.safetensors"));
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if single.is_file() {
            Self::from_files(dir.display().to_string(), vec![single])
        } else if index.is_file() {
            Self::from_index(dir, &index)
        } else {
            Err(Error::not_found(
                dir,
                format!("neither {stem}.safetensors nor {stem}.safetensors.index.json"),
            ))
        }
    }

    fn from_index(dir: &Path, index: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let idx: Index = read_json(index)?;
        let shards: BTreeSet<&String> = idx.weight_map.values().collect();
        // a shard is a file of `dir`: never `../x`, `/etc/x` or `sub/x`
        let plain = |s: &str| {
            let mut parts = Path::new(s).components();
            matches!(parts.next(), Some(std::path::Component::Normal(_))) && parts.next().is_none()
        };
        if let Some(bad) = shards.iter().find(|s| !plain(s)) {
            return Err(Error::Json {
                path: index.to_path_buf(),
                msg: format!(
                    "weight_map names shard `{bad}`, not a file name inside {}",
                    dir.display()
                ),
            });
        }
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        let ck = Self::from_files(dir.display().to_string(), paths)?;
        for (name, shard) in &idx.weight_map {
            if !ck.index.contains_key(name) {
                return Err(Error::MissingTensor {
                    source_desc: dir.join(shard).display().to_string(),
                    name: name.clone(),
                });
            }
        }
        Ok(ck)
    }

    /// A checkpoint made of explicit files (later files do not override earlier ones).
    pub fn from_files(desc: String, paths: Vec<PathBuf>) -> Result<Self> {
        let files = paths
            .iter()
            .map(SafetensorsFile::open)
            .collect::<Result<Vec<_>>>()?;
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                index.entry(name.to_string()).or_insert(i);
            }
        }
        Ok(Checkpoint {
            desc,
            files,
            index,
            memory: BTreeMap::new(),
        })
    }

    /// A checkpoint of named CPU tensors held in memory (`desc` names their origin
    /// in errors). A repeated name is an error.
    pub fn from_tensors(desc: String, tensors: Vec<(String, Tensor)>) -> Result<Self> {
        let mut memory = BTreeMap::new();
        for (name, t) in tensors {
            if memory.insert(name.clone(), t).is_some() {
                return Err(Error::Input(format!(
                    "{desc}: tensor `{name}` appears twice"
                )));
            }
        }
        Ok(Checkpoint {
            desc,
            files: Vec::new(),
            index: BTreeMap::new(),
            memory,
        })
    }

    /// Reads a PyTorch `torch.save` checkpoint (zip format) without executing
    /// its pickle; see [`crate::io::torch_pt::read_torch_pt`].
    pub fn open_torch_pt(path: &Path) -> Result<Self> {
        let tensors = crate::io::torch_pt::read_torch_pt(path)?;
        Self::from_tensors(path.display().to_string(), tensors)
    }

    /// A human-readable description (the directory or file).
    pub fn describe(&self) -> &str {
        &self.desc
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index
            .keys()
            .chain(self.memory.keys())
            .map(String::as_str)
    }

    /// Tensor `name` as a CPU tensor of its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        if let Some(t) = self.memory.get(name) {
            return Ok(t.copy());
        }
        let i = *self.index.get(name).ok_or_else(|| Error::MissingTensor {
            source_desc: self.desc.clone(),
            name: name.to_string(),
        })?;
        self.files[i].tensor(name)
    }

    /// The stored shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        if let Some(t) = self.memory.get(name) {
            return Some(t.size());
        }
        let i = *self.index.get(name)?;
        self.files[i].info(name).map(|i| i.shape.clone())
    }
}

/// Where a builder takes parameter values from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// Load every parameter from a checkpoint (shape-checked).
    Checkpoint(&'a Checkpoint),
    /// Initialise every parameter from a seed (deterministic on any device).
    Seeded(u64),
    /// Random weights drawn by libtorch's generator on the target device
    /// (reseeded from the seed and the parameter's name): fast enough for a
    /// 12 B-parameter model on a GPU, the same on one device type but not
    /// across them. For benchmarks; [`Source::Seeded`] is device-independent.
    Random(u64),
    /// Shapes only: every parameter is one zero broadcast to its shape (no
    /// storage), for counting what a model holds without building it
    /// (`dancegrpo plan` on FLUX.1-dev's config alone). Not for computing.
    Shapes,
}

/// Named parameters in creation order (the order of PyTorch's `named_parameters()`
/// when modules are built in the same order as their Python `__init__`).
#[derive(Default)]
pub struct ParamStore {
    params: RefCell<Vec<(String, Tensor)>>,
    linears: RefCell<Vec<(String, crate::adapter::LoraSlot)>>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&self, name: String, t: &Tensor) {
        self.params.borrow_mut().push((name, t.shallow_clone()));
    }

    /// Records a shape-only parameter ([`Source::Shapes`]) and returns it.
    fn push_shape(&self, name: String, t: Tensor) -> Tensor {
        self.push(name, &t);
        t
    }

    /// Records the LoRA slot of the linear layer `name` (module path, e.g. `transformer_blocks.0.attn.to_q`).
    pub fn register_linear(&self, name: String, slot: &crate::adapter::LoraSlot) {
        self.linears.borrow_mut().push((name, slot.clone()));
    }

    /// Every registered linear layer's name and LoRA slot, in creation order.
    pub fn linears(&self) -> Vec<(String, crate::adapter::LoraSlot)> {
        self.linears.borrow().clone()
    }

    /// Adds a parameter created outside a [`VarBuilder`] (adapters).
    pub fn insert(&self, name: String, t: &Tensor) {
        self.push(name, t);
    }

    /// All parameters, in creation order (shallow clones sharing storage).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        self.params
            .borrow()
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.params
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
    }

    /// Number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.params.borrow().len()
    }

    /// True when no parameter was created.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total number of scalar weights.
    pub fn numel(&self) -> usize {
        self.params.borrow().iter().map(|(_, t)| t.numel()).sum()
    }

    /// Errors if the checkpoint holds tensors that no parameter took (another architecture).
    pub fn check_all_used(&self, ck: &Checkpoint) -> Result<()> {
        self.check_all_used_except(ck, |_| false)
    }

    /// As [`ParamStore::check_all_used`], tolerating the tensors for which `ignore` is true
    /// (buffers such as `position_ids`, parts of a larger model such as a T5 decoder).
    pub fn check_all_used_except(
        &self,
        ck: &Checkpoint,
        ignore: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let ours: BTreeSet<String> = self
            .params
            .borrow()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        let extra: Vec<&str> = ck
            .names()
            .filter(|n| !ours.contains(*n) && !ignore(n))
            .collect();
        match extra.first() {
            None => Ok(()),
            Some(e) => Err(Error::UnexpectedTensors {
                source_desc: ck.describe().to_string(),
                count: extra.len(),
                example: e.to_string(),
            }),
        }
    }
}

/// Hands parameters to modules under dotted key names (`prefix.name`).
#[derive(Clone)]
pub struct VarBuilder<'a> {
    prefix: String,
    source: Source<'a>,
    store: &'a ParamStore,
    kind: Kind,
    device: Device,
}

impl<'a> VarBuilder<'a> {
    /// A root builder creating parameters of `kind` on `device` into `store`.
    pub fn new(source: Source<'a>, store: &'a ParamStore, kind: Kind, device: Device) -> Self {
        VarBuilder {
            prefix: String::new(),
            source,
            store,
            kind,
            device,
        }
    }

    /// A builder for the child module `name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        VarBuilder {
            prefix,
            ..self.clone()
        }
    }

    /// Registers the LoRA slot of the linear layer built under this prefix.
    pub fn register_linear(&self, slot: &crate::adapter::LoraSlot) {
        self.store.register_linear(self.prefix.clone(), slot);
    }

    /// Parameter dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Parameter device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Creates (loads or initialises) the parameter `name` of shape `shape`.
    pub fn get(&self, name: &str, shape: &[i64], init: Init) -> Result<Tensor> {
        let full = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        let value = match self.source {
            Source::Checkpoint(ck) => load_checked(ck, &full, shape)?,
            Source::Seeded(seed) => init_tensor(seed, &full, shape, init),
            Source::Random(seed) => random_tensor(seed, &full, shape, init, self.device),
            Source::Shapes => {
                let one = Tensor::zeros([], (self.kind, self.device));
                return Ok(self.store.push_shape(full, one.expand(shape, false)));
            }
        };
        let t = value
            .to_device(self.device)
            .to_kind(self.kind)
            .detach()
            .set_requires_grad(true);
        self.store.push(full, &t);
        Ok(t)
    }
}

fn load_checked(ck: &Checkpoint, name: &str, shape: &[i64]) -> Result<Tensor> {
    let found = ck.shape(name).ok_or_else(|| Error::MissingTensor {
        source_desc: ck.describe().to_string(),
        name: name.to_string(),
    })?;
    if found != shape {
        return Err(Error::ShapeMismatch {
            source_desc: ck.describe().to_string(),
            name: name.to_string(),
            expected: shape.to_vec(),
            found,
        });
    }
    ck.tensor(name)
}

/// A tensor drawn as [`Init`] says with libtorch's generator on `device`,
/// reseeded from `seed` and `name` (float32).
pub fn random_tensor(seed: u64, name: &str, shape: &[i64], init: Init, device: Device) -> Tensor {
    let (mean, std) = match init {
        Init::Zeros => return Tensor::zeros(shape, (Kind::Float, device)),
        Init::FanIn => {
            let fan_in: i64 = shape.iter().skip(1).product();
            (0.0, 1.0 / (fan_in.max(1) as f64).sqrt())
        }
        Init::Normal(s) => (0.0, s),
        Init::OnePlusNormal(s) => (1.0, s),
    };
    let stream = Philox::for_stream(seed, name).next_u32();
    tch::manual_seed(stream as i64);
    Tensor::randn(shape, (Kind::Float, device)) * std + mean
}

/// A deterministic float32 CPU tensor for parameter `name` (a pure function of
/// `seed` and `name`, so models of any size and device initialise identically).
pub fn init_tensor(seed: u64, name: &str, shape: &[i64], init: Init) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut rng = Philox::for_stream(seed, name);
    let (mean, std) = match init {
        Init::Zeros => return Tensor::zeros(shape, (Kind::Float, Device::Cpu)),
        Init::FanIn => {
            let fan_in: i64 = shape.iter().skip(1).product();
            (0.0, 1.0 / (fan_in.max(1) as f64).sqrt())
        }
        Init::Normal(s) => (0.0, s),
        Init::OnePlusNormal(s) => (1.0, s),
    };
    let mut vals = vec![0f32; n.max(0) as usize];
    rng.normals_into(&mut vals, |z| (mean + std * z) as f32);
    Tensor::from_slice(&vals).reshape(shape)
}
