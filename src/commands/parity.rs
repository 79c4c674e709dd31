//! `ichcam parity`.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`ichcam parity` is not implemented yet")
}
