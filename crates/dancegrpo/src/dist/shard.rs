//! How the samples of an iteration are shared among processes so that every
//! accumulation window is the same set of samples whatever the process count.

use tch::Tensor;

use super::{Collective, SingleProcess};
use crate::error::{Error, Result};
use crate::sampler::Draws;

/// The samples (global indices, ascending) process `rank` of `world` handles in
/// an iteration of `total` samples with `grad_accum` samples per optimizer step
/// (over all processes): in every window of `grad_accum` consecutive samples,
/// the `rank`-th block of `grad_accum / world`. A process's k-th local window is
/// then its part of the global k-th window, and the windows of one process and
/// of many hold the same samples. `grad_accum` must be a multiple of `world`.
pub fn shard_samples(total: i64, grad_accum: i64, world: i64, rank: i64) -> Vec<i64> {
    let per = (grad_accum / world).max(1);
    (0..total)
        .filter(|s| (s % grad_accum) / per == rank)
        .collect()
}

/// The draws of a subset of an iteration's samples: local sample `b` is
/// sample `samples[b]` of `inner`.
pub struct Subset<'a> {
    inner: &'a dyn Draws,
    samples: Vec<i64>,
}

impl<'a> Subset<'a> {
    /// Local sample `b` draws as `inner`'s sample `samples[b]`.
    pub fn new(inner: &'a dyn Draws, samples: Vec<i64>) -> Self {
        Subset { inner, samples }
    }

    fn global(&self, b: i64) -> Result<i64> {
        self.samples.get(b as usize).copied().ok_or_else(|| {
            Error::Input(format!(
                "sample {b} asked of a subset of {} samples",
                self.samples.len()
            ))
        })
    }
}

impl Draws for Subset<'_> {
    fn init_noise(&self, b: i64, shape: &[i64]) -> Result<Tensor> {
        self.inner.init_noise(self.global(b)?, shape)
    }
    fn sde_noise(&self, b: i64, step: i64, shape: &[i64]) -> Result<Tensor> {
        self.inner.sde_noise(self.global(b)?, step, shape)
    }
    fn permutation(&self, b: i64, n: i64) -> Result<Vec<i64>> {
        self.inner.permutation(self.global(b)?, n)
    }
}

/// This process's part of an iteration: the global index of each local sample
/// (the rows of its rollout), the iteration's sample count over all processes,
/// and the collective that joins the parts.
pub struct Shard<'a> {
    samples: Vec<i64>,
    total: i64,
    collective: &'a dyn Collective,
}

static SINGLE: SingleProcess = SingleProcess;

impl Shard<'static> {
    /// All `total` samples in one process.
    pub fn whole(total: i64) -> Self {
        Shard {
            samples: (0..total).collect(),
            total,
            collective: &SINGLE,
        }
    }
}

impl<'a> Shard<'a> {
    /// This process's samples of [`shard_samples`] for `collective`'s rank.
    pub fn of_rank(total: i64, grad_accum: i64, collective: &'a dyn Collective) -> Self {
        let (w, r) = (collective.world_size(), collective.rank());
        Shard {
            samples: shard_samples(total, grad_accum, w, r),
            total,
            collective,
        }
    }

    /// Global index of each local sample, ascending.
    pub fn samples(&self) -> &[i64] {
        &self.samples
    }

    /// Samples of the iteration over all processes.
    pub fn total(&self) -> i64 {
        self.total
    }

    /// The collective joining the processes.
    pub fn collective(&self) -> &'a dyn Collective {
        self.collective
    }

    /// `local` `(n, ..)`, one row per local sample, gathered into `(total, ..)` on every process.
    pub fn gather(&self, local: &Tensor) -> Result<Tensor> {
        super::gather_rows(self.collective, local, &self.samples, self.total)
    }

    /// The local rows of a `(total, ..)` tensor.
    pub fn local_rows(&self, global: &Tensor) -> Tensor {
        if self.samples.len() as i64 == self.total {
            return global.shallow_clone();
        }
        let idx = Tensor::from_slice(&self.samples).to_device(global.device());
        global.index_select(0, &idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_every_window() {
        // 2 prompts x 8 = 16 samples, 8 per step, 2 processes
        assert_eq!(shard_samples(16, 8, 2, 0), vec![0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(shard_samples(16, 8, 2, 1), vec![4, 5, 6, 7, 12, 13, 14, 15]);
        assert_eq!(shard_samples(16, 16, 1, 0), (0..16).collect::<Vec<_>>());
        // a last partial window (18 % 8 = 2) goes to the first block
        let all: Vec<Vec<i64>> = (0..4).map(|r| shard_samples(18, 8, 4, r)).collect();
        assert_eq!(all[0], vec![0, 1, 8, 9, 16, 17]);
        let mut union: Vec<i64> = all.concat();
        union.sort_unstable();
        assert_eq!(union, (0..18).collect::<Vec<_>>());
    }
}
