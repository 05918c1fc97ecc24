//! Mixed ODE-SDE sampling (MixGRPO): only the steps inside a window take the
//! stochastic step and are trained; the others are Euler ODE steps. The window
//! moves over iterations by a schedule: fixed, MixGRPO's progressive sliding
//! (`sample_strategy="progressive"` of its `GRPOTrainingStates`), or a random
//! position each iteration (Flow-GRPO-Fast's one- or two-step windows).
//!
//! The window at an iteration is a pure function of the iteration, the run's
//! seed and the config, so a resumed run takes the same windows. Two places
//! differ from MixGRPO's code on purpose: its windows stop before step `S - 2`
//! (`max_timesteps = sampling_steps - 2` used as an exclusive bound), ours may
//! reach every trainable transition (`grpo.trainable`); and where its
//! progressive window runs past the end without `roll_back` it becomes empty
//! (nothing trained), ours stays at the last full position.

use serde::{Deserialize, Serialize};

use crate::rng::Philox;

/// How the window moves over iterations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowSchedule {
    /// Always at `start`.
    Fixed,
    /// MixGRPO's progressive strategy: from `start`, `stride` steps later every
    /// `shift_interval` iterations.
    #[default]
    Progressive,
    /// A uniformly random position each iteration (from the run's seed).
    Random,
}

/// Which of the window's transitions each sample trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowTraining {
    /// Every step of the window, in order (MixGRPO).
    #[default]
    All,
    /// A random `grpo.timestep_fraction` of them per sample (DanceGRPO's
    /// selection, inside the window).
    Fraction,
}

/// `sampler.window`: which steps are stochastic and trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SdeWindow {
    /// Stochastic (and trained) steps per iteration (MixGRPO's `group_size`, 4).
    pub size: i64,
    /// The first window's first step.
    pub start: i64,
    /// How the window moves.
    pub schedule: WindowSchedule,
    /// Progressive: iterations at one position (MixGRPO's `iters_per_group`, 25).
    pub shift_interval: u64,
    /// Progressive: steps the window moves (MixGRPO: `size`, or
    /// `prog_overlap_step` with `prog_overlap`).
    pub stride: i64,
    /// Progressive: start again at `start` after the last position (else stay there).
    pub roll_back: bool,
    /// Which of the window's transitions are trained.
    pub train: WindowTraining,
    /// What samples the steps after the window: `{solver = "euler"}` (the
    /// default) or `{solver = "dpm_solver_2m", compress = 0.4, variant =
    /// "midpoint"}` (MixGRPO-Flash: DPM-Solver++ 2M on a compressed schedule).
    pub post: super::dpm::PostWindow,
}

impl Default for SdeWindow {
    fn default() -> Self {
        SdeWindow {
            size: 4,
            start: 0,
            schedule: WindowSchedule::Progressive,
            shift_interval: 25,
            stride: 4,
            roll_back: false,
            train: WindowTraining::All,
            post: super::dpm::PostWindow::Euler,
        }
    }
}

/// The steps `start..end` of one iteration's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepWindow {
    /// First stochastic step.
    pub start: i64,
    /// One past the last.
    pub end: i64,
    /// Which of them are trained.
    pub train: WindowTraining,
}

impl StepWindow {
    /// Whether step `i` is inside.
    pub fn contains(&self, i: i64) -> bool {
        (self.start..self.end).contains(&i)
    }

    /// The steps, in order.
    pub fn steps(&self) -> Vec<i64> {
        (self.start..self.end).collect()
    }

    /// How many steps.
    pub fn len(&self) -> i64 {
        self.end - self.start
    }

    /// Whether it has no step.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

impl SdeWindow {
    /// What is wrong with the window over `trainable` transitions, as
    /// `(field, message)` (fields relative to `sampler.window`).
    pub fn check(&self, trainable: i64) -> Option<(&'static str, String)> {
        let bad = |f, m: String| Some((f, m));
        if !(1..=trainable).contains(&self.size) {
            return bad(
                "size",
                format!(
                    "must be in 1..={trainable} (the trainable transitions of the steps), got {}",
                    self.size
                ),
            );
        }
        if self.start < 0 || self.start + self.size > trainable {
            let (last, size, start) = (trainable - self.size, self.size, self.start);
            let msg = format!(
                "must be in 0..={last} for a window of {size} in {trainable} trainable transitions, got {start}"
            );
            return bad("start", msg);
        }
        if self.shift_interval < 1 {
            return bad("shift_interval", "must be >= 1".into());
        }
        if self.stride < 1 {
            return bad("stride", format!("must be >= 1, got {}", self.stride));
        }
        // its only field that can be wrong
        self.post.check().map(|(_, msg)| ("post.compress", msg))
    }

    /// The window of iteration `iteration` over `trainable` transitions
    /// (`check` passed); `seed`: the run's, for [`WindowSchedule::Random`].
    pub fn at(&self, iteration: u64, trainable: i64, seed: u64) -> StepWindow {
        let last = trainable - self.size; // the last full position
        let start = match self.schedule {
            WindowSchedule::Fixed => self.start,
            WindowSchedule::Random => {
                let mut rng = Philox::for_stream(seed, &format!("window/{iteration}"));
                let positions = (last + 1) as f64;
                ((rng.uniform() * positions) as i64).min(last)
            }
            WindowSchedule::Progressive => {
                let moves = (iteration / self.shift_interval) as i64;
                let positions = (last - self.start) / self.stride + 1;
                match (self.roll_back, moves < positions) {
                    (_, true) => self.start + moves * self.stride,
                    (true, false) => self.start + (moves % positions) * self.stride,
                    (false, false) => self.start + (positions - 1) * self.stride,
                }
            }
        };
        StepWindow {
            start,
            end: start + self.size,
            train: self.train,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(w: &SdeWindow, iterations: std::ops::Range<u64>, trainable: i64) -> Vec<i64> {
        iterations.map(|it| w.at(it, trainable, 0).start).collect()
    }

    #[test]
    fn progressive_windows_slide_every_shift_interval() {
        // 16 steps (15 trainable), windows of 4 moving by 4 every 2 iterations
        let w = SdeWindow {
            size: 4,
            shift_interval: 2,
            stride: 4,
            ..SdeWindow::default()
        };
        assert_eq!(starts(&w, 0..10, 15), [0, 0, 4, 4, 8, 8, 8, 8, 8, 8]);
        assert_eq!(w.at(4, 15, 0).steps(), [8, 9, 10, 11]);
        let back = SdeWindow {
            roll_back: true,
            ..w.clone()
        };
        assert_eq!(starts(&back, 0..10, 15), [0, 0, 4, 4, 8, 8, 0, 0, 4, 4]);
        // overlapping moves (MixGRPO's prog_overlap with prog_overlap_step 1)
        let overlap = SdeWindow {
            stride: 1,
            shift_interval: 1,
            start: 9,
            ..w
        };
        assert_eq!(starts(&overlap, 0..5, 15), [9, 10, 11, 11, 11]);
        assert!(overlap.at(1, 15, 0).contains(13) && !overlap.at(1, 15, 0).contains(14));
    }

    #[test]
    fn fixed_and_random_windows() {
        let fixed = SdeWindow {
            size: 2,
            start: 3,
            schedule: WindowSchedule::Fixed,
            ..SdeWindow::default()
        };
        assert_eq!(starts(&fixed, 0..4, 7), [3, 3, 3, 3]);
        // Flow-GRPO-Fast: a two-step window anywhere, the same for the same seed
        let random = SdeWindow {
            schedule: WindowSchedule::Random,
            ..fixed
        };
        let s: Vec<i64> = starts(&random, 0..400, 7);
        assert!(s.iter().all(|&x| (0..=5).contains(&x)));
        for p in 0..=5 {
            let n = s.iter().filter(|&&x| x == p).count();
            assert!((40..=100).contains(&n), "position {p}: {n} of 400");
        }
        assert_eq!(s, starts(&random, 0..400, 7));
        assert_ne!(
            s,
            (0..400)
                .map(|it| random.at(it, 7, 1).start)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_windows_name_their_field() {
        let w = |size, start| SdeWindow {
            size,
            start,
            ..SdeWindow::default()
        };
        assert_eq!(w(8, 0).check(7).unwrap().0, "size");
        assert_eq!(w(0, 0).check(7).unwrap().0, "size");
        assert_eq!(w(4, 4).check(7).unwrap().0, "start");
        assert!(w(4, 3).check(7).is_none());
        let still = SdeWindow {
            stride: 0,
            ..SdeWindow::default()
        };
        assert_eq!(still.check(15).unwrap().0, "stride");
    }
}
