//! One module per subcommand.

pub mod align;
pub mod bench;
pub mod demo;
pub mod env;
pub mod generate;
pub mod score;
pub mod train;
