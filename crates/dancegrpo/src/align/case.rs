//! A reference case directory: `case.json`, `inputs.safetensors`,
//! `expected.safetensors` and the model directories beside them.

use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::error::{Error, Result};
use crate::io::json::read_json;
use crate::io::safetensors::SafetensorsFile;
use crate::sampler::Conditioning;

/// An opened reference case.
pub struct Case {
    dir: PathBuf,
    name: String,
    json: serde_json::Value,
    inputs: SafetensorsFile,
    expected: SafetensorsFile,
}

impl Case {
    /// Opens the case in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
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
        let expected = SafetensorsFile::open(dir.join("expected.safetensors"))?;
        Ok(Case {
            dir: dir.to_path_buf(),
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

    /// Tensor `name` of `inputs.safetensors`.
    pub fn input(&self, name: &str) -> Result<Tensor> {
        self.inputs.tensor(name)
    }

    /// Tensor `name` of `expected.safetensors`.
    pub fn expected(&self, name: &str) -> Result<Tensor> {
        self.expected.tensor(name)
    }

    /// Names in `expected.safetensors` starting with `prefix`.
    pub fn expected_names(&self, prefix: &str) -> Vec<String> {
        self.expected
            .names()
            .filter(|n| n.starts_with(prefix))
            .map(str::to_string)
            .collect()
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
    /// The case's stored conditioning (prompt embeddings in trainer order, position
    /// ids, guidance when the model takes it), sample `b` using prompt `b / G`.
    pub fn conditioning(&self, guidance: bool) -> Result<Conditioning> {
        self.conditioning_on(guidance, tch::Device::Cpu)
    }

    /// [`Self::conditioning`] on `device`.
    pub fn conditioning_on(&self, guidance: bool, device: tch::Device) -> Result<Conditioning> {
        let guidance = if guidance {
            Some(self.input("guidance")?.double_value(&[0]))
        } else {
            None
        };
        let on = |name: &str| -> Result<Tensor> { Ok(self.input(name)?.to_device(device)) };
        Conditioning::new(
            on("prompt_embeds")?,
            on("pooled_prompt_embeds")?,
            on("txt_ids")?,
            on("img_ids")?,
            guidance,
            self.group_size()?,
        )
    }
}
