//! Group-relative advantages: `(r - mean) / (std_unbiased + 1e-8)` per group of
//! `G` consecutive samples (or over the whole batch), clamped to `+-clip`.

use tch::{Kind, Tensor};

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

/// How several rewards are combined into one advantage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardMixing {
    /// Weighted sum of the scores, then one advantage (the default).
    #[default]
    Reward,
    /// One advantage per reward (each normalised on its own), then their
    /// weighted sum, then the clamp ([`mixed_advantages`]).
    Advantage,
}

/// Advantages before and after clamping, and how failed rewards shaped them.
#[derive(Debug)]
pub struct Advantages {
    /// `(r - mean) / (std + 1e-8)` per sample, float32 `(B,)`.
    pub raw: Tensor,
    /// `raw` clamped to `+-clip`.
    pub clamped: Tensor,
    /// Groups left at zero advantage: fewer than 2 of their rewards are valid.
    pub skipped_groups: usize,
    /// Groups normalised over their valid rewards only (some failed).
    pub partial_groups: usize,
}

/// Computes advantages of `rewards` `(B,)` with the reference's float32 ops.
/// A group whose rewards are all equal gets zero advantages. A failed reward
/// (non-finite) is left out of its group's mean and std and gets advantage 0;
/// a group with fewer than 2 valid rewards is skipped (zero advantages) and counted.
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
    let (mut skipped_groups, mut partial_groups) = (0, 0);
    for g in 0..b / size {
        let r = rewards.narrow(0, g * size, size); // (size,)
        let valid = r.isfinite();
        let n_valid = valid.sum(Kind::Int64).int64_value(&[]);
        let a = if n_valid == size {
            let std = r.std(true) + 1e-8;
            (&r - r.mean(None)) / std
        } else if n_valid >= 2 {
            partial_groups += 1;
            let v = r.masked_select(&valid); // (n_valid,)
            let std = v.std(true) + 1e-8;
            ((&r - v.mean(None)) / std).masked_fill(&valid.logical_not(), 0.0)
        } else {
            skipped_groups += 1;
            continue;
        };
        raw.narrow(0, g * size, size).copy_(&a);
    }
    let clamped = raw.clamp(-clip, clip);
    Ok(Advantages {
        raw,
        clamped,
        skipped_groups,
        partial_groups,
    })
}

/// Advantage-level mixing of `parts` (weight, rewards `(B,)`): each part's
/// advantages as [`advantages`] computes them (unclamped), summed with the
/// weights, then clamped to `+-clip`. An item that failed (non-finite) in any
/// part counts as failed in every part, so every part leaves it out alike.
pub fn mixed_advantages(
    parts: &[(f64, Tensor)],
    grouping: Grouping,
    clip: f64,
) -> Result<Advantages> {
    let first = &parts
        .first()
        .ok_or_else(|| Error::Input("advantage mixing: no rewards".into()))?
        .1;
    let failed = parts
        .iter()
        .map(|(_, r)| r.isfinite().logical_not())
        .reduce(|a, b| a.logical_or(&b))
        .expect("at least one part");
    let mut raw = first.zeros_like();
    let (mut skipped_groups, mut partial_groups) = (0, 0);
    for (weight, r) in parts {
        if r.size() != first.size() {
            return Err(Error::Input(format!(
                "advantage mixing: rewards of shapes {:?} and {:?}",
                first.size(),
                r.size()
            )));
        }
        let a = advantages(&r.masked_fill(&failed, f64::NAN), grouping, f64::INFINITY)?;
        (skipped_groups, partial_groups) = (a.skipped_groups, a.partial_groups);
        raw += a.raw * *weight;
    }
    let clamped = raw.clamp(-clip, clip);
    Ok(Advantages {
        raw,
        clamped,
        skipped_groups,
        partial_groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantage_mixing_matches_hand_computed_values() {
        // Group of 2: rewards (1, 3) -> mean 2, unbiased std sqrt(2):
        // advantages (-1/sqrt 2, 1/sqrt 2) whatever the scale of the reward.
        // Part A (weight 1): (1, 3) and (5, 5)      -> (-0.70711, 0.70711), (0, 0)
        // Part B (weight 0.5): (10, 0) and (2, 4)   -> (0.70711, -0.70711), (-0.70711, 0.70711)
        let a = Tensor::from_slice(&[1.0f32, 3.0, 5.0, 5.0]);
        let b = Tensor::from_slice(&[10.0f32, 0.0, 2.0, 4.0]);
        let m = mixed_advantages(
            &[(1.0, a.shallow_clone()), (0.5, b.shallow_clone())],
            Grouping::PerPrompt { size: 2 },
            5.0,
        )
        .unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let want = [-h + 0.5 * h, h - 0.5 * h, -0.5 * h, 0.5 * h];
        let got = Vec::<f32>::try_from(&m.raw).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        // Reward-level mixing of the same numbers: (6, 3) and (6, 7) -> (+h, -h), (-h, +h).
        let r = advantages(&(&a + &b * 0.5), Grouping::PerPrompt { size: 2 }, 5.0).unwrap();
        let got_r = Vec::<f32>::try_from(&r.raw).unwrap();
        assert!((got_r[0] - h).abs() < 1e-6 && (got_r[2] + h).abs() < 1e-6);
        // The clamp applies to the sum; a failure in one part skips the group in all.
        let clamped = mixed_advantages(
            &[(4.0, a.shallow_clone()), (4.0, b.shallow_clone())],
            Grouping::PerPrompt { size: 2 },
            1.0,
        )
        .unwrap();
        assert_eq!(Vec::<f32>::try_from(&clamped.clamped).unwrap()[3], 1.0);
        let b_nan = Tensor::from_slice(&[10.0f32, 0.0, f32::NAN, 4.0]);
        let m = mixed_advantages(
            &[(1.0, a), (0.5, b_nan)],
            Grouping::PerPrompt { size: 2 },
            5.0,
        )
        .unwrap();
        assert_eq!(m.skipped_groups, 1);
        assert_eq!(Vec::<f32>::try_from(&m.raw).unwrap()[2..], [0.0, 0.0]);
        assert!(mixed_advantages(&[], Grouping::Global, 5.0).is_err());
    }

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
    fn failed_rewards_are_left_out_of_their_group() {
        // group 0: 1, NaN, 3, 5 -> over (1, 3, 5): mean 3, std 2 -> (-1, 0, 0, 1)
        // group 1: 2, inf, NaN, 7 -> over (2, 7): mean 4.5, std 3.5355
        //   -> (-0.70711, 0, 0, 0.70711)
        // group 2: 4, NaN, NaN, NaN -> one valid: skipped (zeros)
        let n = f32::NAN;
        let r = Tensor::from_slice(&[
            1.0f32,
            n,
            3.0,
            5.0,
            2.0,
            f32::INFINITY,
            n,
            7.0,
            4.0,
            n,
            n,
            n,
        ]);
        let a = advantages(&r, Grouping::PerPrompt { size: 4 }, 5.0).unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let want = [-1.0, 0.0, 0.0, 1.0, -h, 0.0, 0.0, h, 0.0, 0.0, 0.0, 0.0];
        let got = Vec::<f32>::try_from(&a.raw).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert_eq!((a.skipped_groups, a.partial_groups), (1, 2));
        // a group without failures is computed exactly as before (bit for bit)
        let whole = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 6.0]);
        let alone = advantages(&whole, Grouping::PerPrompt { size: 4 }, 5.0).unwrap();
        let std = whole.std(true) + 1e-8;
        assert!(alone.raw.equal(&((&whole - whole.mean(None)) / std)));
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
