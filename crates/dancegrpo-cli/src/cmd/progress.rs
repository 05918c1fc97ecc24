//! The training progress display on stderr: one status line per iteration
//! (bar, reward, loss, seconds per iteration, ETA of the run) and, on a
//! terminal, the stage the current iteration is in with that stage's own ETA
//! (`| rollout 8/16 ETA 1s`). Off a terminal (a log file) a line every tenth of
//! the run, no stage display.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::rc::Rc;
use std::time::Instant;

use dancegrpo::grpo::iteration::Stage;
use dancegrpo::train::{Progress, Trainer};

/// What the display remembers between calls.
struct State {
    /// The last status line printed (the stage display repeats it).
    line: String,
    /// The stage being shown and when it started.
    stage: Option<(Stage, Instant)>,
}

/// The display; cheap to clone (clones share their state).
#[derive(Clone)]
pub struct TrainProgress {
    terminal: bool,
    state: Rc<RefCell<State>>,
}

impl TrainProgress {
    /// A display for a trainer about to run iteration `next`.
    pub fn new(next: u64) -> Self {
        TrainProgress {
            terminal: std::io::stderr().is_terminal(),
            state: Rc::new(RefCell::new(State {
                line: format!("iteration {next}"),
                stage: None,
            })),
        }
    }

    /// On a terminal, shows each stage's progress as `trainer` runs.
    pub fn attach(&self, trainer: &mut Trainer) {
        if !self.terminal {
            return;
        }
        let me = self.clone();
        trainer.on_stage(Box::new(move |stage, done, total| {
            me.stage(stage, done, total)
        }));
    }

    fn stage(&self, stage: Stage, done: usize, total: usize) {
        let mut s = self.state.borrow_mut();
        let started = match s.stage {
            Some((shown, at)) if shown == stage => at,
            _ => {
                let now = Instant::now();
                s.stage = Some((stage, now));
                now
            }
        };
        let eta = match done {
            0 => String::new(),
            _ => {
                let per = started.elapsed().as_secs_f64() / done as f64;
                format!(" ETA {:.0}s", per * total.saturating_sub(done) as f64)
            }
        };
        eprint!("\r{} | {} {done}/{total}{eta}\x1b[K", s.line, stage.name());
        let _ = std::io::stderr().flush();
    }

    /// The status line after an iteration.
    pub fn iteration(&self, p: &Progress) {
        if let Some(w) = p.warning {
            let sep = if self.terminal { "\n" } else { "" };
            eprintln!("{sep}warning: {w}");
        }
        let every = (p.total / 10).max(1);
        if !self.terminal && p.iteration % every != 0 && p.iteration != p.total {
            return;
        }
        let line = status_line(p);
        match self.terminal {
            true => eprint!("\r{line}\x1b[K"),
            false => eprintln!("{line}"),
        }
        let _ = std::io::stderr().flush();
        let mut s = self.state.borrow_mut();
        s.line = line;
        s.stage = None;
    }
}

/// `[#####---------------] 5/20 reward ... 0.21s/it ETA 3s`.
fn status_line(p: &Progress) -> String {
    let m = p.metrics;
    let left = (p.total - p.iteration) as f64 * p.seconds_per_iteration;
    let width = 20;
    let filled = (p.iteration as usize * width) / p.total.max(1) as usize;
    let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
    let reward = match m.reward_mean.is_finite() {
        true => format!("{:+.4}", m.reward_mean),
        false => "none".to_string(),
    };
    let mut health = String::new();
    for (n, what) in [
        (m.failed_rewards, "failed"),
        (m.skipped_groups, "groups skipped"),
        (m.skipped_steps, "steps skipped"),
    ] {
        if n > 0 {
            health.push_str(&format!(" ({n} {what})"));
        }
    }
    let kl = match m.kl > 0.0 {
        true => format!(" kl {:.2e}", m.kl),
        false => String::new(),
    };
    format!(
        "[{bar}] {}/{} reward {reward}{health} (first {:+.4}) loss {:+.2e} grad {:.3} clip {:.2}{kl} {:.2}s/it ETA {:.0}s",
        p.iteration, p.total, p.first_reward, m.loss, m.grad_norm, m.clip_fraction,
        p.seconds_per_iteration, left
    )
}
