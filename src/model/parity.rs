//! Checks the engine against a PyTorch fixture: a ResNet-LSTM fixture
//! (tests/fixtures/torch-parity/README.md: loads `param.*`, runs the training-mode stage-1
//! forward, loss and backward and the eval-mode stage-2 / CAM path) or a U-Net fixture
//! (`kind = "unet2d"`, tests/fixtures/unet-parity/README.md: the training-mode forward, Dice
//! loss and backward, the updated running statistics and the eval-mode output), and compares
//! every quantity with PyTorch's by `||ours - torch|| / ||torch||`. Works for any config in
//! the fixture formats. Knows nothing about the command line.
//!
//! A fixture's reference is PyTorch in exact f64. For the CUDA backend's reduced convolution
//! precisions a fixture may have a rounded reference beside it
//! ([`rounded_reference_path`], written by tests/fixtures/torch-parity/make_precision.py): the
//! same quantities recomputed in f64 with every convolution's operands rounded to tf32 or
//! bf16 as the tensor-core kernels round them. [`AnyFixture::use_rounded_reference`] swaps
//! it in; the report then also says, per quantity, how far that reference is from the exact
//! one.

use super::checkpoint::{self, HostTensor};
use super::config::ModelConfig;
use super::net::{CamKind, IchNet};
use super::params::{Group, ParamKind};
use super::unet::config::{config_kind, UNET_KIND};
use super::unet::{self, UNet, UNetConfig};
use super::ModelError;
use crate::engine::{Backend, Precision, Real};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The tensors of a fixture that are inputs, not reference quantities.
const INPUTS: [&str; 3] = ["input", "labels", "target"];

/// Whether a fixture tensor is a reference quantity (not a parameter or an input).
fn is_quantity(name: &str) -> bool {
    !name.starts_with("param.") && !INPUTS.contains(&name)
}

/// Where the rounded references of `fixture` (`DIR/NAME.safetensors`) are:
/// `DIR/precision/NAME.rounded.safetensors` (a subfolder, so that the fixture folders hold
/// fixtures only).
pub fn rounded_reference_path(fixture: &Path) -> PathBuf {
    let stem = fixture
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    fixture
        .parent()
        .unwrap_or_else(|| Path::new(""))
        .join("precision")
        .join(format!("{stem}.rounded.safetensors"))
}

/// A rounded reference in use: what it replaced.
#[derive(Clone, Debug)]
pub struct RoundedReference {
    /// The file it came from.
    pub path: PathBuf,
    /// The precision whose rounding it reproduces.
    pub precision: Precision,
    /// The fixture's exact f64 quantities it replaced, by name.
    pub exact: BTreeMap<String, HostTensor>,
    /// Per quantity (the file's metadata `f32_same_rounding`), the "f32 floor": the largest
    /// distance from this reference of PyTorch's float32 run of the same rounded computation
    /// and of 8 f64 runs with f32-sized noise on every rounded convolution's outputs, i.e.
    /// how far f32 implementations of exactly these semantics land from it.
    pub f32_floor: BTreeMap<String, f64>,
}

/// Replaces every reference quantity of `tensors` (the fixture at `fixture`) by the rounded
/// one of `precision` from `rounded_reference_path(fixture)`: None (nothing changed) when
/// the precision is f32 or there is no such file; an error when the file is not the
/// fixture's (another source file or loss) or lacks a quantity.
fn swap_in_rounded(
    fixture: &Path,
    tensors: &mut BTreeMap<String, HostTensor>,
    precision: Precision,
) -> Result<Option<RoundedReference>, ModelError> {
    if !precision.tensor_cores() {
        return Ok(None);
    }
    let path = rounded_reference_path(fixture);
    if !path.is_file() {
        return Ok(None);
    }
    let (mut rounded, meta) = checkpoint::read_tensors(&path)?;
    let bad = |msg: String| ModelError::checkpoint(&path, msg);
    let source = meta
        .get("source")
        .ok_or_else(|| bad("no `source` in the metadata: not a rounded reference".into()))?;
    let source: serde_json::Value =
        serde_json::from_str(source).map_err(|e| bad(format!("metadata `source`: {e}")))?;
    let name = fixture
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    if source.get("file").and_then(|f| f.as_str()) != name.as_deref() {
        return Err(bad(format!(
            "made for {}, not for {}",
            source.get("file").unwrap_or(&serde_json::Value::Null),
            fixture.display()
        )));
    }
    let loss = tensors.get("loss").and_then(|t| t.data.first().copied());
    let src_loss = source.get("loss").and_then(|l| l.as_f64());
    match (loss, src_loss) {
        (Some(a), Some(b)) if (a - b).abs() <= 1e-12 * a.abs().max(1e-300) => {}
        _ => {
            return Err(bad(format!(
                "made from a fixture with loss {src_loss:?}, this one has {loss:?}: regenerate it"
            )))
        }
    }
    let prefix = format!("{}.", precision.name());
    let names: Vec<String> = tensors.keys().filter(|k| is_quantity(k)).cloned().collect();
    let mut exact = BTreeMap::new();
    for q in names {
        let r = rounded
            .remove(&format!("{prefix}{q}"))
            .ok_or_else(|| bad(format!("no `{prefix}{q}`")))?;
        let e = tensors.insert(q.clone(), r).ok_or_else(|| bad(q.clone()))?;
        if tensors[&q].shape != e.shape {
            return Err(bad(format!(
                "`{prefix}{q}` has shape {:?}, the fixture's {:?}",
                tensors[&q].shape, e.shape
            )));
        }
        exact.insert(q, e);
    }
    if let Some(extra) = rounded.keys().find(|k| k.starts_with(&prefix)) {
        return Err(bad(format!("`{extra}` is not a quantity of the fixture")));
    }
    let f32_floor = match meta.get("f32_same_rounding") {
        None => BTreeMap::new(),
        Some(j) => {
            let all: BTreeMap<String, BTreeMap<String, f64>> = serde_json::from_str(j)
                .map_err(|e| bad(format!("metadata `f32_same_rounding`: {e}")))?;
            all.get(precision.name()).cloned().unwrap_or_default()
        }
    };
    Ok(Some(RoundedReference {
        path,
        precision,
        exact,
        f32_floor,
    }))
}

/// A fixture file: its config and every tensor as f64.
pub struct Fixture {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, HostTensor>,
    /// The rounded reference that replaced the exact quantities of `tensors`, if any.
    pub rounded: Option<RoundedReference>,
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
            rounded: None,
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
    /// With a rounded reference: the same measure of that reference against the exact f64
    /// one (how much the precision itself moves the quantity).
    pub ref_gap: Option<f64>,
    /// With a rounded reference: its f32 floor for this quantity
    /// ([`RoundedReference::f32_floor`]).
    pub f32_floor: Option<f64>,
}

/// Every row of a parity run.
#[derive(Clone, Debug)]
pub struct ParityReport {
    pub backend: String,
    pub tolerance: f64,
    /// What the rows are compared with, in words.
    pub reference: String,
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
        // The reference's own columns come before the error and the verdict, which stay
        // the last two of every line.
        let gaps = self.rows.iter().any(|r| r.ref_gap.is_some());
        let floors = self.rows.iter().any(|r| r.f32_floor.is_some());
        let mut s = format!(
            "{:<w$}  {:>9}{}{}  {:>12}  result\n",
            "quantity",
            "elements",
            if gaps { "  ref. vs exact f64" } else { "" },
            if floors { "  f32 floor" } else { "" },
            "rel. error",
        );
        for r in &self.rows {
            let mut extra = String::new();
            if gaps {
                extra.push_str(&match r.ref_gap {
                    Some(g) => format!("  {g:>18.3e}"),
                    None => format!("  {:>18}", "-"),
                });
            }
            if floors {
                extra.push_str(&match r.f32_floor {
                    Some(f) => format!("  {f:>10.3e}"),
                    None => format!("  {:>10}", "-"),
                });
            }
            s.push_str(&format!(
                "{:<w$}  {:>9}{extra}  {:>12.3e}  {}\n",
                r.quantity,
                r.elements,
                r.rel_err,
                if r.pass { "PASS" } else { "FAIL" }
            ));
        }
        s
    }

    /// The failing rows whose f32 floor ([`RoundedReference::f32_floor`]) is over the
    /// tolerance too: quantities that f32 implementations of exactly the reference's
    /// semantics (PyTorch's own) miss by that much (that sensitive to f32-level differences).
    pub fn failures_over_f32_floor(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| !r.pass && r.f32_floor.is_some_and(|f| f > self.tolerance))
            .count()
    }

    /// The largest gap between the rounded reference and the exact one, if there is one.
    pub fn worst_ref_gap(&self) -> Option<&ParityRow> {
        self.rows
            .iter()
            .filter(|r| r.ref_gap.is_some())
            .max_by(|a, b| {
                a.ref_gap
                    .partial_cmp(&b.ref_gap)
                    .unwrap_or(std::cmp::Ordering::Greater)
            })
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

/// The norm of all the gradients of a fixture's quantities.
fn all_grads_norm(tensors: &BTreeMap<String, HostTensor>) -> f64 {
    tensors
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .flat_map(|(_, t)| t.data.iter())
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
}

/// The compared rows of one run.
struct Rows<'a> {
    path: &'a Path,
    tensors: &'a BTreeMap<String, HostTensor>,
    rounded: Option<&'a RoundedReference>,
    rows: Vec<ParityRow>,
    /// The norm of all of the reference's gradients (and of the exact ones).
    all_grads: f64,
    exact_all_grads: f64,
    tolerance: f64,
}

/// The error of `ours` against `torch`; a gradient that is zero analytically (e.g. a BN
/// bias whose every path ends in another training-mode BN while the ReLU between is
/// inactive) holds only rounding noise in both engines: its error is measured against the
/// norm of all gradients `all` instead (the bool says so).
fn measure(ours: &[f64], torch: &[f64], is_grad: bool, all: f64) -> (f64, bool) {
    let norm = torch.iter().map(|x| x * x).sum::<f64>().sqrt();
    if is_grad && norm < 1e-9 * all && ours.len() == torch.len() {
        let d = ours
            .iter()
            .zip(torch)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        (d / all, true)
    } else {
        (rel_err(ours, torch), false)
    }
}

impl<'a> Rows<'a> {
    fn new(
        path: &'a Path,
        tensors: &'a BTreeMap<String, HostTensor>,
        rounded: Option<&'a RoundedReference>,
        tolerance: f64,
    ) -> Self {
        Rows {
            path,
            tensors,
            rounded,
            rows: Vec::new(),
            all_grads: all_grads_norm(tensors),
            exact_all_grads: rounded.map_or(0.0, |r| all_grads_norm(&r.exact)),
            tolerance,
        }
    }

    /// Compares quantity `q` (the fixture's tensor `key`) with `ours`.
    fn push(
        &mut self,
        q: String,
        ours: &[f64],
        key: &str,
        is_grad: bool,
    ) -> Result<(), ModelError> {
        let torch = self.tensors.get(key).ok_or_else(|| {
            ModelError::checkpoint(self.path, format!("no tensor `{key}` in the fixture"))
        })?;
        let (e, vs_all) = measure(ours, &torch.data, is_grad, self.all_grads);
        let ref_gap = self
            .rounded
            .and_then(|r| r.exact.get(key))
            .map(|x| measure(&torch.data, &x.data, is_grad, self.exact_all_grads).0);
        let f32_floor = self.rounded.and_then(|r| r.f32_floor.get(key).copied());
        self.rows.push(ParityRow {
            quantity: if vs_all {
                format!("{q} (0 in torch: vs all grads)")
            } else {
                q
            },
            elements: torch.data.len(),
            rel_err: e,
            pass: e <= self.tolerance,
            ref_gap,
            f32_floor,
        });
        Ok(())
    }

    fn report(self, backend: String) -> ParityReport {
        ParityReport {
            backend,
            tolerance: self.tolerance,
            reference: describe_reference(self.rounded),
            rows: self.rows,
        }
    }
}

/// The reference of a run, in words.
fn describe_reference(rounded: Option<&RoundedReference>) -> String {
    match rounded {
        None => "PyTorch, exact f64".into(),
        Some(r) => format!(
            "PyTorch f64 with every convolution's operands rounded to {} as the tensor-core kernels round them ({})",
            r.precision,
            r.path.display()
        ),
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
    // The rounded references round only the convolutions' operands: the channels-last
    // activations of the eval-mode and of the training backbone stay f32 (bf16 storage would
    // round the residual adds, the batch norms' inputs, dz and the features too: at
    // `--precision bf16` with bf16 training storage the five fixtures missed 1 to 66
    // quantities, up to 3.6 relative, where f32 storage passes parity_basic1_odd and
    // parity_basic3_lstm3 outright; docs/perf.md).
    let mut backend = backend;
    backend.force_f32_eval_storage();
    backend.force_f32_train_storage();
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
    let mut sink = Rows::new(&fx.path, &fx.tensors, fx.rounded.as_ref(), tolerance);

    // Stage 1, training mode.
    let step = net.stage1_forward_backward(&conv(input), &conv(labels), b, s, h, w, 1.0)?;
    sink.push("logits".into(), &step.logits, "logits", false)?;
    sink.push("loss".into(), &[step.loss], "loss", false)?;
    for p_name in net.names() {
        let (kind, group) = {
            let p = net.params().get(&p_name)?;
            (p.kind, p.group)
        };
        match kind {
            ParamKind::Trainable if group != Group::Fc => {
                sink.push(
                    format!("grad {p_name}"),
                    &f64s(&net.grad(&p_name)?),
                    &format!("grad.{p_name}"),
                    true,
                )?;
            }
            ParamKind::Buffer => {
                sink.push(
                    format!("after_train {p_name}"),
                    &f64s(&net.param(&p_name)?),
                    &format!("after_train.{p_name}"),
                    false,
                )?;
            }
            _ => {}
        }
    }

    // Stage 2 / CAM, eval mode with the updated running stats.
    let xs = conv(input);
    let n = b * s;
    let feats = net.stage2_features(&xs, n, h, w)?;
    sink.push("eval.features".into(), &feats.data, "eval.features", false)?;
    let v = net.stage2_infer(&xs, n, h, w, CamKind::Vanilla)?;
    sink.push("eval.fc_logits".into(), &v.logits, "eval.fc_logits", false)?;
    sink.push("eval.cam".into(), &v.cam, "eval.cam", false)?;
    sink.push("eval.cam_up".into(), &v.cam_up, "eval.cam_up", false)?;
    sink.push("eval.cam_norm".into(), &v.cam_norm, "eval.cam_norm", false)?;
    let g = net.stage2_infer(&xs, n, h, w, CamKind::GradCam)?;
    sink.push("eval.gradcam".into(), &g.cam, "eval.gradcam", false)?;
    Ok(sink.report(name))
}

/// A U-Net fixture (`kind = "unet2d"`): its config and every tensor as f64.
pub struct UNetFixture {
    pub path: PathBuf,
    pub config: UNetConfig,
    pub tensors: BTreeMap<String, HostTensor>,
    /// The rounded reference that replaced the exact quantities of `tensors`, if any.
    pub rounded: Option<RoundedReference>,
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
                rounded: None,
            }));
        }
        let config = ModelConfig::from_fixture_json(json)
            .map_err(|e| ModelError::checkpoint(path, format!("metadata `config`: {e}")))?;
        Ok(AnyFixture::ResNetLstm(Fixture {
            path: path.to_path_buf(),
            config,
            tensors,
            rounded: None,
        }))
    }

    /// The fixture's file.
    pub fn path(&self) -> &Path {
        match self {
            AnyFixture::ResNetLstm(f) => &f.path,
            AnyFixture::UNet(f) => &f.path,
        }
    }

    /// The rounded reference in use, if any.
    pub fn rounded(&self) -> Option<&RoundedReference> {
        match self {
            AnyFixture::ResNetLstm(f) => f.rounded.as_ref(),
            AnyFixture::UNet(f) => f.rounded.as_ref(),
        }
    }

    /// For `precision` tf32 or bf16: compares against the fixture's rounded reference
    /// ([`rounded_reference_path`]) instead of its exact one when that file exists; returns
    /// whether it does. Nothing changes for f32, without the file, or when this precision's
    /// is in use already; another precision's is an error.
    pub fn use_rounded_reference(&mut self, precision: Precision) -> Result<bool, ModelError> {
        let (path, tensors, rounded) = match self {
            AnyFixture::ResNetLstm(f) => (&f.path, &mut f.tensors, &mut f.rounded),
            AnyFixture::UNet(f) => (&f.path, &mut f.tensors, &mut f.rounded),
        };
        match rounded {
            Some(r) if r.precision != precision => {
                return Err(ModelError::checkpoint(
                    path,
                    format!(
                        "the {} reference is in use already, not the {precision} one",
                        r.precision
                    ),
                ))
            }
            Some(_) => {}
            None => *rounded = swap_in_rounded(path, tensors, precision)?,
        }
        Ok(rounded.is_some())
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
    let mut sink = Rows::new(&fx.path, &fx.tensors, fx.rounded.as_ref(), tolerance);
    let loss = net.forward_backward(&x, &conv(target), n, h, w)?;
    sink.push("output".into(), &f64s(&net.output()?), "output", false)?;
    sink.push("loss".into(), &[loss.loss], "loss", false)?;
    for s in net.weight_specs() {
        sink.push(
            format!("grad {}", s.name),
            &f64s(&net.grad(&s.name)?),
            &format!("grad.{}", s.name),
            true,
        )?;
    }
    for s in net.stat_specs() {
        sink.push(
            format!("after_train {}", s.name),
            &f64s(&net.param(&s.name)?),
            &format!("after_train.{}", s.name),
            false,
        )?;
    }
    let eval = net.predict(&x, n, h, w)?;
    sink.push("eval.output".into(), &f64s(&eval), "eval.output", false)?;
    Ok(sink.report(name))
}
