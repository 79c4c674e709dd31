//! Training resumes after a kill: a run stopped after an epoch and resumed ends with the
//! same parameters as an uninterrupted run; a changed config or seed refuses to resume with
//! a clear message; the log and plot are written. Also (ignored by default) a measurement
//! of the `tiny` preset on synthetic phantoms.

mod common;
use common::train::phantoms;
use ichcam::data::synth::{phantom, plan_positive, SynthConfig};
use ichcam::engine::Device;
use ichcam::model::{BlockKind, ModelConfig, OptimizerConfig};
use ichcam::train::{train, AugmentConfig, TrainConfig, TrainError, TrainInput, TrainOptions};
use std::collections::BTreeMap;
use std::path::Path;

fn micro_config() -> TrainConfig {
    TrainConfig {
        name: "micro".into(),
        model: ModelConfig {
            block: BlockKind::Basic,
            layers: vec![1, 1],
            base_width: 4,
            lstm_hidden: 8,
            lstm_layers: 1,
            head: vec![8],
            ..ModelConfig::tiny()
        },
        size: 32,
        slices: 6,
        seq_stride: 3,
        batch: 2,
        epochs: 2,
        optimizer: OptimizerConfig::adam(1e-3),
        stage2_batch: 16,
        stage2_epochs: 1,
        stage2_optimizer: OptimizerConfig::Sgd {
            lr: 1e-2,
            momentum: 0.9,
            weight_decay: 0.0,
        },
        val_fraction: 0.34,
        pos_weight_min: 1.0,
        pos_weight_max: 10.0,
        augment: AugmentConfig::paper(),
        input: ichcam::data::InputSpec::default(),
        stage2_pooling: ichcam::train::config::HeadPooling::Mean,
        unet: None,
    }
}

/// [`micro_config`] with a small stage 3: a U-Net of features 2, depth 2, on pseudo-masks
/// of the phantom-tuned refinement (every labelled slice of a phantom holds blood).
fn micro_unet_config() -> TrainConfig {
    let mut cfg = micro_config();
    cfg.epochs = 1;
    cfg.stage2_epochs = 1;
    let mut u = ichcam::train::config::UNetTrainConfig::cpu();
    u.features = 2;
    u.depth = 2;
    u.epochs = 2;
    u.batch = 4;
    // More slices than the phantoms' positives and negatives: positives drawn again.
    u.slices_per_epoch = 24;
    u.refine = ichcam::seg::RefineConfig {
        cam_threshold: 0.0,
        grow_cam_threshold: 0.0,
        k: 8,
        ..ichcam::seg::RefineConfig::default()
    };
    u.min_component_ml = Some(0.0);
    cfg.unet = Some(u);
    cfg
}

fn tensors(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect()
}

fn max_abs_diff(a: &[u8], b: &[u8]) -> f32 {
    assert_eq!(a.len(), b.len());
    let f = |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    a.chunks_exact(4)
        .zip(b.chunks_exact(4))
        .map(|(x, y)| (f(x) - f(y)).abs())
        .fold(0.0, f32::max)
}

fn opts(seed: u64) -> TrainOptions {
    TrainOptions {
        seed,
        ..TrainOptions::default()
    }
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    let cases = phantoms(6, 40, 10, 11);
    let cfg = micro_config();
    let dir = tempfile::tempdir().unwrap();

    let full = dir.path().join("full.safetensors");
    let r = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &full,
        &cfg,
        &opts(3),
    )
    .unwrap();
    assert!(r.finished && r.resumed_from.is_none());
    assert_eq!(r.log.epochs.len(), 3);
    assert_eq!((r.train_cases, r.val_cases), (4, 2));
    assert!(r
        .log
        .epochs
        .iter()
        .all(|e| e.train_loss.is_finite() && e.val_auc.is_some()));
    assert!(r.log_json.is_file() && r.plot_png.is_file() && r.last_checkpoint.is_file());
    let want = tensors(&full);
    assert!(want.contains_key("fc.weight") && want.contains_key("lstm.weight_ih_l0"));

    // Killed after epoch 1 of stage 1, and after the last stage-1 epoch (before stage 2).
    for stop in [1usize, 2] {
        let part = dir.path().join(format!("part{stop}.safetensors"));
        let o = TrainOptions {
            stop_after_epochs: Some(stop),
            ..opts(3)
        };
        let r1 = train(
            &Device::cpu(),
            TrainInput::Cases(cases.clone()),
            &part,
            &cfg,
            &o,
        )
        .unwrap();
        assert!(!r1.finished);
        assert_eq!(r1.log.epochs.len(), stop);
        let r2 = train(
            &Device::cpu(),
            TrainInput::Cases(cases.clone()),
            &part,
            &cfg,
            &opts(3),
        )
        .unwrap();
        assert_eq!(r2.resumed_from, Some((1, stop)));
        assert!(r2.finished);
        // The log continues where it stopped: epochs 1, 2 of stage 1 then 1 of stage 2.
        let ep: Vec<(u8, usize)> = r2.log.epochs.iter().map(|e| (e.stage, e.epoch)).collect();
        assert_eq!(ep, vec![(1, 1), (1, 2), (2, 1)]);
        for (a, b) in r.log.epochs.iter().zip(&r2.log.epochs) {
            let d = (a.train_loss - b.train_loss).abs();
            assert!(
                d <= 1e-6 * (1.0 + a.train_loss.abs()),
                "epoch {:?}: loss {} vs {}",
                (b.stage, b.epoch),
                a.train_loss,
                b.train_loss
            );
        }
        let got = tensors(&part);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (name, w) in &want {
            // Bitwise in practice; the tolerance covers a CPU reduction whose order depends
            // on thread scheduling.
            let d = max_abs_diff(&got[name], w);
            assert!(
                d <= 1e-6,
                "tensor {name} differs by {d} after resuming at epoch {stop}"
            );
        }
        // A finished run called again does nothing more.
        let r3 = train(
            &Device::cpu(),
            TrainInput::Cases(cases.clone()),
            &part,
            &cfg,
            &opts(3),
        )
        .unwrap();
        assert!(r3.finished && r3.log.epochs.len() == 3);
    }

    // Raising the epoch count continues a finished run rather than refusing it.
    let mut longer = cfg.clone();
    longer.stage2_epochs = 2;
    let r4 = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &full,
        &longer,
        &opts(3),
    )
    .unwrap();
    assert_eq!(r4.resumed_from, Some((2, 1)));
    assert_eq!(r4.log.epochs.len(), 4);
    // ...but stage 1 cannot be extended once stage 2 has fitted the fc to its backbone.
    longer.epochs = 3;
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &full,
        &longer,
        &opts(3),
    )
    .unwrap_err();
    assert!(e.to_string().contains("stage 1 cannot be extended"), "{e}");
}

#[test]
fn mismatched_config_or_seed_refuses_to_resume() {
    let cases = phantoms(4, 32, 8, 5);
    let mut cfg = micro_config();
    cfg.epochs = 1;
    cfg.stage2_epochs = 0;
    cfg.val_fraction = 0.25;
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.safetensors");
    train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &m,
        &cfg,
        &opts(1),
    )
    .unwrap();

    let mut other = cfg.clone();
    other.size = 48;
    other.epochs = 2;
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &m,
        &other,
        &opts(1),
    )
    .unwrap_err();
    assert!(matches!(e, TrainError::ResumeMismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("size") && msg.contains("--fresh") && msg.contains("m.last.safetensors"),
        "{msg}"
    );

    let mut more = cfg.clone();
    more.epochs = 2;
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &m,
        &more,
        &opts(2),
    )
    .unwrap_err();
    assert!(e.to_string().contains("seed"), "{e}");

    // Other cases than the interrupted run's.
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(phantoms(4, 32, 8, 6)[..3].to_vec()),
        &m,
        &more,
        &opts(1),
    )
    .unwrap_err();
    assert!(matches!(e, TrainError::ResumeMismatch { .. }), "{e}");

    // --fresh ignores the checkpoint.
    let fresh = TrainOptions {
        resume: false,
        ..opts(1)
    };
    let r = train(&Device::cpu(), TrainInput::Cases(cases), &m, &other, &fresh).unwrap();
    assert!(r.resumed_from.is_none() && r.finished && r.log.epochs.len() == 2);
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = micro_config();
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.safetensors");
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(Vec::new()),
        &m,
        &cfg,
        &opts(0),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no training cases"), "{e}");
    let mut c = phantoms(2, 32, 6, 1);
    c[0].labels.pop();
    let e = train(&Device::cpu(), TrainInput::Cases(c), &m, &cfg, &opts(0)).unwrap_err();
    assert!(e.to_string().contains("slice labels"), "{e}");
    let e = train(
        &Device::cpu(),
        TrainInput::Dir(&dir.path().join("nope")),
        &m,
        &cfg,
        &opts(0),
    )
    .unwrap_err();
    assert!(matches!(e, TrainError::Data(_)), "{e}");
    let mut bad = cfg.clone();
    bad.seq_stride = 0;
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(phantoms(2, 32, 6, 1)),
        &m,
        &bad,
        &opts(0),
    )
    .unwrap_err();
    assert!(matches!(e, TrainError::Config(_)), "{e}");
    // A garbage "checkpoint" beside the model is reported, not a panic.
    std::fs::write(dir.path().join("m.last.safetensors"), b"not a checkpoint").unwrap();
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(phantoms(2, 32, 6, 1)),
        &m,
        &cfg,
        &opts(0),
    )
    .unwrap_err();
    assert!(e.to_string().contains("m.last.safetensors"), "{e}");
    assert!(!m.exists());
}

fn env<T: std::str::FromStr>(k: &str) -> Option<T> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

/// `cargo test --release --test train_resume -- --ignored --nocapture tiny_preset`:
/// the tiny preset on synthetic phantoms, timed, with its validation AUC, then on fresh
/// held-out phantoms: the fc head's slice AUC and how often the CAM's peak falls on the
/// lesion (the pointing game, on positive slices; within 4 px).
#[test]
#[ignore]
fn tiny_preset_on_phantoms() {
    use ichcam::engine::cpu::CpuBackend;
    use ichcam::model::{CamKind, IchNet};
    use ichcam::train::prep::Prepared;
    let n: usize = env("ICHCAM_N").unwrap_or(20);
    let size: usize = env("ICHCAM_SIZE").unwrap_or(128);
    let t = std::time::Instant::now();
    let cases = phantoms(n, size, 24, 42);
    eprintln!(
        "{n} phantoms {size}px x 24 in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let mut cfg = TrainConfig::tiny();
    if let Some(e) = env("ICHCAM_EPOCHS") {
        cfg.epochs = e;
    }
    if let Some(e) = env("ICHCAM_EPOCHS2") {
        cfg.stage2_epochs = e;
    }
    if let Some(lr) = env("ICHCAM_LR") {
        cfg.optimizer = cfg.optimizer.with_lr(lr);
    }
    if let Some(lr) = env("ICHCAM_LR2") {
        cfg.stage2_optimizer = cfg.stage2_optimizer.with_lr(lr);
    }
    if let Some(w) = env("ICHCAM_WIDTH") {
        cfg.model.base_width = w;
    }
    if let Some(w) = env("ICHCAM_INPUT") {
        cfg.size = w;
    }
    if let Some(b) = env("ICHCAM_BATCH") {
        cfg.batch = b;
    }
    if let Some(b) = env::<usize>("ICHCAM_STAGES") {
        cfg.model.layers = vec![1; b];
    }
    if env::<u8>("ICHCAM_NOAUG") == Some(1) {
        cfg.augment = AugmentConfig::none();
    }
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("tiny.safetensors");
    if let Some(s) = env("ICHCAM_STRIDE") {
        cfg.seq_stride = s;
    }
    let o = TrainOptions {
        progress: true,
        ..opts(env("ICHCAM_SEED").unwrap_or(0))
    };
    let r = train(&Device::cpu(), TrainInput::Cases(cases), &m, &cfg, &o).unwrap();
    eprintln!(
        "tiny: {:.1}s, best AUC stage 1 {:?}, stage 2 {:?}",
        r.seconds, r.best_auc_stage1, r.best_auc_stage2
    );

    // Held-out phantoms (another seed).
    let sc = SynthConfig {
        size,
        slices: 24,
        clean: false,
    };
    let pos = plan_positive(8, 777);
    let mut net = IchNet::new(CpuBackend::<f32>::new(), cfg.model.clone(), 0).unwrap();
    ichcam::train::checkpoint::load_params(&mut net, &m).unwrap();
    let s = cfg.size;
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    let (mut hits, mut pos_slices, mut inside, mut outside) = (0usize, 0usize, 0f64, 0f64);
    let (mut cover, mut mask_area, mut cam_area, mut cam_hit) = (0f64, 0f64, 0f64, 0f64);
    for (i, &positive) in pos.iter().enumerate() {
        let p = phantom(&sc, 777, i, positive).unwrap();
        let lab: Vec<bool> = p.slice_labels().iter().map(|&l| l > 0).collect();
        let prep = Prepared::from_hu("t", "t", &p.hu, &lab, s, &cfg.input).unwrap();
        let out = net
            .stage2_infer(&prep.x, p.hu.dim().0, s, s, CamKind::Vanilla)
            .unwrap();
        scores.extend_from_slice(&out.logits);
        labels.extend_from_slice(&lab);
        let mask = ichcam::data::resize_mask_nearest(p.mask.view(), s, s);
        for (z, &l) in lab.iter().enumerate() {
            if !l {
                continue;
            }
            let cam = &out.cam_norm[z * s * s..(z + 1) * s * s];
            let mz = mask.index_axis(ndarray::Axis(0), z);
            let k = cam
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, _)| k)
                .unwrap();
            let (ky, kx) = ((k / s) as i64, (k % s) as i64);
            let near = (-4..=4i64).any(|dy| {
                (-4..=4i64).any(|dx| {
                    let (y, x) = (ky + dy, kx + dx);
                    y >= 0
                        && x >= 0
                        && (y as usize) < s
                        && (x as usize) < s
                        && mz[[y as usize, x as usize]] > 0
                })
            });
            hits += near as usize;
            pos_slices += 1;
            let (mut a, mut na, mut b, mut nb) = (0.0, 0, 0.0, 0);
            for (j, &c) in cam.iter().enumerate() {
                let m = mz[[j / s, j % s]] > 0;
                if m && c >= 0.7 {
                    cover += 1.0;
                }
                if c >= 0.7 {
                    cam_area += 1.0;
                    cam_hit += m as u8 as f64;
                }
                mask_area += m as u8 as f64;
                if m {
                    a += c;
                    na += 1;
                } else {
                    b += c;
                    nb += 1;
                }
            }
            inside += a / na.max(1) as f64;
            outside += b / nb.max(1) as f64;
        }
    }
    let auc = ichcam::train::auc::roc_auc(&scores, &labels).unwrap();
    eprintln!(
        "held-out: slice AUC {auc:.4}, CAM peak on lesion {hits}/{pos_slices}, mean CAM inside {:.3} outside {:.3}, \
         lesion covered by CAM>=0.7 {:.3}, CAM>=0.7 on lesion {:.3}",
        inside / pos_slices.max(1) as f64,
        outside / pos_slices.max(1) as f64,
        cover / mask_area.max(1.0),
        cam_hit / cam_area.max(1.0)
    );
    assert!(r.best_auc_stage2.unwrap_or(0.0) > 0.8);
}

#[test]
fn model_records_how_it_was_trained() {
    let cases = phantoms(6, 40, 10, 21);
    let n_pos: usize = cases
        .iter()
        .map(|c| c.labels.iter().filter(|&&l| l).count())
        .sum();
    let mut cfg = micro_config();
    cfg.epochs = 1;
    cfg.stage2_epochs = 1;
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.safetensors");
    let o = TrainOptions {
        data_name: Some("phantoms-x".into()),
        ..opts(5)
    };
    train(&Device::cpu(), TrainInput::Cases(cases), &m, &cfg, &o).unwrap();
    let meta = ichcam::train::checkpoint::read_metadata(&m).unwrap();
    let p: ichcam::model::Provenance =
        serde_json::from_str(&meta[ichcam::model::meta::META_PROVENANCE]).unwrap();
    assert_eq!(p.preset, cfg.name);
    assert_eq!(p.data.as_deref(), Some("phantoms-x"));
    assert_eq!(p.train_volumes + p.val_volumes, 6);
    assert_eq!(p.train_slices + p.val_slices, 60);
    assert_eq!(p.train_positive_slices + p.val_positive_slices, n_pos);
    // YYYY-MM-DDTHH:MM:SSZ
    assert_eq!(p.started.len(), 20);
    assert!(p.started.starts_with("20") && p.started.ends_with('Z'));
    assert!(meta.contains_key(ichcam::model::meta::META_INPUT));
}

#[test]
fn stage3_trains_saves_and_resumes_like_an_uninterrupted_run() {
    let cases = phantoms(6, 40, 10, 31);
    let cfg = micro_unet_config();
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.safetensors");
    let r = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &full,
        &cfg,
        &opts(4),
    )
    .unwrap();
    assert!(r.finished && r.unet_epochs == 2, "{r:?}");
    let ps = r.pseudo.unwrap();
    assert!(ps.positive > 0 && ps.negative > ps.positive, "{ps:?}");
    let ep: Vec<(u8, usize)> = r.log.epochs.iter().map(|e| (e.stage, e.epoch)).collect();
    assert_eq!(ep, vec![(1, 1), (2, 1), (3, 1), (3, 2)]);
    assert!(r.log.epochs[2..]
        .iter()
        .all(|e| e.train_loss.is_finite() && e.val_loss.is_some_and(|v| v.is_finite())));
    let want = tensors(&full);
    assert!(
        want.contains_key("unet.encoder1.enc1conv1.weight"),
        "{:?}",
        want.keys()
    );
    assert!(want.contains_key("fc.weight"));
    assert!(!want.keys().any(|k| k.starts_with("unet.opt.")));
    let meta = ichcam::train::checkpoint::read_metadata(&full).unwrap();
    assert!(meta.contains_key(ichcam::model::unet::checkpoint::CONFIG_KEY));
    assert!(meta.contains_key(ichcam::train::checkpoint::META_UNET_TRAIN));
    // The model file's U-Net loads (through the hostile-file checks) and segments.
    let u =
        ichcam::model::unet::checkpoint::load(ichcam::engine::cpu::CpuBackend::<f32>::new(), &full)
            .unwrap()
            .unwrap();
    assert_eq!(u.cfg().features, 2);

    // Killed after stage 3's first epoch (stop after 3 epochs: 1 + 1 + 1), then resumed.
    let part = dir.path().join("part.safetensors");
    let o = TrainOptions {
        stop_after_epochs: Some(3),
        ..opts(4)
    };
    let r1 = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &part,
        &cfg,
        &o,
    )
    .unwrap();
    assert!(!r1.finished && r1.unet_epochs == 1);
    let resume = tensors(&dir.path().join("part.last.safetensors"));
    assert!(resume.keys().any(|k| k.starts_with("unet.opt.")));
    let r2 = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &part,
        &cfg,
        &opts(4),
    )
    .unwrap();
    assert!(r2.finished && r2.unet_epochs == 2);
    for (a, b) in r.log.epochs.iter().zip(&r2.log.epochs) {
        let d = (a.train_loss - b.train_loss).abs();
        assert!(d <= 1e-5 * (1.0 + a.train_loss.abs()), "{a:?} vs {b:?}");
    }
    let got = tensors(&part);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in &want {
        let d = max_abs_diff(&got[name], w);
        assert!(
            d <= 1e-5,
            "tensor {name} differs by {d} after resuming in stage 3"
        );
    }

    // Once stage 3 has started, its config and stage 2 are fixed; more stage-3 epochs go on.
    let mut other = cfg.clone();
    other.unet.as_mut().unwrap().features = 4;
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &part,
        &other,
        &opts(4),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("U-Net config") && e.to_string().contains("features"),
        "{e}"
    );
    let mut none = cfg.clone();
    none.unet = None;
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &part,
        &none,
        &opts(4),
    )
    .unwrap_err();
    assert!(e.to_string().contains("stage 3"), "{e}");
    let mut longer = cfg.clone();
    longer.unet.as_mut().unwrap().epochs = 3;
    let r3 = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &part,
        &longer,
        &opts(4),
    )
    .unwrap();
    assert_eq!(r3.unet_epochs, 3);
    assert_eq!(r3.log.epochs.len(), 5);

    // A two-stage run goes on to stage 3 when the config gains one.
    let two = dir.path().join("two.safetensors");
    let mut c2 = cfg.clone();
    c2.unet = None;
    let r = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &two,
        &c2,
        &opts(4),
    )
    .unwrap();
    assert!(r.finished && r.unet_epochs == 0);
    assert!(!tensors(&two).keys().any(|k| k.starts_with("unet.")));
    // Stage 3 alone on that finished two-stage model file (no resume checkpoint): the
    // stages 1-2 tensors are the file's, bit for bit, and the U-Net is added.
    let three = dir.path().join("three.safetensors");
    let from = |seed: u64| TrainOptions {
        stage3_from: Some(two.clone()),
        ..opts(seed)
    };
    let r = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &three,
        &cfg,
        &from(4),
    )
    .unwrap();
    assert!(r.finished && r.unet_epochs == 2, "{r:?}");
    let stages: Vec<u8> = r.log.epochs.iter().map(|e| e.stage).collect();
    assert_eq!(stages, [3, 3]);
    let (a, b) = (tensors(&two), tensors(&three));
    for (name, w) in &a {
        assert_eq!(&b[name], w, "{name} changed by --stage3-from");
    }
    assert!(b.keys().any(|k| k.starts_with("unet.")));
    // ... but not from a model of another config or seed, nor without stage 3.
    let other = dir.path().join("other.safetensors");
    let mut c3 = cfg.clone();
    c3.model.base_width = 6;
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &other,
        &c3,
        &from(4),
    )
    .unwrap_err();
    assert!(e.to_string().contains("another config"), "{e}");
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &other,
        &cfg,
        &from(5),
    )
    .unwrap_err();
    assert!(e.to_string().contains("seed"), "{e}");
    let e = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &other,
        &c2,
        &from(4),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no stage 3"), "{e}");

    let r = train(
        &Device::cpu(),
        TrainInput::Cases(cases),
        &two,
        &cfg,
        &opts(4),
    )
    .unwrap();
    assert!(r.finished && r.unet_epochs == 2);
    assert!(tensors(&two).keys().any(|k| k.starts_with("unet.")));
}

#[test]
fn stage3_without_any_pseudo_mask_is_skipped_and_the_run_finishes() {
    let cases = phantoms(4, 40, 8, 41);
    let mut cfg = micro_unet_config();
    // No cluster can be blood: no slice gets a pseudo-mask.
    cfg.unet.as_mut().unwrap().refine.min_blood_hu = 5000.0;
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.safetensors");
    let r = train(
        &Device::cpu(),
        TrainInput::Cases(cases.clone()),
        &m,
        &cfg,
        &opts(4),
    )
    .unwrap();
    assert!(r.finished && r.unet_skipped && r.unet_epochs == 0, "{r:?}");
    assert_eq!(r.pseudo.unwrap().positive, 0);
    assert!(!tensors(&m).keys().any(|k| k.starts_with("unet.")));
    // Run again: nothing left to do, no error.
    let r = train(&Device::cpu(), TrainInput::Cases(cases), &m, &cfg, &opts(4)).unwrap();
    assert!(r.finished && r.unet_skipped);
}

#[test]
fn stage3_pseudo_masks_read_images_only() {
    // A dataset case whose mask file is gone: re-reading its native volume for the
    // pseudo-masks must not touch the mask.
    let dir = tempfile::tempdir().unwrap();
    let sc = SynthConfig {
        size: 32,
        slices: 4,
        clean: false,
    };
    ichcam::data::synth::write_dataset(dir.path(), 2, 1, &sc).unwrap();
    let mut ds = ichcam::data::Dataset::open(dir.path()).unwrap();
    let want = ichcam::io::read_volume(&ds.cases[1].image).unwrap();
    for c in &mut ds.cases {
        let m = c.mask.clone().unwrap();
        std::fs::remove_file(&m).unwrap();
    }
    let native = ichcam::train::prep::Native::Dataset {
        dataset: ichcam::train::prep::DatasetRef::Borrowed(&ds),
        indices: vec![1, 0],
    };
    let (hu, spacing) = native.volume(0).unwrap();
    assert_eq!(hu, want.data);
    assert_eq!(spacing, want.spacing);
    assert!(native.volume(2).is_err());
}
