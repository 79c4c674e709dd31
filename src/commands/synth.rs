//! `ichcam synth`.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`ichcam synth` is not implemented yet")
}
