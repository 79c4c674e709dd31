//! `ichcam inspect`.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`ichcam inspect` is not implemented yet")
}
