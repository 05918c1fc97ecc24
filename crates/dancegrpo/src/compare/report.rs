//! The comparison's report: per method, the reward over seeds against
//! iterations, training seconds and transformer calls; when each method
//! first reaches the first method's final reward; written as Markdown
//! (`compare.md`), JSON (`compare.json`) and a chart (`compare.png`).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::RunTrace;
use crate::error::Result;
use crate::grpo::iteration::Summary;
use crate::train::curve::rolling_mean;
use crate::train::plot::{render, Chart, Corner, Scale, Series, Style};

/// Iterations the summaries and the smoothed curves average over.
pub const WINDOW: usize = 10;

/// A mean with its standard deviation over seeds (unbiased; 0 for one seed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanStd {
    /// Mean over seeds.
    pub mean: f64,
    /// Standard deviation over seeds.
    pub std: f64,
    /// How many seeds had a value.
    pub n: usize,
}

impl MeanStd {
    /// Of the finite `values` (NaN mean where there is none).
    pub fn of(values: &[f64]) -> MeanStd {
        let s = Summary::of_f64(values);
        MeanStd {
            mean: s.mean,
            std: s.std,
            n: values.iter().filter(|x| x.is_finite()).count(),
        }
    }

    fn show(self, digits: usize) -> String {
        match (self.mean.is_finite(), self.n) {
            (false, _) => "-".into(),
            (true, 1) => format!("{:.digits$}", self.mean),
            (true, _) => format!("{:.digits$} ± {:.digits$}", self.mean, self.std),
        }
    }
}

/// Where a method's smoothed mean reward first reaches a target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reach {
    /// The iteration (1-based).
    pub iteration: u64,
    /// Training seconds until then (mean over seeds).
    pub seconds: f64,
    /// Transformer calls until then.
    pub calls: f64,
}

/// One method's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodSummary {
    /// The method.
    pub name: String,
    /// Mean training reward of the first [`WINDOW`] iterations.
    pub first: MeanStd,
    /// Mean training reward of the last [`WINDOW`] iterations.
    pub last: MeanStd,
    /// Held-out evaluation reward before training.
    pub eval_before: MeanStd,
    /// Held-out evaluation reward after training.
    pub eval_after: MeanStd,
    /// Share of groups whose rewards were all equal, over all iterations.
    pub zero_std_share: MeanStd,
    /// Training seconds per iteration.
    pub seconds_per_iteration: MeanStd,
    /// Transformer calls per iteration (mean over iterations).
    pub calls_per_iteration: f64,
    /// When the smoothed mean reward first reaches the first method's final reward.
    pub reach: Option<Reach>,
    /// The seed-mean reward per iteration (x: iteration, training seconds, calls).
    pub curve: Vec<[f64; 4]>,
}

/// The whole comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Iterations per run.
    pub iterations: u64,
    /// Seeds per method.
    pub seeds: u64,
    /// The first method's final reward (mean of its last [`WINDOW`] iterations).
    pub target: f64,
    /// Every method, in the order given.
    pub methods: Vec<MethodSummary>,
}

/// The mean of the finite values (NaN when there is none): a failed
/// iteration's reward is a gap, as in the curves.
fn mean(v: &[f64]) -> f64 {
    Summary::of_f64(v).mean
}

/// `(iteration, seconds, calls, seed-mean reward)` per iteration, the
/// seconds and calls cumulative (seconds averaged over seeds).
fn curve(runs: &[RunTrace]) -> Vec<[f64; 4]> {
    let n = runs.iter().map(|r| r.rewards.len()).min().unwrap_or(0);
    let (mut secs, mut calls) = (0.0, 0.0);
    (0..n)
        .map(|i| {
            secs += mean(&runs.iter().map(|r| r.seconds[i]).collect::<Vec<_>>());
            calls += runs[0].calls[i] as f64;
            let reward = MeanStd::of(&runs.iter().map(|r| r.rewards[i]).collect::<Vec<_>>());
            [i as f64 + 1.0, secs, calls, reward.mean]
        })
        .collect()
}

/// The first point where the rolling mean of the reward reaches `target`
/// (to rounding: the first method reaches its own final mean at the latest
/// at its last iteration, summed in another order).
fn reach(curve: &[[f64; 4]], target: f64) -> Option<Reach> {
    let pts: Vec<(f64, f64)> = curve.iter().map(|p| (p[0], p[3])).collect();
    let smooth = rolling_mean(&pts, WINDOW);
    let bar = target - 1e-9 * target.abs();
    // from the first full window on (earlier means average fewer iterations)
    let first = WINDOW.min(smooth.len()).saturating_sub(1);
    let i = first + smooth[first..].iter().position(|&(_, y)| y >= bar)?;
    Some(Reach {
        iteration: curve[i][0] as u64,
        seconds: curve[i][1],
        calls: curve[i][2],
    })
}

fn summary(name: &str, runs: &[RunTrace]) -> MethodSummary {
    let per_run =
        |f: &dyn Fn(&RunTrace) -> f64| MeanStd::of(&runs.iter().map(f).collect::<Vec<_>>());
    let k = |r: &RunTrace| WINDOW.min(r.rewards.len());
    MethodSummary {
        name: name.to_string(),
        first: per_run(&|r| mean(&r.rewards[..k(r)])),
        last: per_run(&|r| mean(&r.rewards[r.rewards.len() - k(r)..])),
        eval_before: per_run(&|r| r.eval_before.unwrap_or(f64::NAN)),
        eval_after: per_run(&|r| r.eval_after.unwrap_or(f64::NAN)),
        zero_std_share: per_run(&|r| mean(&r.zero_std_share)),
        seconds_per_iteration: per_run(&|r| mean(&r.seconds)),
        calls_per_iteration: mean(&runs[0].calls.iter().map(|&c| c as f64).collect::<Vec<_>>()),
        reach: None,
        curve: curve(runs),
    }
}

impl Report {
    /// The report of `traces` (method by method, as [`super::run_all`] returns them).
    pub fn new(names: &[String], traces: &[Vec<RunTrace>], iterations: u64, seeds: u64) -> Self {
        let mut methods: Vec<MethodSummary> = (names.iter().zip(traces))
            .filter(|(_, runs)| !runs.is_empty())
            .map(|(n, runs)| summary(n, runs))
            .collect();
        let target = methods.first().map_or(f64::NAN, |m| m.last.mean);
        for m in &mut methods {
            m.reach = reach(&m.curve, target);
        }
        Report {
            iterations,
            seeds,
            target,
            methods,
        }
    }

    /// The report as Markdown: a table and how to read it.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let base = self.methods.first().map_or("-", |m| m.name.as_str());
        let _ = writeln!(
            s,
            "# dancegrpo compare: {} methods, {} seeds, {} iterations\n",
            self.methods.len(),
            self.seeds,
            self.iterations
        );
        let _ = writeln!(
            s,
            "Rewards are means over the first / last {WINDOW} iterations of each run, then mean ± std over \
             seeds; the held-out evaluation is before and after training. Seconds are training seconds \
             (rollout, decode, reward, update). A transformer call is one sample through the model: a \
             rollout step, or a trained transition's forward and backward pass. The last column is where \
             the {WINDOW}-iteration rolling mean of the seed-mean reward first reaches {base}'s final reward \
             ({:.3}), with the share of {base}'s own seconds and calls to get there.\n",
            self.target
        );
        s.push_str(
            "| method | reward, first | reward, last | rise | eval before | eval after | zero-std groups | s / iteration | calls / iteration | reaches the target at |\n",
        );
        s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        let own = self.methods.first().and_then(|m| m.reach);
        for m in &self.methods {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:+.3} | {} | {} | {:.1}% | {} | {:.0} | {} |",
                m.name,
                m.first.show(3),
                m.last.show(3),
                m.last.mean - m.first.mean,
                m.eval_before.show(3),
                m.eval_after.show(3),
                100.0 * m.zero_std_share.mean,
                m.seconds_per_iteration.show(3),
                m.calls_per_iteration,
                reach_cell(m.reach, own),
            );
        }
        s
    }

    /// Reward against iterations, training seconds and transformer calls: one
    /// chart each, one smoothed curve per method, as a uint8 `(H, W, 3)` image.
    pub fn image(&self) -> Result<tch::Tensor> {
        let axes = [
            (0, "iteration"),
            (1, "training seconds"),
            (2, "transformer calls"),
        ];
        let charts: Vec<Chart> = axes
            .iter()
            .map(|&(x, title)| Chart {
                title: format!(
                    "reward against {title} (rolling mean of {WINDOW}, mean over seeds)"
                ),
                x_title: title.into(),
                y_title: "mean reward".into(),
                y_scale: Scale::Linear,
                series: (self.methods.iter().enumerate())
                    .map(|(i, m)| {
                        let pts: Vec<(f64, f64)> = m.curve.iter().map(|p| (p[x], p[3])).collect();
                        Series {
                            name: m.name.clone(),
                            points: rolling_mean(&pts, WINDOW),
                            colour: PALETTE[i % PALETTE.len()],
                            style: Style::Line { width: 2 },
                        }
                    })
                    .collect(),
                legend: Corner::LowerRight,
            })
            .collect();
        render(&charts, 800, 300)
    }

    /// Writes `compare.md`, `compare.json` and `compare.png` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        use crate::io::atomic::write_bytes_atomic;
        write_bytes_atomic(&dir.join("compare.md"), self.markdown().as_bytes())?;
        let json = serde_json::to_string_pretty(self).expect("serialisable report");
        write_bytes_atomic(&dir.join("compare.json"), json.as_bytes())?;
        crate::io::image::write_png(&dir.join("compare.png"), &self.image()?)
    }
}

/// Distinct colours for the methods' curves.
const PALETTE: [[u8; 3]; 6] = [
    [20, 60, 200],
    [230, 110, 20],
    [30, 150, 60],
    [200, 30, 40],
    [130, 70, 180],
    [120, 120, 120],
];

fn reach_cell(r: Option<Reach>, own: Option<Reach>) -> String {
    let Some(r) = r else {
        return "not reached".into();
    };
    let pct = |a: f64, b: Option<f64>| match b {
        Some(b) if b > 0.0 => format!(" ({:.0}%)", 100.0 * a / b),
        _ => String::new(),
    };
    format!(
        "iteration {}, {:.1} s{}, {:.0} calls{}",
        r.iteration,
        r.seconds,
        pct(r.seconds, own.map(|o| o.seconds)),
        r.calls,
        pct(r.calls, own.map(|o| o.calls)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64, rewards: Vec<f64>, secs: f64, calls: u64) -> RunTrace {
        let n = rewards.len();
        RunTrace {
            seed,
            rewards,
            seconds: vec![secs; n],
            calls: vec![calls; n],
            zero_std_share: vec![0.5; n],
            eval_before: Some(-4.0),
            eval_after: Some(-3.0 + seed as f64),
        }
    }

    #[test]
    fn summaries_reach_and_table_by_hand() {
        // method a rises 0.1 per iteration over 20 iterations; b twice as fast, half the seconds
        let a: Vec<f64> = (0..20).map(|i| i as f64 * 0.1).collect();
        let b: Vec<f64> = (0..20).map(|i| i as f64 * 0.2).collect();
        let traces = vec![
            vec![
                run(0, a.clone(), 2.0, 100),
                run(1, a.iter().map(|x| x + 0.2).collect(), 2.0, 100),
            ],
            vec![run(0, b.clone(), 1.0, 60), run(1, b, 1.0, 60)],
        ];
        let names = vec!["a".to_string(), "b".to_string()];
        let r = Report::new(&names, &traces, 20, 2);
        let (ma, mb) = (&r.methods[0], &r.methods[1]);
        // a: first 10 mean 0.45 (seed 0) and 0.65 (seed 1)
        assert!((ma.first.mean - 0.55).abs() < 1e-12);
        assert!((ma.first.std - (0.02f64).sqrt()).abs() < 1e-12);
        // target: a's last 10 mean = (1.45 + 1.65) / 2 = 1.55
        assert!((r.target - 1.55).abs() < 1e-12);
        assert_eq!(
            (ma.eval_after.mean, ma.eval_after.std),
            (-2.5, (0.5f64).sqrt())
        );
        assert_eq!(ma.seconds_per_iteration.mean, 2.0);
        assert_eq!(mb.calls_per_iteration, 60.0);
        // b's seed-mean reward 0.2 i; its 10-point rolling mean at index i >= 9 is 0.2 (i - 4.5),
        // first >= 1.55 at i = 12.25 -> index 13: iteration 14, 14 s, 840 calls
        let rb = mb.reach.unwrap();
        assert_eq!((rb.iteration, rb.seconds, rb.calls), (14, 14.0, 840.0));
        // a reaches its own final mean at the last iteration: 0.1 (i - 4.5) + 0.1 >= 1.55 at i = 19
        let ra = ma.reach.unwrap();
        assert_eq!((ra.iteration, ra.seconds, ra.calls), (20, 40.0, 2000.0));
        let md = r.markdown();
        assert!(
            md.contains("| b | 0.900 ± 0.000 | 2.900 ± 0.000 | +2.000 |"),
            "{md}"
        );
        assert!(
            md.contains("iteration 14, 14.0 s (35%), 840 calls (42%)"),
            "{md}"
        );
        assert_eq!(r.image().unwrap().size(), [900, 800, 3]);
        // a method that never gets there says so
        let slow = vec![traces[0].clone(), vec![run(0, vec![0.0; 20], 1.0, 10)]];
        let r = Report::new(&names, &slow, 20, 1);
        assert!(r.methods[1].reach.is_none());
        assert!(r.markdown().contains("not reached"));
    }
}
