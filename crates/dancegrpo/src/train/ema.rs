//! An exponential moving average of the trained parameters, updated after
//! every iteration: `shadow += (1 - decay) * (param - shadow)`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Error, Result};
use crate::io::safetensors::{write_safetensors, SafetensorsFile};

/// EMA settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    /// Decay per update.
    pub decay: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig { decay: 0.999 }
    }
}

/// The moving average of a list of named parameters.
pub struct Ema {
    decay: f64,
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// Starts the average at the current values of `params`.
    pub fn new(cfg: &EmaConfig, params: &[(String, Tensor)]) -> Result<Self> {
        if !(0.0..1.0).contains(&cfg.decay) {
            return Err(Error::Input(format!(
                "EMA decay must be in [0, 1), got {}",
                cfg.decay
            )));
        }
        let shadow = params
            .iter()
            .map(|(n, p)| (n.clone(), p.detach().copy()))
            .collect();
        Ok(Ema {
            decay: cfg.decay,
            shadow,
        })
    }

    /// Moves the average towards `params` (same names and order as at construction).
    pub fn update(&mut self, params: &[(String, Tensor)]) {
        let _guard = tch::no_grad_guard();
        for ((_, s), (_, p)) in self.shadow.iter_mut().zip(params) {
            let _ = s.lerp_(&p.detach(), 1.0 - self.decay);
        }
    }

    /// The averaged tensors.
    pub fn shadow(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    /// Writes the average to `path` (safetensors, parameter names).
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = BTreeMap::from([("ema_decay".to_string(), self.decay.to_string())]);
        write_safetensors(path, &self.shadow, &meta)
    }

    /// Replaces the average by `tensors` (same order and shapes as at construction).
    pub fn restore(&mut self, tensors: Vec<Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for ((name, s), t) in self.shadow.iter_mut().zip(tensors) {
            if t.size() != s.size() {
                return Err(Error::Input(format!(
                    "EMA {name}: shape {:?}, the model's {:?}",
                    t.size(),
                    s.size()
                )));
            }
            s.copy_(&t);
        }
        Ok(())
    }

    /// Reads the average back from `path` (every name must be present with its shape).
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let file = SafetensorsFile::open(path)?;
        let _guard = tch::no_grad_guard();
        for (name, s) in &mut self.shadow {
            let t = file.tensor(name)?;
            if t.size() != s.size() {
                return Err(Error::ShapeMismatch {
                    source_desc: path.display().to_string(),
                    name: name.clone(),
                    expected: s.size(),
                    found: t.size(),
                });
            }
            s.copy_(&t.to_kind(s.kind()).to_device(s.device()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_follows_the_closed_form() {
        let p = Tensor::from_slice(&[0.0f32, 10.0]);
        let params = vec![("w".to_string(), p.shallow_clone())];
        let mut ema = Ema::new(&EmaConfig { decay: 0.5 }, &params).unwrap();
        let _ = p.shallow_clone().fill_(4.0);
        ema.update(&params);
        ema.update(&params);
        // shadow = 4 + (x0 - 4) * 0.5^2
        let v: Vec<f32> = Vec::try_from(&ema.shadow()[0].1).unwrap();
        assert_eq!(v, vec![3.0, 5.5]);
        assert!(Ema::new(&EmaConfig { decay: 1.0 }, &params).is_err());
    }
}
