//! dancegrpo: GRPO post-training of flow-matching image generators.
pub fn version() -> String { tch::utils::version_cudnn().to_string() }
