//! The run's reward curve (`reward_curve.png`): each iteration's mean reward,
//! its rolling mean and the fixed-seed evaluations on one chart. The series
//! are kept in memory; a resumed run reads `rewards.txt` and `eval.jsonl` once.

use std::path::Path;

use tch::Tensor;

use super::plot::{render, Chart, Corner, Scale, Series, Style};
use crate::error::Result;

/// Iterations the rolling mean spans.
const ROLLING: usize = 5;

/// The series of the reward curve.
#[derive(Debug, Clone, Default)]
pub struct RewardCurve {
    /// Each iteration's mean reward (NaN: none; a gap).
    rewards: Vec<f64>,
    /// `(iteration, eval reward mean)` of each evaluation.
    evals: Vec<(u64, f64)>,
}

impl RewardCurve {
    /// The curve of a resumed run from its (already truncated) `rewards.txt`
    /// and `eval.jsonl` in `dir`; a missing file is an empty series.
    pub fn read(dir: &Path) -> Self {
        let text = std::fs::read_to_string(dir.join("rewards.txt")).unwrap_or_default();
        let parse = |l: &str| l.trim().parse::<f64>().unwrap_or(f64::NAN);
        let evals = std::fs::read_to_string(dir.join("eval.jsonl")).unwrap_or_default();
        let eval = |l: &str| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["iteration"].as_u64()?, v["reward_mean"].as_f64()?))
        };
        RewardCurve {
            rewards: text.lines().map(parse).collect(),
            evals: evals.lines().filter_map(eval).collect(),
        }
    }

    /// Appends the next iteration's mean reward.
    pub fn push_reward(&mut self, mean: f64) {
        self.rewards.push(mean);
    }

    /// Adds an evaluation after `iteration` completed iterations.
    pub fn push_eval(&mut self, iteration: u64, mean: f64) {
        self.evals.push((iteration, mean));
    }

    /// The chart as a uint8 `(320, 640, 3)` image.
    pub fn image(&self) -> Result<Tensor> {
        let points: Vec<(f64, f64)> = (self.rewards.iter().enumerate())
            .map(|(i, &y)| (i as f64 + 1.0, y))
            .collect();
        let series = vec![
            Series {
                name: "per iteration".into(),
                points: points.clone(),
                colour: [160, 185, 230],
                style: Style::Line { width: 1 },
            },
            Series {
                name: format!("mean of the last {ROLLING}"),
                points: rolling_mean(&points, ROLLING),
                colour: [20, 60, 200],
                style: Style::Line { width: 2 },
            },
            Series {
                name: "eval (fixed seed)".into(),
                points: (self.evals.iter()).map(|&(i, y)| (i as f64, y)).collect(),
                colour: [230, 110, 20],
                style: Style::Points { radius: 4 },
            },
        ];
        let chart = Chart {
            title: "reward".into(),
            x_title: "iteration".into(),
            y_title: "mean reward".into(),
            y_scale: Scale::Linear,
            series,
            legend: Corner::LowerRight,
        };
        render(&[chart], 640, 320)
    }
}

/// The mean of the last `k` finite values at every point (NaN where none is:
/// an iteration without a reward stays a gap).
pub fn rolling_mean(pts: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    (0..pts.len())
        .map(|i| {
            let lo = i.saturating_sub(k.max(1) - 1);
            let finite: Vec<f64> = (pts[lo..=i].iter().map(|p| p.1))
                .filter(|y| y.is_finite())
                .collect();
            (pts[i].0, finite.iter().sum::<f64>() / finite.len() as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_mean_skips_gaps_and_a_resume_reads_both_series() {
        let pts = [(1.0, 1.0), (2.0, 3.0), (3.0, f64::NAN), (4.0, 5.0)];
        let m = rolling_mean(&pts, 2);
        assert_eq!(&m[..3], &[(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)]);
        assert_eq!(m[3], (4.0, 5.0));
        assert!(rolling_mean(&[(1.0, f64::NAN)], 3)[0].1.is_nan());

        let dir = std::env::temp_dir().join(format!("dg-curve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("rewards.txt"), "-6.5\nnan\n-5.25\n").unwrap();
        let eval =
            "{\"iteration\":0,\"reward_mean\":-7.0}\n{\"iteration\":2,\"reward_mean\":-5.5}\n";
        std::fs::write(dir.join("eval.jsonl"), eval).unwrap();
        let c = RewardCurve::read(&dir);
        assert_eq!(c.rewards.len(), 3);
        assert_eq!((c.rewards[0], c.rewards[2]), (-6.5, -5.25));
        assert_eq!(c.evals, [(0, -7.0), (2, -5.5)]);
        assert_eq!(c.image().unwrap().size(), [320, 640, 3]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
