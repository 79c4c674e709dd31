//! Checks the engine against a PyTorch fixture: a ResNet-LSTM fixture
//! (tests/fixtures/torch-parity/README.md: loads `param.*`, runs the training-mode stage-1
//! forward, loss and backward and the eval-mode stage-2 / CAM path) or a U-Net fixture
//! (`kind = "unet2d"`, tests/fixtures/unet-parity/README.md: the training-mode forward, Dice
//! loss and backward, the updated running statistics and the eval-mode output), and compares
//! every quantity with PyTorch's by `||ours - torch|| / ||torch||`. Works for any config in
//! the fixture formats. Knows nothing about the command line.

use super::checkpoint::{self, HostTensor};
use super::config::ModelConfig;
use super::net::{CamKind, IchNet};
use super::params::{Group, ParamKind};
use super::unet::config::{config_kind, UNET_KIND};
use super::unet::{self, UNet, UNetConfig};
use super::ModelError;
use crate::engine::{Backend, Real};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A fixture file: its config and every tensor as f64.
pub struct Fixture {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl Fixture {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let (tensors, meta) = checkpoint::read_tensors(path)?;
        let json = meta.get(checkpoint::CONFIG_KEY).ok_or_else(|| {
            ModelError::checkpoint(path, "no `config` in the metadata: not a parity fixture")
        })?;
        if config_kind(json).as_deref() == Some(UNET_KIND) {
            return Err(ModelError::checkpoint(
                path,
                "a U-Net fixture (`kind = \"unet2d\"`): load it with `AnyFixture::load`",
            ));
        }
        let config = ModelConfig::from_fixture_json(json)
            .map_err(|e| ModelError::checkpoint(path, format!("metadata `config`: {e}")))?;
        Ok(Fixture {
            path: path.to_path_buf(),
            config,
            tensors,
        })
    }

    pub fn tensor(&self, name: &str) -> Result<&HostTensor, ModelError> {
        self.tensors.get(name).ok_or_else(|| {
            ModelError::checkpoint(&self.path, format!("no tensor `{name}` in the fixture"))
        })
    }
}

/// One compared quantity.
#[derive(Clone, Debug)]
pub struct ParityRow {
    pub quantity: String,
    pub elements: usize,
    /// `||ours - torch|| / ||torch||` (absolute when torch's norm is 0; infinite on a
    /// length mismatch).
    pub rel_err: f64,
    pub pass: bool,
}

/// Every row of a parity run.
#[derive(Clone, Debug)]
pub struct ParityReport {
    pub backend: String,
    pub tolerance: f64,
    pub rows: Vec<ParityRow>,
}

impl ParityReport {
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.pass)
    }
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.pass).count()
    }
    pub fn worst(&self) -> Option<&ParityRow> {
        self.rows.iter().max_by(|a, b| {
            a.rel_err
                .partial_cmp(&b.rel_err)
                .unwrap_or(std::cmp::Ordering::Greater)
        })
    }
    /// A fixed-width table, one quantity a line.
    pub fn table(&self) -> String {
        let w = self
            .rows
            .iter()
            .map(|r| r.quantity.len())
            .max()
            .unwrap_or(8)
            .max(8);
        let mut s = format!(
            "{:<w$}  {:>9}  {:>12}  result\n",
            "quantity", "elements", "rel. error"
        );
        for r in &self.rows {
            s.push_str(&format!(
                "{:<w$}  {:>9}  {:>12.3e}  {}\n",
                r.quantity,
                r.elements,
                r.rel_err,
                if r.pass { "PASS" } else { "FAIL" }
            ));
        }
        s
    }
}

/// The default tolerance of an element type: 1e-9 in f64, 1e-4 in f32.
pub fn default_tolerance<T: Real>() -> f64 {
    if T::NAME == "f64" {
        1e-9
    } else {
        1e-4
    }
}

/// `||a - b|| / ||b||`; the absolute difference when `b` is all zeros.
pub fn rel_err(ours: &[f64], torch: &[f64]) -> f64 {
    if ours.len() != torch.len() {
        return f64::INFINITY;
    }
    let (mut d, mut n) = (0.0, 0.0);
    for (a, b) in ours.iter().zip(torch) {
        d += (a - b) * (a - b);
        n += b * b;
    }
    if n > 0.0 {
        (d / n).sqrt()
    } else {
        d.sqrt()
    }
}

/// The compared rows of one run.
struct Rows {
    rows: Vec<ParityRow>,
    /// The norm of all of torch's gradients.
    all_grads: f64,
    tolerance: f64,
}

impl Rows {
    fn new(tensors: &BTreeMap<String, HostTensor>, tolerance: f64) -> Self {
        let all_grads = tensors
            .iter()
            .filter(|(k, _)| k.starts_with("grad."))
            .flat_map(|(_, t)| t.data.iter())
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        Rows {
            rows: Vec::new(),
            all_grads,
            tolerance,
        }
    }

    /// Compares one quantity. A gradient that is zero analytically (e.g. a BN bias whose
    /// every path ends in another training-mode BN while the ReLU between is inactive)
    /// holds only rounding noise in both engines; its error is measured against the norm of
    /// all gradients instead.
    fn push(&mut self, q: String, ours: &[f64], torch: &HostTensor, is_grad: bool) {
        let all = self.all_grads;
        let norm = torch.data.iter().map(|x| x * x).sum::<f64>().sqrt();
        let (q, e) = if is_grad && norm < 1e-9 * all && ours.len() == torch.data.len() {
            let d = ours
                .iter()
                .zip(&torch.data)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt();
            (format!("{q} (0 in torch: vs all grads)"), d / all)
        } else {
            (q, rel_err(ours, &torch.data))
        };
        self.rows.push(ParityRow {
            quantity: q,
            elements: torch.data.len(),
            rel_err: e,
            pass: e <= self.tolerance,
        });
    }
}

fn f64s<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.as_f64()).collect()
}

/// Runs the whole comparison on `backend`.
pub fn run<B: Backend>(
    backend: B,
    fx: &Fixture,
    tolerance: f64,
) -> Result<ParityReport, ModelError> {
    let name = backend.name();
    let mut net = IchNet::new(backend, fx.config.clone(), 0)?;
    checkpoint::assign(&mut net, &fx.tensors, "param.", &fx.path)?;
    let conv =
        |t: &HostTensor| -> Vec<B::T> { t.data.iter().map(|&x| B::T::from_f64_lossy(x)).collect() };

    let input = fx.tensor("input")?;
    let [b, s, c, h, w] = input.shape[..] else {
        return Err(ModelError::checkpoint(
            &fx.path,
            format!(
                "`input` has shape {:?}, expected [B, S, C, H, W]",
                input.shape
            ),
        ));
    };
    if c != fx.config.in_channels {
        return Err(ModelError::checkpoint(
            &fx.path,
            format!(
                "`input` has {c} channels, the config {}",
                fx.config.in_channels
            ),
        ));
    }
    let labels = fx.tensor("labels")?;
    let mut sink = Rows::new(&fx.tensors, tolerance);
    let mut push = |q: String, ours: &[f64], torch: &HostTensor, is_grad: bool| {
        sink.push(q, ours, torch, is_grad)
    };

    // Stage 1, training mode.
    let step = net.stage1_forward_backward(&conv(input), &conv(labels), b, s, h, w, 1.0)?;
    push("logits".into(), &step.logits, fx.tensor("logits")?, false);
    push("loss".into(), &[step.loss], fx.tensor("loss")?, false);
    for p_name in net.names() {
        let (kind, group) = {
            let p = net.params().get(&p_name)?;
            (p.kind, p.group)
        };
        match kind {
            ParamKind::Trainable if group != Group::Fc => {
                push(
                    format!("grad {p_name}"),
                    &f64s(&net.grad(&p_name)?),
                    fx.tensor(&format!("grad.{p_name}"))?,
                    true,
                );
            }
            ParamKind::Buffer => {
                push(
                    format!("after_train {p_name}"),
                    &f64s(&net.param(&p_name)?),
                    fx.tensor(&format!("after_train.{p_name}"))?,
                    false,
                );
            }
            _ => {}
        }
    }

    // Stage 2 / CAM, eval mode with the updated running stats.
    let xs = conv(input);
    let n = b * s;
    let feats = net.stage2_features(&xs, n, h, w)?;
    push(
        "eval.features".into(),
        &feats.data,
        fx.tensor("eval.features")?,
        false,
    );
    let v = net.stage2_infer(&xs, n, h, w, CamKind::Vanilla)?;
    push(
        "eval.fc_logits".into(),
        &v.logits,
        fx.tensor("eval.fc_logits")?,
        false,
    );
    push("eval.cam".into(), &v.cam, fx.tensor("eval.cam")?, false);
    push(
        "eval.cam_up".into(),
        &v.cam_up,
        fx.tensor("eval.cam_up")?,
        false,
    );
    push(
        "eval.cam_norm".into(),
        &v.cam_norm,
        fx.tensor("eval.cam_norm")?,
        false,
    );
    let g = net.stage2_infer(&xs, n, h, w, CamKind::GradCam)?;
    push(
        "eval.gradcam".into(),
        &g.cam,
        fx.tensor("eval.gradcam")?,
        false,
    );
    Ok(ParityReport {
        backend: name,
        tolerance,
        rows: sink.rows,
    })
}

/// A U-Net fixture (`kind = "unet2d"`): its config and every tensor as f64.
pub struct UNetFixture {
    pub path: PathBuf,
    pub config: UNetConfig,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl UNetFixture {
    pub fn tensor(&self, name: &str) -> Result<&HostTensor, ModelError> {
        self.tensors.get(name).ok_or_else(|| {
            ModelError::checkpoint(&self.path, format!("no tensor `{name}` in the fixture"))
        })
    }
}

/// Either kind of fixture, told apart by its config's `kind`.
pub enum AnyFixture {
    ResNetLstm(Fixture),
    UNet(UNetFixture),
}

impl AnyFixture {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let (tensors, meta) = checkpoint::read_tensors(path)?;
        let json = meta.get(checkpoint::CONFIG_KEY).ok_or_else(|| {
            ModelError::checkpoint(path, "no `config` in the metadata: not a parity fixture")
        })?;
        if config_kind(json).as_deref() == Some(UNET_KIND) {
            let config = UNetConfig::from_json(json)
                .map_err(|e| ModelError::checkpoint(path, format!("metadata `config`: {e}")))?;
            return Ok(AnyFixture::UNet(UNetFixture {
                path: path.to_path_buf(),
                config,
                tensors,
            }));
        }
        let config = ModelConfig::from_fixture_json(json)
            .map_err(|e| ModelError::checkpoint(path, format!("metadata `config`: {e}")))?;
        Ok(AnyFixture::ResNetLstm(Fixture {
            path: path.to_path_buf(),
            config,
            tensors,
        }))
    }
}

/// Runs the U-Net comparison on `backend`: the training-mode output and loss, every
/// gradient, the running statistics after that forward, and the eval-mode output.
pub fn run_unet<B: Backend>(
    backend: B,
    fx: &UNetFixture,
    tolerance: f64,
) -> Result<ParityReport, ModelError> {
    let name = backend.name();
    let c = &fx.config;
    let mut net = UNet::new(backend, c.clone(), 0)?;
    unet::checkpoint::assign(&mut net, &fx.tensors, "param.", &fx.path)?;
    let conv =
        |t: &HostTensor| -> Vec<B::T> { t.data.iter().map(|&x| B::T::from_f64_lossy(x)).collect() };
    let input = fx.tensor("input")?;
    let [n, ch, h, w] = input.shape[..] else {
        return Err(ModelError::checkpoint(
            &fx.path,
            format!("`input` has shape {:?}, expected [N, C, H, W]", input.shape),
        ));
    };
    if ch != c.in_channels {
        return Err(ModelError::checkpoint(
            &fx.path,
            format!("`input` has {ch} channels, the config {}", c.in_channels),
        ));
    }
    let target = fx.tensor("target")?;
    if target.shape != [n, c.out_channels, h, w] {
        return Err(ModelError::checkpoint(
            &fx.path,
            format!(
                "`target` has shape {:?}, expected {:?}",
                target.shape,
                [n, c.out_channels, h, w]
            ),
        ));
    }
    let x = conv(input);
    let mut sink = Rows::new(&fx.tensors, tolerance);
    let loss = net.forward_backward(&x, &conv(target), n, h, w)?;
    sink.push(
        "output".into(),
        &f64s(&net.output()?),
        fx.tensor("output")?,
        false,
    );
    sink.push("loss".into(), &[loss.loss], fx.tensor("loss")?, false);
    for s in net.weight_specs() {
        sink.push(
            format!("grad {}", s.name),
            &f64s(&net.grad(&s.name)?),
            fx.tensor(&format!("grad.{}", s.name))?,
            true,
        );
    }
    for s in net.stat_specs() {
        sink.push(
            format!("after_train {}", s.name),
            &f64s(&net.param(&s.name)?),
            fx.tensor(&format!("after_train.{}", s.name))?,
            false,
        );
    }
    let eval = net.predict(&x, n, h, w)?;
    sink.push(
        "eval.output".into(),
        &f64s(&eval),
        fx.tensor("eval.output")?,
        false,
    );
    Ok(ParityReport {
        backend: name,
        tolerance,
        rows: sink.rows,
    })
}
