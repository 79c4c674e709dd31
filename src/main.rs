//! The `ichcam` command line: a thin layer over the library. Each subcommand lives in
//! `src/commands/<name>.rs` with its arguments and its `run`.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ichcam",
    version,
    about = "Weakly supervised intracranial hemorrhage segmentation in head CT (ResNet-LSTM + CAM + pseudo-masks + 3-D connected components)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Most memory a command plans to use, e.g. 8G or 512M (default: half the RAM, and
    /// never more than the address-space limit allows); larger work is done in pieces or
    /// refused. Also read from ICHCAM_MAX_MEMORY.
    #[arg(long, global = true, value_parser = ichcam::io::budget::parse_size)]
    max_memory: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Synthesise phantoms, train the tiny config on 70%, segment and evaluate the rest.
    Demo(commands::demo::Args),
    /// Write synthetic non-contrast head CTs with exact hemorrhage masks (ct-ich-dev layout).
    Synth(commands::synth::Args),
    /// Train stage 1 (ResNet-LSTM) and stage 2 (fc head) from slice labels only.
    Train(commands::train::Args),
    /// Segment volumes with a trained model: mask, CAM, slice probabilities, overlay.
    Segment(commands::segment::Args),
    /// Compare predicted masks with ground truth: Dice, IoU, precision, recall, HD95, RVD.
    Eval(commands::eval::Args),
    /// Time the engine's ops and a train step.
    Bench(commands::bench::Args),
    /// Build, GPU devices and the backend `auto` picks.
    Info(commands::info::Args),
    /// Check the engine against a PyTorch fixture (forward, loss, gradients, CAMs).
    Parity(commands::parity::Args),
    /// Describe a NIfTI file, a DICOM folder or multi-frame file, or a dataset folder.
    Inspect(commands::inspect::Args),
}

fn main() {
    let cli = Cli::parse();
    ichcam::io::budget::set_max_memory(cli.max_memory);
    let result = match cli.command {
        Command::Demo(a) => commands::demo::run(a),
        Command::Synth(a) => commands::synth::run(a),
        Command::Train(a) => commands::train::run(a),
        Command::Segment(a) => commands::segment::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Info(a) => commands::info::run(a),
        Command::Parity(a) => commands::parity::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
