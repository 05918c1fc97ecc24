//! Group-relative advantages: `(r - mean) / (std_unbiased + 1e-8)` per group of
//! `G` consecutive samples (or over the whole batch), clamped to `+-clip`.

use tch::Tensor;

use crate::error::{Error, Result};

/// Which samples an advantage is normalised against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// Each prompt's `G` consecutive samples (the reference's `use_group`).
    PerPrompt {
        /// Group size `G` (at least 2: the unbiased std needs two samples).
        size: i64,
    },
    /// The whole batch.
    Global,
}

/// Advantages before and after clamping, and how many groups were skipped.
#[derive(Debug)]
pub struct Advantages {
    /// `(r - mean) / (std + 1e-8)` per sample, float32 `(B,)`.
    pub raw: Tensor,
    /// `raw` clamped to `+-clip`.
    pub clamped: Tensor,
    /// Groups left at zero advantage because a reward was NaN.
    pub skipped_groups: usize,
}

/// Computes advantages of `rewards` `(B,)` with the reference's float32 ops.
/// A group whose rewards are all equal gets zero advantages; a group holding a
/// NaN reward is skipped (zero advantages) and counted.
pub fn advantages(rewards: &Tensor, grouping: Grouping, clip: f64) -> Result<Advantages> {
    let b = rewards
        .size1()
        .map_err(|_| Error::Input(format!("rewards must be 1-d, got {:?}", rewards.size())))?;
    let size = match grouping {
        Grouping::PerPrompt { size } if size < 2 => {
            return Err(Error::Input(format!(
                "per-group advantages need a group size >= 2, got {size}"
            )))
        }
        Grouping::PerPrompt { size } if b % size != 0 => {
            return Err(Error::Input(format!(
                "{b} rewards do not split into groups of {size}"
            )))
        }
        Grouping::PerPrompt { size } => size,
        Grouping::Global => b,
    };
    let raw = rewards.zeros_like();
    let mut skipped_groups = 0;
    for g in 0..b / size {
        let r = rewards.narrow(0, g * size, size);
        if r.isnan().any().int64_value(&[]) != 0 {
            skipped_groups += 1;
            continue;
        }
        let std = r.std(true) + 1e-8;
        raw.narrow(0, g * size, size)
            .copy_(&((&r - r.mean(None)) / std));
    }
    let clamped = raw.clamp(-clip, clip);
    Ok(Advantages {
        raw,
        clamped,
        skipped_groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_have_zero_mean_unit_std_and_equal_rewards_give_zero() {
        let r = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]);
        let a = advantages(&r, Grouping::PerPrompt { size: 4 }, 5.0).unwrap();
        let g0 = a.raw.narrow(0, 0, 4);
        assert!(g0.mean(None).double_value(&[]).abs() < 1e-6);
        assert!((g0.std(true).double_value(&[]) - 1.0).abs() < 1e-6);
        assert_eq!(
            Vec::<f32>::try_from(&a.raw.narrow(0, 4, 4)).unwrap(),
            vec![0.0; 4]
        );
        let clipped = advantages(&r, Grouping::PerPrompt { size: 4 }, 0.5).unwrap();
        assert_eq!(clipped.clamped.abs().max().double_value(&[]), 0.5);
    }

    #[test]
    fn nan_groups_are_skipped_and_bad_sizes_rejected() {
        let r = Tensor::from_slice(&[1.0f32, f32::NAN, 3.0, 4.0]);
        let a = advantages(&r, Grouping::PerPrompt { size: 2 }, 5.0).unwrap();
        assert_eq!(a.skipped_groups, 1);
        assert_eq!(a.raw.isnan().any().int64_value(&[]), 0);
        assert!(advantages(&r, Grouping::PerPrompt { size: 1 }, 5.0).is_err());
        assert!(advantages(&r, Grouping::PerPrompt { size: 3 }, 5.0).is_err());
    }
}
