//! safetensors checkpoints: a save/load round trip gives identical parameters, optimizer
//! state and outputs; f32 files load into f64 nets; a file with a wrong shape, a missing or
//! an unexpected tensor is refused with a message naming each tensor and both shapes; a
//! `state_dict` written by PyTorch (with `num_batches_tracked`) loads.

use ichcam::engine::cpu::CpuBackend;
use ichcam::model::checkpoint::{self, DiskDtype, SaveOptions};
use ichcam::model::{CamKind, IchNet, ModelConfig, ModelError, OptimizerConfig, ParamGroup};
use ichcam::rng::Rng;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;

type Net = IchNet<CpuBackend<f64>>;

fn small_cfg() -> ModelConfig {
    ModelConfig {
        layers: vec![1, 1],
        base_width: 4,
        lstm_hidden: 5,
        ..ModelConfig::tiny()
    }
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.normal()).collect()
}

/// A net that has trained two steps: running stats and optimizer state are non-trivial.
fn trained(seed: u64) -> (Net, Vec<f64>) {
    let mut net = Net::new(CpuBackend::new(), small_cfg(), seed).unwrap();
    let mut rng = Rng::new(seed);
    let x = randn(&mut rng, 2 * 3 * 24 * 24);
    for _ in 0..2 {
        net.stage1_forward_backward(&x, &[1.0, 0.0], 1, 2, 24, 24, 1.0)
            .unwrap();
        net.step(&OptimizerConfig::adam(1e-2), ParamGroup::Stage1)
            .unwrap();
        net.stage2_forward_backward(&x, &[0.0, 1.0], 2, 24, 24, 1.0)
            .unwrap();
        net.step(
            &OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 1e-4,
            },
            ParamGroup::Fc,
        )
        .unwrap();
    }
    (net, x)
}

fn outputs(net: &mut Net, x: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let l1 = net.stage1_logits(x, 1, 2, 24, 24).unwrap();
    let o = net.stage2_infer(x, 2, 24, 24, CamKind::Vanilla).unwrap();
    (l1, o.logits, o.cam_norm)
}

#[test]
fn round_trip_f64_is_exact_with_optimizer_state() {
    let (mut a, x) = trained(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/dir/model.safetensors");
    let mut extra = HashMap::new();
    extra.insert("epoch".to_string(), "7".to_string());
    checkpoint::save(
        &a,
        &path,
        &SaveOptions {
            dtype: DiskDtype::F64,
            optimizer: true,
            extra,
        },
    )
    .unwrap();
    // Only the checkpoint is left in the folder (no temporary file).
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );

    let (mut b, loaded) = checkpoint::load(CpuBackend::<f64>::new(), &path).unwrap();
    assert_eq!(b.cfg(), a.cfg());
    assert_eq!(loaded.metadata.get("epoch").map(String::as_str), Some("7"));
    assert!(loaded.optimizer_restored);
    assert_eq!(a.names(), b.names());
    for n in a.names() {
        assert_eq!(a.param(&n).unwrap(), b.param(&n).unwrap(), "{n}");
        assert_eq!(a.opt_state(&n).unwrap(), b.opt_state(&n).unwrap(), "{n}");
    }
    assert_eq!(outputs(&mut a, &x), outputs(&mut b, &x));
    // Resuming takes the same step as not stopping.
    for net in [&mut a, &mut b] {
        net.stage1_forward_backward(&x, &[0.0, 1.0], 1, 2, 24, 24, 1.0)
            .unwrap();
        net.step(&OptimizerConfig::adam(1e-2), ParamGroup::Stage1)
            .unwrap();
    }
    for n in a.names() {
        assert_eq!(
            a.param(&n).unwrap(),
            b.param(&n).unwrap(),
            "{n} after a resumed step"
        );
    }
}

#[test]
fn round_trip_f32_into_a_fresh_net() {
    let (mut a, x) = trained(2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    checkpoint::save(&a, &path, &SaveOptions::default()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("layer2.0.downsample.1.running_var")
            .unwrap()
            .dtype(),
        Dtype::F32
    );
    assert!(st.names().iter().all(|n| !n.starts_with("opt.")));

    let mut b = Net::new(CpuBackend::new(), small_cfg(), 99).unwrap();
    assert_ne!(
        a.param("conv1.weight").unwrap(),
        b.param("conv1.weight").unwrap()
    );
    checkpoint::load_into(&mut b, &path).unwrap();
    for n in a.names() {
        let (pa, pb) = (a.param(&n).unwrap(), b.param(&n).unwrap());
        for (u, v) in pa.iter().zip(&pb) {
            assert_eq!(*v, *u as f32 as f64, "{n}");
        }
    }
    let (oa, ob) = (outputs(&mut a, &x), outputs(&mut b, &x));
    for (u, v) in oa.0.iter().zip(&ob.0).chain(oa.1.iter().zip(&ob.1)) {
        assert!((u - v).abs() < 1e-4 * (1.0 + u.abs()), "{u} vs {v}");
    }
}

/// Rewrites a checkpoint through `edit(name, shape)`: None drops the tensor.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl Fn(&str, &[usize]) -> Option<Vec<usize>>,
    add: Option<(&str, Vec<usize>)>,
) {
    let bytes = std::fs::read(src).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut owned = Vec::new();
    for (n, v) in st.iter() {
        if let Some(shape) = edit(n, v.shape()) {
            let numel: usize = shape.iter().product();
            owned.push((n.to_string(), shape, vec![0u8; numel * 4]));
        }
    }
    if let Some((n, shape)) = add {
        let numel: usize = shape.iter().product();
        owned.push((n.to_string(), shape, vec![0u8; numel * 4]));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dst,
        safetensors::serialize(views, meta.metadata().clone()).unwrap(),
    )
    .unwrap();
}

#[test]
fn wrong_missing_and_unexpected_tensors_are_named() {
    let (a, _) = trained(3);
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    checkpoint::save(&a, &good, &SaveOptions::default()).unwrap();
    let bad = dir.path().join("bad.safetensors");
    rewrite(
        &good,
        &bad,
        |n, s| match n {
            "layer1.0.conv2.weight" => Some(vec![4, 4, 5, 5]),
            "lstm.bias_hh_l0" => None,
            _ => Some(s.to_vec()),
        },
        Some(("head.6.weight", vec![1, 1])),
    );
    let mut b = Net::new(CpuBackend::new(), small_cfg(), 5).unwrap();
    let before = b.param("conv1.weight").unwrap();
    let err = checkpoint::load_into(&mut b, &bad).unwrap_err();
    let ModelError::Mismatch { report, .. } = &err else {
        panic!("expected a mismatch report, got {err}")
    };
    assert_eq!(report.mismatched.len(), 1);
    assert_eq!(
        report.missing,
        vec![("lstm.bias_hh_l0".to_string(), vec![20])]
    );
    assert_eq!(
        report.unexpected,
        vec![("head.6.weight".to_string(), vec![1, 1])]
    );
    let msg = err.to_string();
    for want in [
        "bad.safetensors",
        "layer1.0.conv2.weight",
        "[4, 4, 3, 3]",
        "[4, 4, 5, 5]",
        "missing: lstm.bias_hh_l0",
        "unexpected: head.6.weight",
    ] {
        assert!(msg.contains(want), "no `{want}` in:\n{msg}");
    }
    // A refused file changes nothing.
    assert_eq!(b.param("conv1.weight").unwrap(), before);

    // A file of another config is refused before any tensor is compared.
    let other = Net::new(
        CpuBackend::new(),
        ModelConfig {
            base_width: 8,
            ..small_cfg()
        },
        1,
    )
    .unwrap();
    let p = dir.path().join("other.safetensors");
    checkpoint::save(&other, &p, &SaveOptions::default()).unwrap();
    let msg = checkpoint::load_into(&mut b, &p).unwrap_err().to_string();
    assert!(
        msg.contains("config") && msg.contains("other.safetensors"),
        "{msg}"
    );

    // Not a checkpoint, a missing file, a folder as the target: errors, no panic.
    std::fs::write(dir.path().join("junk"), b"12345678junk").unwrap();
    assert!(checkpoint::load_into(&mut b, &dir.path().join("junk")).is_err());
    assert!(checkpoint::load_into(&mut b, &dir.path().join("nope"))
        .unwrap_err()
        .to_string()
        .contains("nope"));
    assert!(checkpoint::save(&b, dir.path(), &SaveOptions::default()).is_err());
}

#[test]
fn pytorch_state_dict_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch-parity/torch_state_dict_tiny.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .names()
        .iter()
        .any(|n| n.ends_with("num_batches_tracked")));
    let (net, _) = checkpoint::load(CpuBackend::<f32>::new(), &path).unwrap();
    assert_eq!(net.cfg().layers, vec![1, 1]);
    for n in net.names() {
        let want: Vec<f32> = st
            .tensor(&n)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(net.param(&n).unwrap(), want, "{n}");
    }
}
