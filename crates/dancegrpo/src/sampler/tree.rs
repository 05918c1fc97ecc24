//! Tree rollouts (BranchGRPO-style): the samples of a group share their
//! trajectory up to branch points and split there, so a group of `G` leaves
//! costs fewer transformer calls than `G` full trajectories.
//!
//! A group starts as `G / k^m` roots; before each of the `m` branch steps
//! every node splits into `k` children, which take different noise from that
//! step on. Leaf `g` of a group (`0..G`) belongs at step `j` to the node of
//! `size(j) = k^(m - #{branch steps <= j})` consecutive leaves starting at its
//! representative `g - g % size(j)`. [`TreeDraws`] gives every leaf its
//! representative's draws, so the leaves of a node hold exactly the node's
//! state, and the rollout evaluates the model once per node and step.
//!
//! The update does not take trees yet (each node transition must be trained
//! once, with the mean of its leaves' advantages): trees are not a training
//! option until it does.

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

    /// Leaves per node at step `j`.
    pub fn node_size(&self, j: i64) -> i64 {
        let left = self.at.iter().filter(|&&a| a > j).count() as u32;
        self.branches.pow(left)
    }

    /// The representative of sample `b` (groups of `group` consecutive samples) at step `j`.
    pub fn representative(&self, b: i64, group: i64, j: i64) -> i64 {
        b - (b % group) % self.node_size(j)
    }

    /// Transformer calls of one group's rollout over `steps` steps (one per node and step).
    pub fn calls(&self, group: i64, steps: i64) -> i64 {
        (0..steps).map(|j| group / self.node_size(j)).sum()
    }
}

/// Any draws, seen through a tree: every sample draws its representative's
/// initial noise and step noise (its own permutations).
pub struct TreeDraws<'a> {
    /// The draws of the samples.
    pub inner: &'a dyn Draws,
    /// The branching.
    pub tree: &'a Tree,
    /// Samples per group.
    pub group: i64,
}

impl Draws for TreeDraws<'_> {
    fn init_noise(&self, b: i64, shape: &[i64]) -> Result<Tensor> {
        let rep = self.tree.representative(b, self.group, 0);
        self.inner.init_noise(rep, shape)
    }

    fn sde_noise(&self, b: i64, step: i64, shape: &[i64]) -> Result<Tensor> {
        let rep = self.tree.representative(b, self.group, step);
        self.inner.sde_noise(rep, step, shape)
    }

    fn permutation(&self, b: i64, n: i64) -> Result<Vec<i64>> {
        self.inner.permutation(b, n)
    }
}

/// The rows of `samples` the model must evaluate at step `j` (the first of
/// each representative) and, for every row, which of them it takes.
pub fn distinct_rows(tree: &Tree, group: i64, samples: &[i64], j: i64) -> (Vec<i64>, Vec<i64>) {
    let (mut reps, mut first, mut take) = (Vec::new(), Vec::new(), Vec::new());
    for (row, &b) in samples.iter().enumerate() {
        let rep = tree.representative(b, group, j);
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
        let reps: Vec<i64> = (8..16).map(|b| t.representative(b, 8, 2)).collect();
        assert_eq!(reps, [8, 8, 10, 10, 12, 12, 14, 14]);
        // steps 0-1: 2 nodes, 2-3: 4, 4-5: 8 -> 28 calls instead of 48
        assert_eq!(t.calls(8, 6), 2 + 2 + 4 + 4 + 8 + 8);
        let (first, take) = distinct_rows(&t, 8, &[4, 5, 6, 7, 8, 9], 0);
        assert_eq!((first, take), (vec![0, 4], vec![0, 0, 0, 0, 1, 1]));
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
