//! The U-Net in a model file: its tensors under the `unet.` prefix (`unet.encoder1.enc1conv1.weight`,
//! `unet.decoder1.dec1norm2.running_var`, ...) and its config as JSON under the metadata key
//! `unet_config`, beside the ResNet-LSTM's tensors, through the model checkpoint machinery
//! ([`crate::model::checkpoint::save_with`] writes the file, whose ResNet-LSTM loader skips
//! the `unet.` names). A model file is input: on loading, the config is checked against
//! bounds ([`UNetConfig::check_bounds`]) and its parameters against the memory budget before
//! anything is allocated, names and shapes are checked (every mismatch reported at once),
//! and a tensor holding NaN/Inf is refused by name. Knows nothing about training.

use super::{UNet, UNetConfig};
use crate::engine::{Backend, Real};
use crate::model::checkpoint::{self, HostTensor, Section};
use crate::model::{MismatchReport, ModelError, ShapeMismatch};
use std::collections::BTreeMap;
use std::path::Path;

/// Name prefix of the U-Net's tensors in a model file.
pub const PREFIX: &str = "unet.";
/// Metadata key of the U-Net's config.
pub const CONFIG_KEY: &str = "unet_config";

/// The U-Net's tensors (trainables and running statistics, `unet.`-prefixed) and config, as
/// a section of a model file.
pub fn section<B: Backend>(net: &UNet<B>) -> Result<Section, ModelError> {
    let mut tensors = Vec::new();
    for s in net.weight_specs().into_iter().chain(net.stat_specs()) {
        let v: Vec<f64> = net.param(&s.name)?.iter().map(|x| x.as_f64()).collect();
        tensors.push((format!("{PREFIX}{}", s.name), s.shape, v));
    }
    Ok(Section {
        tensors,
        metadata: vec![(CONFIG_KEY.to_string(), net.cfg().to_json())],
    })
}

/// Sets every tensor of `net` from `tensors` (names `prefix + name`; other names are
/// ignored), after checking that every name is there with its shape and nothing unknown
/// carries the prefix.
pub fn assign<B: Backend>(
    net: &mut UNet<B>,
    tensors: &BTreeMap<String, HostTensor>,
    prefix: &str,
    path: &Path,
) -> Result<(), ModelError> {
    let specs: Vec<_> = net
        .weight_specs()
        .into_iter()
        .chain(net.stat_specs())
        .collect();
    let mut report = MismatchReport::default();
    for s in &specs {
        match tensors.get(&format!("{prefix}{}", s.name)) {
            None => report.missing.push((s.name.clone(), s.shape.clone())),
            Some(t) if t.shape != s.shape || t.data.len() != s.shape.iter().product::<usize>() => {
                report.mismatched.push(ShapeMismatch {
                    name: s.name.clone(),
                    expected: s.shape.clone(),
                    found: t.shape.clone(),
                })
            }
            Some(_) => {}
        }
    }
    for (n, t) in tensors {
        let Some(rest) = n.strip_prefix(prefix) else {
            continue;
        };
        if !specs.iter().any(|s| s.name == rest) && !rest.ends_with(".num_batches_tracked") {
            report.unexpected.push((rest.to_string(), t.shape.clone()));
        }
    }
    if !report.is_empty() {
        return Err(ModelError::Mismatch {
            path: path.to_path_buf(),
            report,
        });
    }
    for s in &specs {
        let key = format!("{prefix}{}", s.name);
        let t = tensors
            .get(&key)
            .ok_or_else(|| ModelError::Internal(format!("{} vanished", s.name)))?;
        checkpoint::check_finite(path, &key, &t.data)?;
        let v: Vec<B::T> = t.data.iter().map(|&x| B::T::from_f64_lossy(x)).collect();
        net.set_param(&s.name, &v)?;
    }
    Ok(())
}

/// The U-Net stored in a model file (built from its `unet_config`), or `None` when the file
/// holds none.
pub fn load<B: Backend>(backend: B, path: &Path) -> Result<Option<UNet<B>>, ModelError> {
    let (tensors, metadata) = checkpoint::read_tensors(path)?;
    let Some(json) = metadata.get(CONFIG_KEY) else {
        if tensors.keys().any(|k| k.starts_with(PREFIX)) {
            return Err(ModelError::checkpoint(
                path,
                format!("`{PREFIX}*` tensors but no `{CONFIG_KEY}` metadata"),
            ));
        }
        return Ok(None);
    };
    let cfg = UNetConfig::from_json(json)
        .and_then(|c| c.check_bounds().map(|_| c))
        .map_err(|e| ModelError::checkpoint(path, format!("metadata `{CONFIG_KEY}`: {e}")))?;
    let need = cfg
        .tensor_count()
        .and_then(|n| n.checked_mul(std::mem::size_of::<B::T>() as u128))
        .unwrap_or(u128::MAX);
    crate::io::budget::budget().check(path, need, || {
        format!("the U-Net's parameters ({})", cfg.to_json())
    })?;
    let mut net = UNet::new(backend, cfg, 0)?;
    assign(&mut net, &tensors, PREFIX, path)?;
    Ok(Some(net))
}
