//! Tree rollouts (BranchGRPO-style): the samples of a group share their
//! trajectory up to branch points and split there, so a group of `G` leaves
//! costs fewer transformer calls than `G` full trajectories.
//!
//! A group starts as `G / k^m` roots, each with one initial noise; before each
//! of the `m` branch steps every node splits into `k` children, which take
//! different noise from that step on. Leaf `g` of a group belongs at step `j`
//! to the node of `node_size(j) = k^(m - #{branch steps <= j})` consecutive
//! leaves starting at its representative `g - g % node_size(j)`: the leaves of
//! a node share the transition `z_j -> z_{j+1}`. The state `z_j` itself is
//! shared by the node of the step before (`state_size(j) = node_size(j - 1)`,
//! the root at step 0), so the model runs once per *state* and step: at a
//! branch step the children reuse their parent's velocity and differ only in
//! their noise. [`TreeDraws`] gives every leaf its node's draws, so the leaves
//! hold exactly their node's state.
//!
//! What the update trains (see `grpo::update`): each node transition once,
//! with the mean of its leaves' advantages and a weight of its leaf count, on
//! the steps its root draws (every leaf of a root trains the same steps).
//! Where no ratio is clipped this is exactly the plain update over the leaves'
//! trajectories, each leaf training its own copy of the shared transitions,
//! computed once per node.

use tch::Tensor;

use super::Draws;
use crate::error::Result;

/// The branching of a group's trajectories.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    /// Children per split (`k`, at least 2).
    pub branches: i64,
    /// The steps before which every node splits, increasing.
    pub at: Vec<i64>,
}

impl Tree {
    /// Why this tree cannot produce groups of `group` leaves over `steps`
    /// steps: `(field, message)`.
    pub fn check(&self, group: i64, steps: i64) -> Option<(&'static str, String)> {
        if self.branches < 2 {
            return Some(("branches", format!("must be >= 2, got {}", self.branches)));
        }
        if self.at.is_empty() || self.at.windows(2).any(|w| w[0] >= w[1]) {
            return Some((
                "at",
                format!("must be increasing branch steps, got {:?}", self.at),
            ));
        }
        if let Some(&j) = self.at.iter().find(|&&j| !(0..steps).contains(&j)) {
            return Some((
                "at",
                format!("branch step {j} is outside the steps 0..{steps}"),
            ));
        }
        let leaves = (self.at.iter()).try_fold(1i64, |n, _| n.checked_mul(self.branches));
        match leaves {
            Some(l) if l <= group && group % l == 0 => None,
            _ => Some((
                "branches",
                format!(
                    "{} splits into {} cannot make groups of {group}: the group size must be a multiple of {}^{}",
                    self.at.len(),
                    self.branches,
                    self.branches,
                    self.at.len()
                ),
            )),
        }
    }

    /// Leaves per node at step `j`: the leaves sharing the transition
    /// `z_j -> z_{j+1}` (`j = -1`: a root).
    pub fn node_size(&self, j: i64) -> i64 {
        let left = self.at.iter().filter(|&&a| a > j).count() as u32;
        self.branches.pow(left)
    }

    /// Leaves per root (`k^m`).
    pub fn root_size(&self) -> i64 {
        self.node_size(-1)
    }

    /// Leaves sharing the state `z_j` the model sees at step `j`.
    pub fn state_size(&self, j: i64) -> i64 {
        self.node_size(j - 1)
    }

    /// The representative of sample `b` at step `j` (samples of a group are
    /// consecutive and groups start at multiples of the root size).
    pub fn representative(&self, b: i64, j: i64) -> i64 {
        b - b % self.node_size(j)
    }

    /// The root of sample `b` (its first leaf).
    pub fn root(&self, b: i64) -> i64 {
        b - b % self.root_size()
    }

    /// Transformer calls of one group's rollout over `steps` steps (one per state and step).
    pub fn calls(&self, group: i64, steps: i64) -> i64 {
        (0..steps).map(|j| group / self.state_size(j)).sum()
    }

    /// Why model batches of `batch` samples cannot hold whole roots: `(field, message)`.
    pub fn check_batch(&self, batch: i64) -> Option<(&'static str, String)> {
        let root = self.root_size();
        (batch % root != 0).then(|| {
            (
                "batch",
                format!("must be a multiple of the tree's {root} leaves per root (a root's leaves are evaluated together), got {batch}"),
            )
        })
    }
}

/// Any draws, seen through a tree: every sample draws its root's initial
/// noise and permutations, and its node's step noise.
pub struct TreeDraws<'a> {
    /// The draws of the samples.
    pub inner: &'a dyn Draws,
    /// The branching.
    pub tree: &'a Tree,
}

impl Draws for TreeDraws<'_> {
    fn init_noise(&self, b: i64, shape: &[i64]) -> Result<Tensor> {
        self.inner.init_noise(self.tree.root(b), shape)
    }

    fn sde_noise(&self, b: i64, step: i64, shape: &[i64]) -> Result<Tensor> {
        let rep = self.tree.representative(b, step);
        self.inner.sde_noise(rep, step, shape)
    }

    fn permutation(&self, b: i64, n: i64) -> Result<Vec<i64>> {
        self.inner.permutation(self.tree.root(b), n)
    }
}

/// The distinct nodes of `size` leaves among the rows `samples`: the first
/// row of each, and for every row which of them it belongs to.
pub fn distinct_rows(samples: &[i64], size: i64) -> (Vec<i64>, Vec<i64>) {
    let (mut reps, mut first, mut take) = (Vec::new(), Vec::new(), Vec::new());
    for (row, &b) in samples.iter().enumerate() {
        let rep = b - b % size;
        match reps.iter().position(|&r| r == rep) {
            Some(i) => take.push(i as i64),
            None => {
                take.push(reps.len() as i64);
                reps.push(rep);
                first.push(row as i64);
            }
        }
    }
    (first, take)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_representatives_and_calls_by_hand() {
        // 8 leaves: 2 roots, splitting in 2 before steps 2 and 4, over 6 steps
        let t = Tree {
            branches: 2,
            at: vec![2, 4],
        };
        assert_eq!(t.check(8, 6), None);
        assert_eq!(
            (
                t.node_size(0),
                t.node_size(1),
                t.node_size(2),
                t.node_size(4)
            ),
            (4, 4, 2, 1)
        );
        let reps: Vec<i64> = (8..16).map(|b| t.representative(b, 2)).collect();
        assert_eq!(reps, [8, 8, 10, 10, 12, 12, 14, 14]);
        assert_eq!((t.root_size(), t.root(13), t.root(3)), (4, 12, 0));
        // the states: the roots' until step 2 (the split reuses them), pairs until step 4
        let states: Vec<i64> = (0..6).map(|j| t.state_size(j)).collect();
        assert_eq!(states, [4, 4, 4, 2, 2, 1]);
        // 2 states at steps 0-2, 4 at 3-4, 8 at 5 -> 22 calls instead of 48
        assert_eq!(t.calls(8, 6), 2 + 2 + 2 + 4 + 4 + 8);
        let (first, take) = distinct_rows(&[4, 5, 6, 7, 8, 9], 4);
        assert_eq!((first, take), (vec![0, 4], vec![0, 0, 0, 0, 1, 1]));
        let (first, take) = distinct_rows(&[4, 5, 6, 7], 2);
        assert_eq!((first, take), (vec![0, 2], vec![0, 0, 1, 1]));
        assert_eq!(t.check_batch(8), None);
        assert_eq!(t.check_batch(6).map(|(f, _)| f), Some("batch"));
        // bad trees name their field
        let bad = |t: Tree, g: i64| t.check(g, 6).map(|(f, _)| f);
        assert_eq!(
            bad(
                Tree {
                    branches: 2,
                    at: vec![2, 4]
                },
                6
            ),
            Some("branches")
        );
        assert_eq!(
            bad(
                Tree {
                    branches: 3,
                    at: vec![1, 2, 3]
                },
                8
            ),
            Some("branches")
        );
        assert_eq!(
            bad(
                Tree {
                    branches: 1,
                    at: vec![2]
                },
                8
            ),
            Some("branches")
        );
        assert_eq!(
            bad(
                Tree {
                    branches: 2,
                    at: vec![4, 2]
                },
                8
            ),
            Some("at")
        );
        assert_eq!(
            bad(
                Tree {
                    branches: 2,
                    at: vec![6]
                },
                8
            ),
            Some("at")
        );
        assert_eq!(
            bad(
                Tree {
                    branches: 2,
                    at: vec![]
                },
                8
            ),
            Some("at")
        );
        assert!(t.check(6, 6).unwrap().1.contains("multiple of 2^2"));
    }
}
