//! `ichcam parity`: checks the engine against a PyTorch fixture, a ResNet-LSTM one (forward,
//! loss, every gradient, BN running stats, features, fc logits, CAM, upsampled and
//! normalised CAM, Grad-CAM) or a U-Net one (`kind = "unet2d"`: output, Dice loss, every
//! gradient, BN running stats, eval output), and prints one line per quantity; exits
//! non-zero unless all are within the tolerance (f64: 1e-9, f32: 1e-4, and on CUDA with
//! `--precision tf32` 1e-3, `bf16` 1e-2, unless `--tol` says otherwise).
//!
//! With `--precision tf32|bf16` the reference is the fixture's rounded one
//! (`precision/NAME.rounded.safetensors` beside it: PyTorch f64 with the convolutions'
//! operands rounded as the tensor-core kernels round them) when it exists; two more columns
//! say how far that reference is from the exact one and its "f32 floor" (how far f32
//! implementations of exactly its semantics, PyTorch's own, land from it). Without it (or
//! with `--exact-reference`) the reference is the exact f64 one, which the reduced precision
//! itself moves.

use anyhow::bail;
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::{Backend, Device, Precision};
use ichcam::model::parity::{self, AnyFixture, ParityReport};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A fixture written by tests/fixtures/torch-parity/make_fixtures.py or
    /// tests/fixtures/unet-parity/make_unet_fixtures.py.
    pub file: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Element type of the engine: f64 or f32 (CUDA: f32 only). Default: f64 on the CPU,
    /// f32 on CUDA.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Convolution arithmetic on CUDA: f32, tf32 or bf16 (tensor cores, f32 accumulation).
    /// The CPU takes f32 only.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Largest accepted ||ours - torch|| / ||torch|| (default 1e-9 in f64, 1e-4 in f32;
    /// with --precision tf32 1e-3, bf16 1e-2).
    #[arg(long)]
    pub tol: Option<f64>,
    /// With --precision tf32|bf16: compare against the fixture's exact f64 reference even
    /// when a rounded one (precision/NAME.rounded.safetensors) exists.
    #[arg(long)]
    pub exact_reference: bool,
}

fn run_on<B: Backend>(be: B, fx: &AnyFixture, tol: Option<f64>) -> anyhow::Result<ParityReport> {
    let tol = tol.unwrap_or_else(parity::default_tolerance::<B::T>);
    Ok(match fx {
        AnyFixture::ResNetLstm(f) => parity::run(be, f, tol)?,
        AnyFixture::UNet(f) => parity::run_unet(be, f, tol)?,
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(t) = args.tol {
        if !(t.is_finite() && t > 0.0) {
            bail!("--tol must be a positive number, got {t}");
        }
    }
    let mut fx = AnyFixture::load(&args.file)?;
    let mut device = super::open_device(&args.device, false)?;
    device.set_precision(args.precision)?;
    if args.precision.tensor_cores()
        && !args.exact_reference
        && !fx.use_rounded_reference(args.precision)?
    {
        println!(
            "no {} reference at {}: comparing with the exact f64 one, which the reduced precision itself moves \
             (tests/fixtures/torch-parity/make_precision.py writes it)",
            args.precision,
            parity::rounded_reference_path(fx.path()).display()
        );
    }
    let tol = args.tol.or(args.precision.tolerance());
    let report = match device {
        Device::Cpu { .. } => match args.dtype.as_deref().unwrap_or("f64") {
            "f64" => run_on(CpuBackend::<f64>::new(), &fx, tol)?,
            "f32" => run_on(CpuBackend::<f32>::new(), &fx, tol)?,
            d => bail!("unknown --dtype `{d}`: use f64 or f32"),
        },
        Device::Cuda(be) => match args.dtype.as_deref().unwrap_or("f32") {
            "f32" => run_on(be, &fx, tol)?,
            d => bail!("the CUDA backend runs in f32 only (got --dtype {d})"),
        },
    };
    match &fx {
        AnyFixture::ResNetLstm(f) => {
            let c = &f.config;
            println!(
                "fixture {} ({:?} {:?}, base {}, LSTM {}x{}) on {}, tolerance {:.0e}",
                f.path.display(),
                c.block,
                c.layers,
                c.base_width,
                c.lstm_layers,
                c.lstm_hidden,
                report.backend,
                report.tolerance
            );
        }
        AnyFixture::UNet(f) => {
            let c = &f.config;
            println!(
                "fixture {} (U-Net, {} in-channels, features {}, depth {}, BCE weight {}) on {}, tolerance {:.0e}",
                f.path.display(),
                c.in_channels,
                c.features,
                c.depth,
                c.bce_weight,
                report.backend,
                report.tolerance
            );
        }
    }
    println!("reference: {}", report.reference);
    print!("{}", report.table());
    let worst = report
        .worst()
        .map(|r| format!("{} ({:.3e})", r.quantity, r.rel_err))
        .unwrap_or_default();
    if let Some(g) = report.worst_ref_gap() {
        println!(
            "the {} reference itself is up to {:.3e} from the exact f64 one ({})",
            args.precision,
            g.ref_gap.unwrap_or(0.0),
            g.quantity
        );
    }
    if report.passed() {
        println!(
            "PASS: all {} quantities within {:.0e}; worst {worst}",
            report.rows.len(),
            report.tolerance
        );
        Ok(())
    } else {
        if report.rows.iter().any(|r| r.f32_floor.is_some()) {
            let beyond = report
                .rows
                .iter()
                .filter(|r| !r.pass && r.f32_floor.is_some_and(|f| r.rel_err > f))
                .count();
            println!(
                "{} of the {} failing quantities have an f32 floor over {:.0e} too (f32 implementations of exactly \
                 the reference's rounding, PyTorch's own, miss them by that much); {beyond} are further from the \
                 reference than their f32 floor (docs/precision.md)",
                report.failures_over_f32_floor(),
                report.failures(),
                report.tolerance
            );
        }
        bail!(
            "parity FAILED: {} of {} quantities over {:.0e}; worst {worst}",
            report.failures(),
            report.rows.len(),
            report.tolerance
        )
    }
}
