//! Several processes training one model: PyTorch's own c10d process groups
//! (Gloo on the CPU, NCCL on CUDA) behind the [`Collective`] trait, the launch
//! environment `torchrun` sets, and how an iteration's samples are shared out.
//!
//! The GRPO code depends only on [`Collective`]; [`SingleProcess`] makes every
//! operation the identity, so one process runs exactly as without this module.

mod c10d;
pub mod fsdp;
mod launch;
mod shard;
pub mod sharding;

pub use c10d::{DistBackend, ProcessGroup};
pub use launch::Launch;
pub use shard::{shard_samples, Shard, Subset};
pub use sharding::{Gather, ParallelConfig, Sharding};

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::precision::ReduceDtype;

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

    /// Gathers every process's 1-d `input` (`n` elements) into the 1-d `output`
    /// (`world * n`), rank `r`'s at `[r n, (r + 1) n)`. The default, one
    /// all-reduce of a zeroed `output` holding only this rank's part, is exact
    /// (each element is its owner's value plus zeros) and serves one process
    /// and tests; process groups use the backend's own all-gather.
    fn all_gather_into(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        check_gather_sizes(self, output, input)?;
        let n = input.numel() as i64;
        let _ = output.shallow_clone().zero_();
        output.narrow(0, self.rank() * n, n).copy_(input);
        self.all_reduce_sum(output)
    }

    /// Sums the 1-d `input` (`world * n` elements) over the processes and leaves
    /// this rank's part `[r n, (r + 1) n)` of the sum in `output` (`n`). The
    /// default goes through a full all-reduce (world times the traffic of a
    /// reduce-scatter); process groups use the backend's own.
    fn reduce_scatter_sum(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        check_gather_sizes(self, input, output)?;
        let n = output.numel() as i64;
        let sum = input.copy();
        self.all_reduce_sum(&sum)?;
        output
            .shallow_clone()
            .copy_(&sum.narrow(0, self.rank() * n, n));
        Ok(())
    }

    /// Exchanges equal blocks: the 1-d `input` (`world * n`) is split into
    /// `world` blocks, block `j` goes to rank `j`, and `output` (`world * n`)
    /// receives at `[j n, (j + 1) n)` what rank `j` sent this rank. The default
    /// gathers every process's whole input (world times the traffic of an
    /// all-to-all: one process and tests); process groups use the backend's own.
    fn all_to_all(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        check_exchange_sizes(self, output, input)?;
        let (w, r) = (self.world_size(), self.rank());
        let n = input.numel() as i64 / w;
        let all = Tensor::zeros([w * w * n], (input.kind(), input.device()));
        self.all_gather_into(&all, &input.contiguous())?; // rank j's input at [j w n, (j + 1) w n)
        for j in 0..w {
            let block = all.narrow(0, (j * w + r) * n, n);
            output.narrow(0, j * n, n).copy_(&block);
        }
        Ok(())
    }
}

/// Checks that `output` and `input` (1-d) hold the same number of elements,
/// a multiple of the world size (equal blocks for an all-to-all).
fn check_exchange_sizes<C: Collective + ?Sized>(
    c: &C,
    output: &Tensor,
    input: &Tensor,
) -> Result<()> {
    let (o, i, w) = (output.size(), input.size(), c.world_size());
    match (o.len(), i.len()) {
        (1, 1) if o[0] == i[0] && i[0] % w == 0 => Ok(()),
        _ => Err(crate::error::Error::Input(format!(
            "all-to-all: 1-d buffers of equal size, a multiple of {w}, expected; got {o:?} and {i:?}"
        ))),
    }
}

/// Checks that `full` (1-d) holds `world` times the elements of `part` (1-d).
fn check_gather_sizes<C: Collective + ?Sized>(c: &C, full: &Tensor, part: &Tensor) -> Result<()> {
    let (f, p) = (full.size(), part.size());
    if f.len() != 1 || p.len() != 1 || f[0] != p[0] * c.world_size() {
        return Err(crate::Error::Input(format!(
            "a gathered tensor of {f:?} for parts of {p:?} on {} processes",
            c.world_size()
        )));
    }
    Ok(())
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

/// Elements per all-reduce of the gradients (several processes).
pub const GRAD_BUCKET: i64 = 1 << 24;

/// Sums the gradients of `params` over the processes, in buckets of about
/// `bucket` elements (one flat tensor per bucket and kind), in the gradients'
/// own dtype or, with [`ReduceDtype::Bf16`], in bfloat16 (half the bytes, each
/// sum rounded to bfloat16, then written back into the float32 gradients).
pub fn all_reduce_grads(
    c: &dyn Collective,
    params: &[Tensor],
    bucket: i64,
    reduce: ReduceDtype,
) -> Result<()> {
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
            reduce_bucket(c, &group, reduce)?;
        }
    }
    Ok(())
}

/// Checks that every process holds the same parameters as rank 0, bit for
/// bit: each parameter's bit patterns summed as integers (exact, independent
/// of the order of the additions), compared with rank 0's. An error names the
/// first parameter that differs on this process.
pub fn check_in_sync(c: &dyn Collective, named: &[(String, Tensor)]) -> Result<()> {
    if c.world_size() == 1 {
        return Ok(());
    }
    let sums: Vec<i64> = named.iter().map(|(_, p)| bit_sum(p)).collect();
    let ours = Tensor::from_slice(&sums);
    let root = ours.copy();
    c.broadcast(&root, 0)?;
    let differs: Vec<bool> = Vec::try_from(&ours.ne_tensor(&root))?;
    let first = differs.iter().position(|&d| d);
    let count = Tensor::from_slice(&[first.is_some() as i64]);
    c.all_reduce_sum(&count)?;
    match (first, count.int64_value(&[0])) {
        (_, 0) => Ok(()),
        (Some(i), n) => Err(crate::Error::Input(format!(
            "processes out of step: rank {}'s `{}` differs from rank 0's ({n} process(es) differ)",
            c.rank(),
            named[i].0
        ))),
        (None, n) => Err(crate::Error::Input(format!(
            "processes out of step: {n} process(es) hold parameters that differ from rank 0's"
        ))),
    }
}

/// The bit patterns of `t`'s elements summed as integers.
fn bit_sum(t: &Tensor) -> i64 {
    let t = t.detach().to_device(tch::Device::Cpu).contiguous();
    let bits = match t.kind() {
        Kind::Double | Kind::Int64 => t.view_dtype(Kind::Int64),
        Kind::Float | Kind::Int => t.view_dtype(Kind::Int),
        Kind::BFloat16 | Kind::Half | Kind::Int16 => t.view_dtype(Kind::Int16),
        _ => t.to_kind(Kind::Int64),
    };
    // int64 sums wrap on overflow in two's complement, which is still exact
    bits.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[])
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

fn reduce_bucket(c: &dyn Collective, group: &[&Tensor], reduce: ReduceDtype) -> Result<()> {
    let flat: Vec<Tensor> = group.iter().map(|g| g.reshape([-1])).collect();
    let all = Tensor::cat(&flat, 0); // (sum numel,)
    let all = match reduce {
        ReduceDtype::Fp32 => all,
        ReduceDtype::Bf16 => all.to_kind(Kind::BFloat16),
    };
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
    fn bit_sums_see_the_last_bit_and_not_the_order() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let b = Tensor::from_slice(&[3.0f32, 1.0, 2.0]);
        assert_eq!(bit_sum(&a), bit_sum(&b));
        let c = Tensor::from_slice(&[1.0f32, 2.0, f32::from_bits(3.0f32.to_bits() + 1)]);
        assert_eq!(bit_sum(&c), bit_sum(&a) + 1);
        assert!(check_in_sync(&SingleProcess, &[("w".into(), a)]).is_ok());
    }

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
