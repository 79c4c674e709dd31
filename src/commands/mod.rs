//! One file per subcommand: its clap arguments and its `run`.

pub mod bench;
pub mod demo;
pub mod eval;
pub mod info;
pub mod inspect;
pub mod parity;
pub mod segment;
pub mod synth;
pub mod train;
