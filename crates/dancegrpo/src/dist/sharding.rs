//! How the trained state is divided among the processes of a run (`[parallel]`).
//!
//! * `none`: every process holds every trained weight, gradient and AdamW
//!   moment; gradients are all-reduced (data parallelism, DDP).
//! * `optimizer` (ZeRO-1): the AdamW moments (and the step on the master
//!   weights) are split 1/N; the updated weights are gathered back.
//! * `full` (ZeRO-3, FSDP's full sharding): weights, gradients and moments are
//!   all split 1/N; each block's weights are gathered just before it runs and
//!   freed after, its gradients reduce-scattered after its backward.
//!
//! `dancegrpo plan` reports the memory of each mode; this build trains with
//! `none` and `full`.
//!
//! Under `full`, `gather` says when units are gathered: once per iteration
//! (they then stay resident through its hundreds of gradient-free rollout
//! forwards and its update, and are gathered again after each optimizer step:
//! one compute-dtype copy of the model per process), or block by block at
//! every use (the least memory, the most traffic).

use serde::{Deserialize, Serialize};

/// Which trained state is split among the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Full replicas (data parallel).
    #[default]
    None,
    /// Optimizer state split (ZeRO-1).
    Optimizer,
    /// Weights, gradients and optimizer state split (ZeRO-3 / FSDP).
    Full,
}

impl Sharding {
    /// The name used in configurations.
    pub fn name(self) -> &'static str {
        match self {
            Sharding::None => "none",
            Sharding::Optimizer => "optimizer",
            Sharding::Full => "full",
        }
    }
}

/// When a fully sharded model's units are gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gather {
    /// Once per iteration (and after each optimizer step): a compute-dtype copy
    /// of the model per process, the least traffic.
    #[default]
    Iteration,
    /// Just in time at every use: one block at a time, the most traffic.
    PerBlock,
}

/// `[parallel]`: how processes share the work and the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelConfig {
    /// What is split among the processes.
    pub sharding: Sharding,
    /// When units are gathered under `full` sharding.
    pub gather: Gather,
}
