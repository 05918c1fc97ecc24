//! GRPO maths over plain tensors: group-relative advantages.

pub mod advantage;

pub use advantage::{advantages, Advantages, Grouping};
