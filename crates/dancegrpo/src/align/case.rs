//! A reference case directory: `case.json`, `inputs.safetensors`,
//! `expected.safetensors`, its float64 truth `expected_f64.safetensors` and the
//! model directories beside them.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::judge::Reference;
use crate::error::{Error, Result};
use crate::io::json::read_json;
use crate::io::safetensors::SafetensorsFile;
use crate::models::flux::FluxTransformer;
use crate::sampler::Conditioning;

/// An `expected.safetensors` and, when present, its float64 truth
/// `expected_f64.safetensors` beside it.
pub struct ReferenceFiles {
    expected: SafetensorsFile,
    truth: Option<SafetensorsFile>,
}

impl ReferenceFiles {
    /// Opens the pair in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let expected = SafetensorsFile::open(dir.join("expected.safetensors"))?;
        let truth_path = dir.join("expected_f64.safetensors");
        let truth = match truth_path.exists() {
            true => Some(SafetensorsFile::open(truth_path)?),
            false => None,
        };
        Ok(ReferenceFiles { expected, truth })
    }

    /// Tensor `name` of `expected.safetensors`.
    pub fn expected(&self, name: &str) -> Result<Tensor> {
        self.expected.tensor(name)
    }

    /// Tensor `name` of the float64 truth (an error when the case has a truth
    /// without it; `None` when the case has none).
    pub fn truth(&self, name: &str) -> Result<Option<Tensor>> {
        self.truth.as_ref().map(|t| t.tensor(name)).transpose()
    }

    /// `name` from both files.
    pub fn reference(&self, name: &str) -> Result<Reference> {
        Ok(Reference {
            expected: self.expected(name)?,
            truth: self.truth(name)?,
        })
    }

    /// Whether the float64 truth is there.
    pub fn has_truth(&self) -> bool {
        self.truth.is_some()
    }

    /// The path of `expected.safetensors`.
    pub fn expected_path(&self) -> &Path {
        self.expected.path()
    }
}

/// Whether `case.json` describes a benchmark case (its `kind` starts with
/// "benchmark case").
fn is_benchmark(json: &serde_json::Value) -> bool {
    json.get("kind")
        .and_then(|k| k.as_str())
        .is_some_and(|k| k.starts_with("benchmark case"))
}

/// An opened reference case.
pub struct Case {
    dir: PathBuf,
    device: tch::Device,
    name: String,
    json: serde_json::Value,
    inputs: SafetensorsFile,
    /// `None` for a benchmark case (no expected tensors).
    expected: Option<ReferenceFiles>,
}

impl Case {
    /// Opens the case in `dir` (its stages compute on the CPU).
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_on(dir, tch::Device::Cpu)
    }

    /// Opens the case in `dir`; its stages compute on `device` (stored tensors
    /// stay on the CPU, where every comparison is made).
    pub fn open_on(dir: &Path, device: tch::Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::not_found(dir, "no such case directory"));
        }
        let json: serde_json::Value = read_json(&dir.join("case.json"))?;
        let name = json
            .get("case")
            .and_then(|c| c.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| {
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        let inputs = SafetensorsFile::open(dir.join("inputs.safetensors"))?;
        let expected = match dir.join("expected.safetensors").exists() || !is_benchmark(&json) {
            true => Some(ReferenceFiles::open(dir)?),
            false => None,
        };
        Ok(Case {
            dir: dir.to_path_buf(),
            device,
            name,
            json,
            inputs,
            expected,
        })
    }

    /// The case name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The case directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The device the stages compute on.
    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// Tensor `name` of `inputs.safetensors`.
    pub fn input(&self, name: &str) -> Result<Tensor> {
        self.inputs.tensor(name)
    }

    /// Whether this is a benchmark case: configs and inputs, no expected
    /// tensors and no weights (`case.json` `kind` says so).
    pub fn is_benchmark(&self) -> bool {
        self.expected.is_none()
    }

    fn reference_files(&self) -> Result<&ReferenceFiles> {
        self.expected.as_ref().ok_or_else(|| {
            Error::not_found(
                self.dir.join("expected.safetensors"),
                "a benchmark case has no expected tensors",
            )
        })
    }

    /// Tensor `name` of `expected.safetensors`.
    pub fn expected(&self, name: &str) -> Result<Tensor> {
        self.reference_files()?.expected(name)
    }

    /// Tensor `name` of the float64 truth, `None` when the case has none.
    pub fn truth(&self, name: &str) -> Result<Option<Tensor>> {
        self.reference_files()?.truth(name)
    }

    /// Tensor `name` of `expected.safetensors` and of its float64 truth.
    pub fn reference(&self, name: &str) -> Result<Reference> {
        self.reference_files()?.reference(name)
    }

    /// Whether the case has a float64 truth.
    pub fn has_truth(&self) -> bool {
        self.expected
            .as_ref()
            .is_some_and(ReferenceFiles::has_truth)
    }

    /// Names in `expected.safetensors` starting with `prefix`.
    pub fn expected_names(&self, prefix: &str) -> Vec<String> {
        let Some(files) = &self.expected else {
            return Vec::new();
        };
        files
            .expected
            .names()
            .filter(|n| n.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }

    /// `case.json` itself.
    pub fn json(&self) -> &serde_json::Value {
        &self.json
    }

    /// A hyper-parameter from `case.json["hyperparameters"]`.
    pub fn hyper(&self, field: &str) -> Result<&serde_json::Value> {
        self.json
            .get("hyperparameters")
            .and_then(|h| h.get(field))
            .ok_or_else(|| {
                Error::config(
                    self.dir.join("case.json"),
                    &format!("hyperparameters.{field}"),
                    "missing",
                )
            })
    }

    /// An integer hyper-parameter.
    pub fn hyper_i64(&self, field: &str) -> Result<i64> {
        self.hyper(field)?.as_i64().ok_or_else(|| {
            Error::config(
                self.dir.join("case.json"),
                &format!("hyperparameters.{field}"),
                "not an integer",
            )
        })
    }

    /// A float hyper-parameter.
    pub fn hyper_f64(&self, field: &str) -> Result<f64> {
        self.hyper(field)?.as_f64().ok_or_else(|| {
            Error::config(
                self.dir.join("case.json"),
                &format!("hyperparameters.{field}"),
                "not a number",
            )
        })
    }

    /// A list of strings at the top level of `case.json` (captions, prompts).
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.json
            .get(key)
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|c| c.as_str().map(str::to_string)).collect())
            .ok_or_else(|| Error::config(self.dir.join("case.json"), key, "want a list of strings"))
    }

    /// How the case normalises advantages (`use_group`: per prompt group, else global).
    pub fn grouping(&self) -> Result<crate::grpo::Grouping> {
        Ok(match self.hyper("use_group")?.as_bool() {
            Some(false) => crate::grpo::Grouping::Global,
            _ => crate::grpo::Grouping::PerPrompt {
                size: self.group_size()?,
            },
        })
    }

    /// `num_generations` (G): samples per prompt.
    pub fn group_size(&self) -> Result<i64> {
        self.hyper_i64("num_generations")
    }
}

impl Case {
    /// The case's transformer (CPU), stored and computing as `precision` says.
    pub fn transformer(&self, precision: super::Precision) -> Result<FluxTransformer> {
        let dir = self.dir.join("transformer");
        let mut model = FluxTransformer::from_dir(&dir, precision.model_kind(), self.device)?;
        model.set_compute_kind(precision.compute_kind());
        Ok(model)
    }

    /// The case's stored conditioning (prompt embeddings in trainer order, position
    /// ids, guidance when the model takes it), sample `b` using prompt `b / G`,
    /// the embeddings in `kind`.
    pub fn conditioning(&self, guidance: bool, kind: Kind) -> Result<Conditioning> {
        self.conditioning_on(guidance, kind, self.device)
    }

    /// [`Self::conditioning`] on `device`.
    pub fn conditioning_on(
        &self,
        guidance: bool,
        kind: Kind,
        device: tch::Device,
    ) -> Result<Conditioning> {
        let guidance = if guidance {
            Some(self.input("guidance")?.double_value(&[0]))
        } else {
            None
        };
        let on = |name: &str| -> Result<Tensor> { Ok(self.input(name)?.to_device(device)) };
        let embeds = |name: &str| -> Result<Tensor> { Ok(on(name)?.to_kind(kind)) };
        Conditioning::new(
            embeds("prompt_embeds")?,
            embeds("pooled_prompt_embeds")?,
            on("txt_ids")?,
            on("img_ids")?,
            guidance,
            self.group_size()?,
        )
    }
}
