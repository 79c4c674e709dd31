//! Checks the engine against a PyTorch fixture (see tests/fixtures/torch-parity/README.md):
//! loads `param.*`, runs the training-mode stage-1 forward, loss and backward and the
//! eval-mode stage-2 / CAM path, and compares every quantity with PyTorch's by
//! `||ours - torch|| / ||torch||`. Works for any config in the fixture format. Knows
//! nothing about the command line.

use super::checkpoint::{self, HostTensor};
use super::config::ModelConfig;
use super::net::{CamKind, IchNet};
use super::params::{Group, ParamKind};
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
    // A gradient that is zero analytically (e.g. a BN bias whose every path ends in another
    // training-mode BN while the ReLU between is inactive) holds only rounding noise in
    // both engines; its error is measured against the norm of all gradients instead.
    let all_grads = fx
        .tensors
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .flat_map(|(_, t)| t.data.iter())
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt();
    let mut rows = Vec::new();
    let mut push = |q: String, ours: &[f64], torch: &HostTensor, is_grad: bool| {
        let norm = torch.data.iter().map(|x| x * x).sum::<f64>().sqrt();
        let (q, e) = if is_grad && norm < 1e-9 * all_grads && ours.len() == torch.data.len() {
            let d = ours
                .iter()
                .zip(&torch.data)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt();
            (format!("{q} (0 in torch: vs all grads)"), d / all_grads)
        } else {
            (q, rel_err(ours, &torch.data))
        };
        rows.push(ParityRow {
            quantity: q,
            elements: torch.data.len(),
            rel_err: e,
            pass: e <= tolerance,
        });
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
        rows,
    })
}
