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

/// Resolves `--device` once ([`ichcam::engine::Device::open`]) and prints its fallback line
/// (`device auto: using the CPU (...)`) unless `quiet`.
pub fn open_device(spec: &str, quiet: bool) -> anyhow::Result<ichcam::engine::Device> {
    let device = ichcam::engine::Device::open(spec)?;
    if let (Some(note), false) = (device.fallback_note(), quiet) {
        eprintln!("{note}");
    }
    Ok(device)
}
