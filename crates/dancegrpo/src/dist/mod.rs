//! Several processes training one model: PyTorch's own c10d process groups
//! (Gloo on the CPU, NCCL on CUDA) behind the [`Collective`] trait, the launch
//! environment `torchrun` sets, and how an iteration's samples are shared out.
//!
//! The GRPO code depends only on [`Collective`]; [`SingleProcess`] makes every
//! operation the identity, so one process runs exactly as without this module.

mod c10d;
mod launch;
mod shard;

pub use c10d::{DistBackend, ProcessGroup};
pub use launch::Launch;
pub use shard::{shard_samples, Subset};

use tch::{Kind, Tensor};

use crate::error::Result;

/// Collective operations over the processes of a run. Every process must make
/// the same calls in the same order with tensors of the same shapes and kinds.
pub trait Collective {
    /// This process's rank, `0 .. world_size`.
    fn rank(&self) -> i64;
    /// Number of processes.
    fn world_size(&self) -> i64;
    /// Sums `tensor` element-wise over the processes, in place.
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()>;
    /// Replaces `tensor` by the one of process `root`.
    fn broadcast(&self, tensor: &Tensor, root: i64) -> Result<()>;
}

/// One process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> i64 {
        0
    }
    fn world_size(&self) -> i64 {
        1
    }
    fn all_reduce_sum(&self, _tensor: &Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _tensor: &Tensor, _root: i64) -> Result<()> {
        Ok(())
    }
}

/// Whether this process writes the run's files (rank 0).
pub fn is_writer(c: &dyn Collective) -> bool {
    c.rank() == 0
}

/// Waits until every process has reached this point.
pub fn barrier(c: &dyn Collective) -> Result<()> {
    if c.world_size() == 1 {
        return Ok(());
    }
    c.all_reduce_sum(&Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)))
}

/// The rows of every process in one tensor: `local` `(n, ..)` holds the rows
/// `ids` (distinct over all processes) of a `(total, ..)` result, which every
/// process receives. Exact: each element is its owner's value plus zeros.
pub fn gather_rows(c: &dyn Collective, local: &Tensor, ids: &[i64], total: i64) -> Result<Tensor> {
    if c.world_size() == 1 && ids.iter().copied().eq(0..total) {
        return Ok(local.shallow_clone());
    }
    let mut shape = local.size();
    shape[0] = total;
    let mut out = Tensor::zeros(&shape, (local.kind(), local.device()));
    let idx = Tensor::from_slice(ids).to_device(local.device());
    let _ = out.index_copy_(0, &idx, local);
    c.all_reduce_sum(&out)?;
    Ok(out)
}

/// Sums the gradients of `params` over the processes, in buckets of about
/// `bucket` elements (one flat tensor per bucket and kind).
pub fn all_reduce_grads(c: &dyn Collective, params: &[Tensor], bucket: i64) -> Result<()> {
    if c.world_size() == 1 {
        return Ok(());
    }
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    for kind in distinct_kinds(&grads) {
        let same: Vec<&Tensor> = grads.iter().filter(|g| g.kind() == kind).collect();
        for group in buckets(&same, bucket) {
            reduce_bucket(c, &group)?;
        }
    }
    Ok(())
}

fn distinct_kinds(ts: &[Tensor]) -> Vec<Kind> {
    let mut kinds: Vec<Kind> = Vec::new();
    for t in ts {
        if !kinds.contains(&t.kind()) {
            kinds.push(t.kind());
        }
    }
    kinds
}

fn buckets<'a>(ts: &[&'a Tensor], bucket: i64) -> Vec<Vec<&'a Tensor>> {
    let mut out: Vec<Vec<&Tensor>> = vec![Vec::new()];
    let mut filled = 0;
    for &t in ts {
        if filled >= bucket.max(1) {
            out.push(Vec::new());
            filled = 0;
        }
        filled += t.numel() as i64;
        out.last_mut().expect("non-empty").push(t);
    }
    out.retain(|b| !b.is_empty());
    out
}

fn reduce_bucket(c: &dyn Collective, group: &[&Tensor]) -> Result<()> {
    let flat: Vec<Tensor> = group.iter().map(|g| g.reshape([-1])).collect();
    let all = Tensor::cat(&flat, 0); // (sum numel,)
    c.all_reduce_sum(&all)?;
    let mut at = 0;
    for g in group {
        let n = g.numel() as i64;
        let mut g = g.shallow_clone();
        g.copy_(&all.narrow(0, at, n).view_as(&g));
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_by_size_and_keep_order() {
        let ts: Vec<Tensor> = [3, 5, 2, 7]
            .iter()
            .map(|&n| Tensor::zeros([n], (Kind::Float, tch::Device::Cpu)))
            .collect();
        let refs: Vec<&Tensor> = ts.iter().collect();
        let sizes: Vec<Vec<i64>> = buckets(&refs, 8)
            .iter()
            .map(|b| b.iter().map(|t| t.numel() as i64).collect())
            .collect();
        assert_eq!(sizes, vec![vec![3, 5], vec![2, 7]]);
        assert_eq!(buckets(&refs, 100).len(), 1);
    }

    #[test]
    fn single_process_collectives_are_identities() {
        let c = SingleProcess;
        let t = Tensor::from_slice(&[1.0f32, -0.0, f32::NAN]);
        let g = gather_rows(&c, &t, &[0, 1, 2], 3).unwrap();
        let v: Vec<f32> = Vec::try_from(&g).unwrap();
        assert_eq!(v[0], 1.0);
        assert!(v[1] == 0.0 && v[1].is_sign_negative());
        assert!(v[2].is_nan());
        // a subset is scattered into zeros
        let g = gather_rows(&c, &Tensor::from_slice(&[5.0f32]), &[1], 3).unwrap();
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![0.0, 5.0, 0.0]);
    }
}
