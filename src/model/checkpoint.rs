//! safetensors checkpoints with PyTorch's parameter names: f32 (default) or f64 on disk,
//! the model config as JSON under the metadata key `config` (the fixture format, which
//! [`ModelConfig::from_fixture_json`] reads), any extra metadata the caller passes, and
//! optionally the optimizer state (`opt.<name>.m`, `opt.<name>.v`, steps under `opt_steps`).
//! Loading accepts f32, f64, f16 and bf16 and checks every name and shape, reporting all
//! missing, unexpected and mismatched tensors at once; `*.num_batches_tracked` is ignored,
//! so a PyTorch `state_dict` saved with these names loads. Other model parts (the stage-3
//! U-Net, under `unet.`) are written into the same file by [`save_with`] and left alone by
//! this loader. A model file is input: its config is validated against bounds
//! ([`ModelConfig::validate`]), the file and the network's parameters are checked against
//! the memory budget before they are allocated, and a tensor holding NaN/Inf is refused by
//! name. Writes are atomic (temporary file in the same folder, then rename). Knows nothing
//! about training or CT.

use super::config::ModelConfig;
use super::net::IchNet;
use super::{MismatchReport, ModelError, ShapeMismatch};
use crate::engine::{Backend, Real};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Element type written to disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskDtype {
    #[default]
    F32,
    F64,
}

/// What [`save`] writes besides the parameters.
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    pub dtype: DiskDtype,
    /// Also write the optimizer state (for resuming training).
    pub optimizer: bool,
    /// Extra metadata (epoch, metrics, ...); the keys `config` and `opt_steps` are reserved.
    pub extra: HashMap<String, String>,
}

/// What [`load_into`] found besides the parameters.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// The file's whole metadata (including `config`).
    pub metadata: HashMap<String, String>,
    /// Whether optimizer state was present and restored.
    pub optimizer_restored: bool,
}

/// Metadata key of the model config.
pub const CONFIG_KEY: &str = "config";
const OPT_STEPS_KEY: &str = "opt_steps";
const OPT_PREFIX: &str = "opt.";

/// A tensor read from a file, converted to f64.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// A file's tensors by name, and its metadata.
pub type TensorsAndMetadata = (BTreeMap<String, HostTensor>, HashMap<String, String>);

/// Reads a model file whole, after checking that it and its tensors decoded to f64 (at
/// most four times the file: f16 -> f64) fit the memory budget.
fn read_file(path: &Path) -> Result<Vec<u8>, ModelError> {
    let len = crate::io::metadata(path)?.len();
    crate::io::budget::budget().check(path, len as u128 * 5, || {
        format!("loading a {len}-byte model file")
    })?;
    std::fs::read(path).map_err(|e| ModelError::checkpoint(path, format!("cannot read: {e}")))
}

/// Every tensor of a safetensors file (as f64) and its metadata.
pub fn read_tensors(path: &Path) -> Result<TensorsAndMetadata, ModelError> {
    let bytes = read_file(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| ModelError::checkpoint(path, format!("bad header: {e}")))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let data = decode(&view)
            .map_err(|d| ModelError::checkpoint(path, format!("tensor {name}: {d}")))?;
        out.insert(
            name.to_string(),
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok((out, metadata))
}

fn decode(v: &TensorView<'_>) -> Result<Vec<f64>, String> {
    let b = v.data();
    Ok(match v.dtype() {
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        // PyTorch's `num_batches_tracked` counters.
        Dtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64)
            .collect(),
        Dtype::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        d => {
            return Err(format!(
                "unsupported dtype {d:?} (expected f32, f64, f16, bf16, i32 or i64)"
            ))
        }
    })
}

/// The model config stored in a file's metadata, if any.
pub fn read_config(path: &Path) -> Result<Option<ModelConfig>, ModelError> {
    let bytes = read_file(path)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| ModelError::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
    match meta.metadata().as_ref().and_then(|m| m.get(CONFIG_KEY)) {
        None => Ok(None),
        Some(j) => ModelConfig::from_fixture_json(j)
            .map(Some)
            .map_err(|e| ModelError::checkpoint(path, format!("metadata `config`: {e}"))),
    }
}

fn encode<T: Real>(values: &[T], dtype: DiskDtype) -> Vec<u8> {
    match dtype {
        DiskDtype::F32 => values
            .iter()
            .flat_map(|v| (v.as_f64() as f32).to_le_bytes())
            .collect(),
        DiskDtype::F64 => values
            .iter()
            .flat_map(|v| v.as_f64().to_le_bytes())
            .collect(),
    }
}

/// Name prefixes of the other model parts a model file may hold beside the ResNet-LSTM
/// (the stage-3 U-Net, see [`crate::model::unet::checkpoint`]): the ResNet-LSTM's loader
/// leaves them alone.
pub const PART_PREFIXES: &[&str] = &["unet."];

/// Another model part's tensors (full names, shapes, values) and metadata entries, written
/// into the same file by [`save_with`].
#[derive(Clone, Debug, Default)]
pub struct Section {
    pub tensors: Vec<(String, Vec<usize>, Vec<f64>)>,
    pub metadata: Vec<(String, String)>,
}

/// Saves every parameter and running statistic under its PyTorch name.
pub fn save<B: Backend>(
    net: &IchNet<B>,
    path: &Path,
    opts: &SaveOptions,
) -> Result<(), ModelError> {
    save_with(net, &[], path, opts)
}

/// [`save`], plus the tensors and metadata of other model parts (the stage-3 U-Net).
pub fn save_with<B: Backend>(
    net: &IchNet<B>,
    sections: &[Section],
    path: &Path,
    opts: &SaveOptions,
) -> Result<(), ModelError> {
    let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut steps = BTreeMap::new();
    for p in net.params().iter() {
        entries.push((
            p.name.to_string(),
            p.shape.to_vec(),
            encode(&net.param(p.name)?, opts.dtype),
        ));
        if opts.optimizer {
            let st = net.opt_state(p.name)?;
            let (m, v, s) = (st.m, st.v, st.steps);
            if let Some(m) = m {
                entries.push((
                    format!("{OPT_PREFIX}{}.m", p.name),
                    p.shape.to_vec(),
                    encode(&m, opts.dtype),
                ));
            }
            if let Some(v) = v {
                entries.push((
                    format!("{OPT_PREFIX}{}.v", p.name),
                    p.shape.to_vec(),
                    encode(&v, opts.dtype),
                ));
            }
            if s > 0 {
                steps.insert(p.name.to_string(), s);
            }
        }
    }
    for sec in sections {
        for (name, shape, values) in &sec.tensors {
            entries.push((name.clone(), shape.clone(), encode(values, opts.dtype)));
        }
    }
    let dtype = match opts.dtype {
        DiskDtype::F32 => Dtype::F32,
        DiskDtype::F64 => Dtype::F64,
    };
    let mut views = Vec::with_capacity(entries.len());
    for (name, shape, bytes) in &entries {
        let v = TensorView::new(dtype, shape.clone(), bytes)
            .map_err(|e| ModelError::checkpoint(path, format!("tensor {name}: {e}")))?;
        views.push((name.clone(), v));
    }
    let mut meta = opts.extra.clone();
    for sec in sections {
        meta.extend(sec.metadata.iter().cloned());
    }
    meta.insert(CONFIG_KEY.into(), net.cfg().to_fixture_json());
    if opts.optimizer {
        meta.insert(
            OPT_STEPS_KEY.into(),
            serde_json::to_string(&steps).map_err(|e| ModelError::Internal(e.to_string()))?,
        );
    }
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| ModelError::checkpoint(path, format!("cannot serialise: {e}")))?;
    crate::io::atomic::write_atomic(path, |w| std::io::Write::write_all(w, &bytes))?;
    Ok(())
}

/// Compares a file's tensors (`name -> shape`, names without any prefix) with the model's.
pub fn check_names<B: Backend>(
    net: &IchNet<B>,
    found: &BTreeMap<String, Vec<usize>>,
) -> MismatchReport {
    let mut r = MismatchReport::default();
    let mut expected = HashMap::new();
    for p in net.params().iter() {
        expected.insert(p.name.to_string(), ());
        match found.get(p.name) {
            None => r.missing.push((p.name.to_string(), p.shape.to_vec())),
            Some(s) if s.as_slice() != p.shape => r.mismatched.push(ShapeMismatch {
                name: p.name.to_string(),
                expected: p.shape.to_vec(),
                found: s.clone(),
            }),
            Some(_) => {}
        }
    }
    for (n, s) in found {
        if !expected.contains_key(n) && !n.ends_with(".num_batches_tracked") {
            r.unexpected.push((n.clone(), s.clone()));
        }
    }
    r
}

/// Sets every parameter of `net` from `tensors` (names prefixed by `prefix`), after
/// checking that names and shapes match exactly.
pub fn assign<B: Backend>(
    net: &mut IchNet<B>,
    tensors: &BTreeMap<String, HostTensor>,
    prefix: &str,
    path: &Path,
) -> Result<(), ModelError> {
    let found: BTreeMap<String, Vec<usize>> = tensors
        .iter()
        .filter_map(|(n, t)| {
            let s = n.strip_prefix(prefix)?;
            // Optimizer state is not a parameter (it is restored separately).
            if prefix.is_empty() && s.starts_with(OPT_PREFIX) {
                return None;
            }
            // Other model parts' tensors (the U-Net's) are theirs to load.
            if prefix.is_empty() && PART_PREFIXES.iter().any(|p| s.starts_with(p)) {
                return None;
            }
            Some((s.to_string(), t.shape.clone()))
        })
        .collect();
    let report = check_names(net, &found);
    if !report.is_empty() {
        return Err(ModelError::Mismatch {
            path: path.to_path_buf(),
            report,
        });
    }
    for name in net.names() {
        let key = format!("{prefix}{name}");
        let t = tensors
            .get(&key)
            .ok_or_else(|| ModelError::Internal(format!("{key} vanished")))?;
        check_finite(path, &key, &t.data)?;
        let v: Vec<B::T> = t.data.iter().map(|&x| B::T::from_f64_lossy(x)).collect();
        net.set_param(&name, &v)?;
    }
    Ok(())
}

/// An error naming the tensor when any of its values is NaN or infinite (a damaged or
/// diverged model: its probabilities would all be NaN).
pub fn check_finite(path: &Path, name: &str, data: &[f64]) -> Result<(), ModelError> {
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(ModelError::checkpoint(
            path,
            format!(
                "tensor `{name}` holds {bad} non-finite value(s) (NaN/Inf) of {}: the model is damaged or diverged",
                data.len()
            ),
        ));
    }
    Ok(())
}

/// Loads a checkpoint into an existing network of the same topology (the file's `config`,
/// when present, must equal the network's), restoring the optimizer state if saved.
pub fn load_into<B: Backend>(net: &mut IchNet<B>, path: &Path) -> Result<Loaded, ModelError> {
    let (tensors, metadata) = read_tensors(path)?;
    if let Some(j) = metadata.get(CONFIG_KEY) {
        let c = ModelConfig::from_fixture_json(j)
            .map_err(|e| ModelError::checkpoint(path, format!("metadata `config`: {e}")))?;
        let mine = net.cfg();
        let same_topology = c.block == mine.block
            && c.layers == mine.layers
            && c.base_width == mine.base_width
            && c.lstm_hidden == mine.lstm_hidden
            && c.lstm_layers == mine.lstm_layers
            && c.head == mine.head
            && c.in_channels == mine.in_channels;
        if !same_topology {
            return Err(ModelError::checkpoint(
                path,
                format!(
                    "the file's model config {} differs from the network's {}",
                    j,
                    mine.to_fixture_json()
                ),
            ));
        }
    }
    assign(net, &tensors, "", path)?;
    let mut restored = false;
    if let Some(j) = metadata.get(OPT_STEPS_KEY) {
        let steps: BTreeMap<String, u64> = serde_json::from_str(j).map_err(|e| {
            ModelError::checkpoint(path, format!("metadata `{OPT_STEPS_KEY}`: {e}"))
        })?;
        for name in net.names() {
            let conv = |suffix: &str| -> Result<Option<Vec<B::T>>, ModelError> {
                let key = format!("{OPT_PREFIX}{name}.{suffix}");
                match tensors.get(&key) {
                    None => Ok(None),
                    Some(t) => {
                        check_finite(path, &key, &t.data)?;
                        Ok(Some(
                            t.data.iter().map(|&x| B::T::from_f64_lossy(x)).collect(),
                        ))
                    }
                }
            };
            let (m, v) = (conv("m")?, conv("v")?);
            let s = steps.get(&name).copied().unwrap_or(0);
            if m.is_some() || s > 0 {
                net.set_opt_state(&name, m.as_deref(), v.as_deref(), s)
                    .map_err(|e| ModelError::checkpoint(path, format!("optimizer state: {e}")))?;
                restored = true;
            }
        }
    }
    Ok(Loaded {
        metadata,
        optimizer_restored: restored,
    })
}

/// Builds a network from a checkpoint's `config` metadata and loads its tensors.
pub fn load<B: Backend>(backend: B, path: &Path) -> Result<(IchNet<B>, Loaded), ModelError> {
    let cfg = read_config(path)?.ok_or_else(|| {
        ModelError::checkpoint(
            path,
            "no `config` in the metadata: build the network with its config and use `load_into`",
        )
    })?;
    let need =
        super::memory::param_bytes(&cfg, std::mem::size_of::<B::T>(), false).unwrap_or(u128::MAX);
    crate::io::budget::budget().check(path, need, || {
        format!("the model's parameters ({})", cfg.to_fixture_json())
    })?;
    let mut net = IchNet::new(backend, cfg, 0)?;
    let loaded = load_into(&mut net, path)?;
    Ok((net, loaded))
}
