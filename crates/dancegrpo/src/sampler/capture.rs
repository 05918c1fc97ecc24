//! Velocities a rollout computes with gradients and keeps for the update
//! ([`crate::grpo::FirstWindow::RolloutGraphs`]).
//!
//! Until the first optimizer step the weights are the rollout's, so the
//! update's forward pass over the first accumulation window would recompute
//! velocities the rollout already has. A [`CapturePlan`] names those
//! transitions, grouped as the update will back-propagate them (one group per
//! model batch of the update, in its row order); the rollout evaluates each
//! group's rows of a step with gradients, apart from the other rows, and
//! [`KeptVelocities`] hands each group's velocity, graph attached, to the
//! update once. Splitting a step's rows this way keeps every value where the
//! model is batch-invariant (ours on the CPU).

use std::cell::RefCell;
use std::collections::HashMap;

use tch::Tensor;

use crate::error::{Error, Result};

/// A transition `z_j -> z_{j+1}` of sample `b`: `(b, j)`.
pub type Transition = (i64, i64);

/// The transitions a rollout evaluates with gradients, in groups.
#[derive(Debug, Clone, Default)]
pub struct CapturePlan {
    groups: Vec<Vec<Transition>>,
}

impl CapturePlan {
    /// Nothing kept (every rollout step without gradients).
    pub fn none() -> Self {
        CapturePlan::default()
    }

    /// The groups `groups` (each one model batch of the update, in its row
    /// order); a transition may not appear twice.
    pub fn new(groups: Vec<Vec<Transition>>) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for t in groups.iter().flatten() {
            if !seen.insert(*t) {
                return Err(Error::Input(format!(
                    "capture plan: transition {t:?} appears twice"
                )));
            }
        }
        Ok(CapturePlan { groups })
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.groups.iter().all(|g| g.is_empty())
    }

    /// The groups.
    pub fn groups(&self) -> &[Vec<Transition>] {
        &self.groups
    }

    /// The rows of the batch `samples` to evaluate with gradients at step
    /// `step`: per group with such rows, `(group, rows of the batch, their
    /// places in the group)`, rows in the group's order.
    pub fn at_step(&self, samples: &[i64], step: i64) -> Vec<(usize, Vec<i64>, Vec<usize>)> {
        let mut out = Vec::new();
        for (g, group) in self.groups.iter().enumerate() {
            let (mut rows, mut places) = (Vec::new(), Vec::new());
            for (place, &(b, j)) in group.iter().enumerate() {
                let row = samples.iter().position(|&s| s == b);
                if let (Some(row), true) = (row, j == step) {
                    rows.push(row as i64);
                    places.push(place);
                }
            }
            if !rows.is_empty() {
                out.push((g, rows, places));
            }
        }
        out
    }
}

/// The pieces of each group's velocity as the rollout makes them.
#[derive(Debug, Default)]
pub(crate) struct Pieces {
    /// Per group: `(places in the group, velocity rows (m, L, c) with graph)`.
    parts: HashMap<usize, Vec<(Vec<usize>, Tensor)>>,
}

impl Pieces {
    /// Adds the rows `places` of group `g`.
    pub(crate) fn add(&mut self, g: usize, places: Vec<usize>, v: Tensor) {
        self.parts.entry(g).or_default().push((places, v));
    }

    /// Every group's velocity `(n, L, c)` in the group's row order; an error
    /// when a transition of the plan was never evaluated.
    pub(crate) fn finish(mut self, plan: &CapturePlan) -> Result<KeptVelocities> {
        let mut kept = HashMap::new();
        for (g, group) in plan.groups.iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let parts = self.parts.remove(&g).unwrap_or_default();
            let places: Vec<usize> = parts.iter().flat_map(|(p, _)| p.clone()).collect();
            let mut sorted = places.clone();
            sorted.sort_unstable();
            if sorted != (0..group.len()).collect::<Vec<_>>() {
                return Err(Error::Input(format!(
                    "capture plan: the rollout evaluated {} of the {} transitions of group {g} (a transition of a sample or step the rollout does not take)",
                    places.len(),
                    group.len()
                )));
            }
            let rows: Vec<Tensor> = parts.into_iter().map(|(_, v)| v).collect();
            // joined with gradients: the rollout runs without them
            let v = tch::with_grad(|| join(&rows, &places)); // (n, L, c)
            kept.insert(group.clone(), v);
        }
        Ok(KeptVelocities {
            kept: RefCell::new(kept),
        })
    }
}

/// The row blocks `rows` (each `(m, ...)`), whose rows hold the places
/// `places` in turn, joined in place order `(n, ...)`.
pub(crate) fn join(rows: &[Tensor], places: &[usize]) -> Tensor {
    let v = match rows {
        [one] => one.shallow_clone(),
        _ => Tensor::cat(rows, 0),
    };
    if places.windows(2).all(|w| w[0] < w[1]) {
        return v;
    }
    // the row of the evaluation order that holds each place
    let mut from = vec![0i64; places.len()];
    for (i, &p) in places.iter().enumerate() {
        from[p] = i as i64;
    }
    v.index_select(0, &Tensor::from_slice(&from).to_device(v.device()))
}

/// The velocities a rollout kept with their graphs, each handed out once.
#[derive(Debug, Default)]
pub struct KeptVelocities {
    kept: RefCell<HashMap<Vec<Transition>, Tensor>>,
}

impl KeptVelocities {
    /// The velocity `(n, L, c)` of exactly the transitions `group`, in that
    /// order, if the rollout kept it (it is then dropped from here).
    pub fn take(&self, group: &[Transition]) -> Option<Tensor> {
        self.kept.borrow_mut().remove(group)
    }

    /// How many groups are still held.
    pub fn len(&self) -> usize {
        self.kept.borrow().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every graph still held (an update that did not take them).
    pub fn clear(&self) {
        self.kept.borrow_mut().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_splits_its_rows_by_group_in_group_order() {
        let plan = CapturePlan::new(vec![vec![(1, 2), (0, 2), (0, 3)], vec![(3, 2)]]).unwrap();
        let at = plan.at_step(&[0, 1, 2, 3], 2);
        assert_eq!(at, vec![(0, vec![1, 0], vec![0, 1]), (1, vec![3], vec![0])]);
        assert!(plan.at_step(&[2], 2).is_empty());
        assert!(CapturePlan::new(vec![vec![(0, 1)], vec![(0, 1)]]).is_err());
    }

    #[test]
    fn pieces_come_back_in_group_order_once() {
        let plan = CapturePlan::new(vec![vec![(0, 1), (1, 1), (0, 2)]]).unwrap();
        let mut pieces = Pieces::default();
        pieces.add(0, vec![2], Tensor::from_slice(&[3.0f32]).view([1, 1, 1]));
        pieces.add(
            0,
            vec![0, 1],
            Tensor::from_slice(&[1.0f32, 2.0]).view([2, 1, 1]),
        );
        let kept = pieces.finish(&plan).unwrap();
        let v = kept.take(&[(0, 1), (1, 1), (0, 2)]).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(v.reshape([-1])).unwrap(),
            [1.0, 2.0, 3.0]
        );
        assert!(kept.take(&[(0, 1), (1, 1), (0, 2)]).is_none());
        let mut missing = Pieces::default();
        missing.add(0, vec![0], Tensor::zeros([1, 1, 1], tch::kind::FLOAT_CPU));
        assert!(missing.finish(&plan).is_err());
    }
}
