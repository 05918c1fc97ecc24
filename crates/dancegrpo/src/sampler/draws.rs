//! The random draws of one iteration as data: initial noise, every SDE noise
//! and every timestep permutation, either replayed from recorded tensors (the
//! reference fixtures) or generated on the CPU from a seed.
//!
//! Seeded draws are a pure function of `(seed, iteration, prompt, member, step)`
//! (one Philox stream per draw), so they do not depend on the device, the
//! rollout batch size, the number of processes or the order of consumption.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::rng::Philox;

/// A source of the random draws of one iteration, indexed by sample `b` of the
/// iteration (`b = prompt_position * G + member`). Tensors are float32 on the CPU.
pub trait Draws {
    /// The initial noise of sample `b`, `(1, c, h, w)` for `shape = [c, h, w]`.
    fn init_noise(&self, b: i64, shape: &[i64]) -> Result<Tensor>;
    /// The standard-normal noise of sample `b` at step `step`, `(1, L, c)` for `shape = [L, c]`.
    fn sde_noise(&self, b: i64, step: i64, shape: &[i64]) -> Result<Tensor>;
    /// A permutation of `0..n` (the order in which sample `b`'s transitions are trained).
    fn permutation(&self, b: i64, n: i64) -> Result<Vec<i64>>;
}

/// Draws replayed from recorded tensors (`inputs.safetensors` of a fixture).
pub struct Recorded {
    init_noise: Tensor, // (1 or B, c, h, w)
    sde_noise: Tensor,  // (B, S, L, c)
    perms: Tensor,      // (B, S-1) int64
}

impl Recorded {
    /// Recorded draws: `init_noise` `(1 or B, c, h, w)` (one shared draw or one
    /// per sample), `sde_noise` `(B, S, L, c)` and `perms` `(B, n)`.
    pub fn new(init_noise: Tensor, sde_noise: Tensor, perms: Tensor) -> Result<Self> {
        let (i, s, p) = (init_noise.size(), sde_noise.size(), perms.size());
        if i.len() != 4 || s.len() != 4 || p.len() != 2 || p[0] != s[0] {
            return Err(Error::Input(format!(
                "recorded draws: init_noise {i:?}, sde_noise {s:?}, perms {p:?} must be (1|B, c, h, w), (B, S, L, c), (B, n)"
            )));
        }
        if i[0] != 1 && i[0] != s[0] {
            return Err(Error::Input(format!(
                "recorded draws: init_noise has {} draws for {} samples (want 1 or {})",
                i[0], s[0], s[0]
            )));
        }
        Ok(Recorded {
            init_noise: init_noise.to_kind(Kind::Float),
            sde_noise: sde_noise.to_kind(Kind::Float),
            perms: perms.to_kind(Kind::Int64),
        })
    }

    fn check_sample(&self, b: i64) -> Result<()> {
        let n = self.sde_noise.size()[0];
        if b < 0 || b >= n {
            return Err(Error::Input(format!(
                "recorded draws hold {n} samples, sample {b} was asked for"
            )));
        }
        Ok(())
    }
}

fn check_shape(what: &str, got: &[i64], want: &[i64]) -> Result<()> {
    if got != want {
        return Err(Error::ShapeMismatch {
            source_desc: "random draws".to_string(),
            name: what.to_string(),
            expected: want.to_vec(),
            found: got.to_vec(),
        });
    }
    Ok(())
}

impl Draws for Recorded {
    fn init_noise(&self, b: i64, shape: &[i64]) -> Result<Tensor> {
        self.check_sample(b)?;
        let draw = if self.init_noise.size()[0] == 1 { 0 } else { b };
        let t = self.init_noise.narrow(0, draw, 1);
        check_shape("init_noise", &t.size()[1..], shape)?;
        Ok(t)
    }

    fn sde_noise(&self, b: i64, step: i64, shape: &[i64]) -> Result<Tensor> {
        self.check_sample(b)?;
        let steps = self.sde_noise.size()[1];
        if step >= steps {
            return Err(Error::Input(format!(
                "recorded draws hold {steps} SDE steps, step {step} was asked for"
            )));
        }
        let t = self.sde_noise.get(b).narrow(0, step, 1);
        check_shape("sde_noise", &t.size()[1..], shape)?;
        Ok(t)
    }

    fn permutation(&self, b: i64, n: i64) -> Result<Vec<i64>> {
        self.check_sample(b)?;
        let row: Vec<i64> = Vec::try_from(&self.perms.get(b))?;
        let mut sorted = row.clone();
        sorted.sort_unstable();
        if sorted != (0..n).collect::<Vec<_>>() {
            return Err(Error::Input(format!(
                "recorded permutation of sample {b} is not a permutation of 0..{n}: {row:?}"
            )));
        }
        Ok(row)
    }
}

/// How the initial noise is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitNoise {
    /// One draw for every sample of the iteration, across prompts (the
    /// reference's `init_same_noise`, default).
    #[default]
    SharedPerIteration,
    /// One draw per prompt, shared by its group.
    SharedPerPrompt,
    /// One draw per sample.
    PerSample,
}

/// The precision the initial noise is drawn in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoisePrecision {
    /// Rounded to bfloat16, as the reference draws it (default).
    #[default]
    Bf16,
    /// Full float32.
    F32,
}

/// Draws generated from a seed: a pure function of
/// `(seed, iteration, prompt id, member, step)`.
#[derive(Debug, Clone)]
pub struct Seeded {
    /// The run's seed.
    pub seed: u64,
    /// The iteration.
    pub iteration: u64,
    /// A stable id per prompt position of the iteration (e.g. its position in the data stream).
    pub prompt_ids: Vec<u64>,
    /// Group size `G`.
    pub group: i64,
    /// How the initial noise is shared.
    pub init: InitNoise,
    /// Precision of the initial noise.
    pub precision: NoisePrecision,
}

impl Seeded {
    fn key(&self, b: i64) -> Result<(u64, i64)> {
        let p = (b / self.group) as usize;
        let id = self.prompt_ids.get(p).ok_or_else(|| {
            Error::Input(format!(
                "seeded draws know {} prompts, sample {b} was asked for",
                self.prompt_ids.len()
            ))
        })?;
        Ok((*id, b % self.group))
    }

    fn rng(&self, name: String) -> Philox {
        Philox::for_stream(self.seed, &name)
    }
}

impl Draws for Seeded {
    fn init_noise(&self, b: i64, shape: &[i64]) -> Result<Tensor> {
        let (prompt, member) = self.key(b)?;
        let it = self.iteration;
        let name = match self.init {
            InitNoise::SharedPerIteration => format!("init/{it}"),
            InitNoise::SharedPerPrompt => format!("init/{it}/{prompt}"),
            InitNoise::PerSample => format!("init/{it}/{prompt}/{member}"),
        };
        let t = self.rng(name).normal_tensor(shape).unsqueeze(0);
        Ok(match self.precision {
            NoisePrecision::Bf16 => t.to_kind(Kind::BFloat16).to_kind(Kind::Float),
            NoisePrecision::F32 => t,
        })
    }

    fn sde_noise(&self, b: i64, step: i64, shape: &[i64]) -> Result<Tensor> {
        let (prompt, member) = self.key(b)?;
        let name = format!("sde/{}/{prompt}/{member}/{step}", self.iteration);
        Ok(self.rng(name).normal_tensor(shape).unsqueeze(0))
    }

    fn permutation(&self, b: i64, n: i64) -> Result<Vec<i64>> {
        let (prompt, member) = self.key(b)?;
        let mut rng = self.rng(format!("perm/{}/{prompt}/{member}", self.iteration));
        let mut perm: Vec<i64> = (0..n).collect();
        for i in (1..perm.len()).rev() {
            let j = (rng.uniform() * (i + 1) as f64) as usize;
            perm.swap(i, j.min(i));
        }
        Ok(perm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(ids: Vec<u64>, init: InitNoise) -> Seeded {
        Seeded {
            seed: 7,
            iteration: 3,
            prompt_ids: ids,
            group: 2,
            init,
            precision: NoisePrecision::Bf16,
        }
    }

    #[test]
    fn seeded_draws_depend_only_on_their_key() {
        let a = seeded(vec![10, 11], InitNoise::PerSample);
        // the same prompt id at another position of another batch: same draws
        let b = seeded(vec![11], InitNoise::PerSample);
        assert!(a
            .sde_noise(3, 2, &[4, 8])
            .unwrap()
            .equal(&b.sde_noise(1, 2, &[4, 8]).unwrap()));
        assert!(!a
            .sde_noise(3, 2, &[4, 8])
            .unwrap()
            .equal(&a.sde_noise(2, 2, &[4, 8]).unwrap()));
        assert_eq!(a.permutation(3, 5).unwrap(), b.permutation(1, 5).unwrap());
        let mut p = a.permutation(0, 9).unwrap();
        p.sort_unstable();
        assert_eq!(p, (0..9).collect::<Vec<_>>());
        // bf16 initial noise: exactly representable in bf16
        let z = a.init_noise(0, &[2, 4, 4]).unwrap();
        assert!(z.equal(&z.to_kind(Kind::BFloat16).to_kind(Kind::Float)));
        assert!(!z.equal(&a.init_noise(1, &[2, 4, 4]).unwrap()));
        let shared = seeded(vec![10, 11], InitNoise::SharedPerIteration);
        assert!(shared
            .init_noise(0, &[2, 4, 4])
            .unwrap()
            .equal(&shared.init_noise(3, &[2, 4, 4]).unwrap()));
    }

    #[test]
    fn recorded_draws_check_shapes() {
        let r = Recorded::new(
            Tensor::zeros([1, 2, 4, 4], (Kind::Float, tch::Device::Cpu)),
            Tensor::zeros([2, 3, 4, 8], (Kind::Float, tch::Device::Cpu)),
            Tensor::from_slice(&[1i64, 0, 0, 1]).reshape([2, 2]),
        )
        .unwrap();
        assert_eq!(r.init_noise(1, &[2, 4, 4]).unwrap().size(), [1, 2, 4, 4]);
        assert!(r.init_noise(1, &[2, 8, 8]).is_err());
        assert!(r.sde_noise(2, 0, &[4, 8]).is_err());
        assert_eq!(r.permutation(0, 2).unwrap(), vec![1, 0]);
        assert!(r.permutation(0, 3).is_err());
    }
}
