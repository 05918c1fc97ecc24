//! One module per subcommand.

pub mod align;
pub mod bench;
pub mod bench_generate;
pub mod bench_matmul;
pub mod bench_train;
pub mod compare;
pub mod demo;
pub mod env;
pub mod export;
pub mod generate;
pub mod plan;
pub mod preprocess;
pub mod pretrain;
pub mod progress;
pub mod score;
pub mod serve;
pub mod train;
