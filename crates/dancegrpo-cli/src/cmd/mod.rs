//! One module per subcommand.

pub mod align;
pub mod demo;
pub mod env;
pub mod generate;
pub mod preprocess;
pub mod train;
