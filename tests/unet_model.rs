//! The stage-3 U-Net end to end on the CPU reference: central finite differences in f64 on
//! whole small networks (depth 2 and the authors' depth 4, Dice and Dice + BCE) for a
//! sample of entries of every trainable tensor; batch-norm modes; training with Adam
//! lowers the loss; the shape rule and bad input as errors; buffers reused across shapes;
//! the model file round trip under `unet.`.

use ichcam::engine::cpu::CpuBackend;
use ichcam::model::checkpoint::{self, SaveOptions};
use ichcam::model::unet::{self, UNet, UNetConfig};
use ichcam::model::{IchNet, ModelConfig, ModelError, OptimizerConfig};
use ichcam::rng::Rng;

type B64 = CpuBackend<f64>;

fn cfg(in_channels: usize, features: usize, depth: usize, bce_weight: f64) -> UNetConfig {
    UNetConfig {
        in_channels,
        out_channels: 1,
        features,
        depth,
        bn_eps: 1e-5,
        bn_momentum: 0.1,
        dice_eps: 1e-7,
        bce_weight,
    }
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.normal()).collect()
}

fn mask(rng: &mut Rng, n: usize, p: f64) -> Vec<f64> {
    (0..n).map(|_| (rng.f64() < p) as u8 as f64).collect()
}

/// Non-trivial batch-norm affine parameters (as the PyTorch fixtures use).
fn perturb(net: &mut UNet<B64>, rng: &mut Rng) {
    for s in net.weight_specs() {
        if s.name.contains("norm") {
            let n: usize = s.shape.iter().product();
            let (lo, hi) = if s.name.ends_with("weight") {
                (0.5, 1.5)
            } else {
                (-0.5, 0.5)
            };
            let v: Vec<f64> = (0..n).map(|_| rng.range(lo, hi)).collect();
            net.set_param(&s.name, &v).unwrap();
        }
    }
}

/// Central differences against the analytic gradient for up to `per_tensor` entries of
/// every trainable tensor. A ReLU kink within the step (a deep net of ReLUs has some) makes
/// the central difference wrong by about half the gap between the two one-sided
/// differences: an entry that misses the tolerance but by no more than that gap proves
/// nothing either way and is counted as skipped. Returns (checked, skipped).
#[allow(clippy::too_many_arguments)]
fn fd_check(
    net: &mut UNet<B64>,
    x: &[f64],
    t: &[f64],
    n: usize,
    h: usize,
    w: usize,
    per_tensor: usize,
    rng: &mut Rng,
) -> (usize, usize) {
    let loss = |net: &mut UNet<B64>| net.forward_backward(x, t, n, h, w).unwrap().loss;
    let l0 = loss(net);
    let specs = net.weight_specs();
    let analytic: Vec<Vec<f64>> = specs.iter().map(|s| net.grad(&s.name).unwrap()).collect();
    let eps = 1e-5;
    let (mut checked, mut skipped) = (0, 0);
    let mut worst = 0.0f64;
    for (s, ana) in specs.iter().zip(&analytic) {
        let base = net.param(&s.name).unwrap();
        assert!(
            ana.iter().any(|g| *g != 0.0),
            "{}: all-zero gradient",
            s.name
        );
        let picks: Vec<usize> = if base.len() <= per_tensor {
            (0..base.len()).collect()
        } else {
            (0..per_tensor)
                .map(|_| (rng.next_u64() % base.len() as u64) as usize)
                .collect()
        };
        for i in picks {
            let mut p = base.clone();
            p[i] = base[i] + eps;
            net.set_param(&s.name, &p).unwrap();
            let lp = loss(net);
            p[i] = base[i] - eps;
            net.set_param(&s.name, &p).unwrap();
            let lm = loss(net);
            net.set_param(&s.name, &base).unwrap();
            let num = (lp - lm) / (2.0 * eps);
            let err = (num - ana[i]).abs();
            let scale = num.abs().max(ana[i].abs());
            let gap = ((lp - l0) / eps - (l0 - lm) / eps).abs();
            if err > 1e-8 + 1e-5 * scale && err <= 0.75 * gap {
                skipped += 1;
                continue;
            }
            worst = worst.max(err / scale.max(1e-3));
            assert!(
                err <= 1e-8 + 1e-5 * scale,
                "{}[{i}]: numeric {num:.10e} analytic {:.10e}",
                s.name,
                ana[i]
            );
            checked += 1;
        }
    }
    println!(
        "{checked} entries checked, {skipped} on a kink skipped, worst relative error {worst:.2e}"
    );
    (checked, skipped)
}

fn whole_net(c: UNetConfig, n: usize, h: usize, w: usize, seed: u64) {
    let mut net = UNet::new(B64::new(), c.clone(), seed).unwrap();
    let mut rng = Rng::new(seed + 100);
    perturb(&mut net, &mut rng);
    let x = randn(&mut rng, n * c.in_channels * h * w);
    let t = mask(&mut rng, n * h * w, 0.3);
    let (checked, skipped) = fd_check(&mut net, &x, &t, n, h, w, 3, &mut rng);
    assert!(
        checked >= net.weight_specs().len() && skipped * 5 <= checked,
        "{checked} entries checked, {skipped} skipped"
    );
}

#[test]
fn depth2_dice_gradients_match_finite_differences() {
    whole_net(cfg(1, 2, 2, 0.0), 2, 8, 12, 1);
}

#[test]
fn depth2_dice_bce_three_channels_gradients_match_finite_differences() {
    whole_net(cfg(3, 2, 2, 0.7), 1, 12, 8, 2);
}

#[test]
fn depth4_gradients_match_finite_differences() {
    // The authors' depth: 2 images of 32x48 give 2x3 bottlenecks.
    whole_net(cfg(1, 2, 4, 0.0), 2, 32, 48, 3);
}

#[test]
fn train_mode_updates_running_stats_and_eval_mode_does_not() {
    let c = cfg(1, 2, 2, 0.0);
    let mut net = UNet::new(B64::new(), c, 5).unwrap();
    let mut rng = Rng::new(6);
    let (n, h, w) = (2, 8, 8);
    let x = randn(&mut rng, n * h * w);
    let t = mask(&mut rng, n * h * w, 0.3);
    let stat = "bottleneck.bottlenecknorm2.running_var";
    let before = net.param(stat).unwrap();
    let p_eval = net.predict(&x, n, h, w).unwrap();
    assert_eq!(
        net.param(stat).unwrap(),
        before,
        "eval mode touched the running stats"
    );
    net.forward_backward(&x, &t, n, h, w).unwrap();
    let out_train = net.output().unwrap();
    assert_ne!(
        net.param(stat).unwrap(),
        before,
        "train mode left the running stats"
    );
    // Eval and training outputs differ (running vs batch statistics), both are probabilities.
    assert_ne!(p_eval, out_train);
    for v in p_eval.iter().chain(&out_train) {
        assert!((0.0..=1.0).contains(v));
    }
    // A running statistic has no gradient; an unknown name is an error.
    assert!(matches!(net.grad(stat), Err(ModelError::NoGradient { .. })));
    assert!(matches!(
        net.param("encoder9.x"),
        Err(ModelError::UnknownParam(_))
    ));
}

#[test]
fn adam_training_lowers_the_loss() {
    // Segment the bright pixels: a task the net can learn in a few dozen steps.
    let c = cfg(1, 4, 2, 0.0);
    let mut net = UNet::new(CpuBackend::<f32>::new(), c, 7).unwrap();
    let mut rng = Rng::new(8);
    let (n, h, w) = (4, 16, 16);
    let x: Vec<f32> = (0..n * h * w).map(|_| rng.normal() as f32).collect();
    let t: Vec<f32> = x.iter().map(|v| (*v > 0.5) as u8 as f32).collect();
    let opt = OptimizerConfig::adam(1e-2);
    let first = net.forward_backward(&x, &t, n, h, w).unwrap().loss;
    net.step(&opt).unwrap();
    let mut last = first;
    for _ in 0..40 {
        last = net.forward_backward(&x, &t, n, h, w).unwrap().loss;
        net.step(&opt).unwrap();
    }
    assert_eq!(net.steps(), 41);
    println!("Dice loss {first:.4} -> {last:.4}");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let p = net.predict(&x, n, h, w).unwrap();
    let (mut inter, mut sum) = (0.0, 0.0);
    for (pv, tv) in p.iter().zip(&t) {
        let b = (*pv > 0.5) as u8 as f32;
        inter += b * tv;
        sum += b + tv;
    }
    let dice = 2.0 * inter / sum;
    assert!(dice > 0.7, "eval-mode Dice {dice}");
}

#[test]
fn sizes_and_bad_input_are_clear_errors() {
    let mut net = UNet::new(
        B64::new(),
        UNetConfig {
            features: 2,
            ..UNetConfig::authors(1)
        },
        9,
    )
    .unwrap();
    let e = net
        .predict(&vec![0.0; 40 * 16], 1, 40, 16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("divisible by 16") && e.contains("40x16"), "{e}");
    assert!(net.predict(&[0.0; 10], 1, 16, 16).is_err());
    assert!(net.predict(&[], 0, 16, 16).is_err());
    // Training on one 16x16 image leaves one value per channel at the bottleneck.
    let e = net
        .forward_backward(&vec![0.0; 256], &vec![0.0; 256], 1, 16, 16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than one value per channel"), "{e}");
    let x = vec![0.1; 2 * 256];
    assert!(net
        .forward_backward(&x, &vec![0.0; 255], 2, 16, 16)
        .is_err());
    let mut t = vec![0.0; 2 * 256];
    t[3] = 1.5;
    assert!(net.forward_backward(&x, &t, 2, 16, 16).is_err());
    t[3] = f64::NAN;
    assert!(net.forward_backward(&x, &t, 2, 16, 16).is_err());
    assert!(matches!(
        net.step(&OptimizerConfig::adam(1e-3)),
        Err(ModelError::Input(_))
    ));
    assert!(net.set_param("seg.bias", &[1.0, 2.0]).is_err());
    // Prediction at 48x80 (odd multiples of 16) works.
    let p = net.predict(&vec![0.3; 48 * 80], 1, 48, 80).unwrap();
    assert_eq!(p.len(), 48 * 80);
}

#[test]
fn shape_changes_reallocate_and_give_the_same_answers() {
    let c = cfg(2, 2, 2, 0.0);
    let mut a = UNet::new(B64::new(), c.clone(), 10).unwrap();
    let mut b = UNet::new(B64::new(), c, 10).unwrap();
    let mut rng = Rng::new(11);
    let x1 = randn(&mut rng, 2 * 16 * 8);
    let x2 = randn(&mut rng, 3 * 2 * 8 * 12);
    let p1 = a.predict(&x1, 1, 16, 8).unwrap();
    let _ = a.predict(&x2, 3, 8, 12).unwrap();
    let p1_again = a.predict(&x1, 1, 16, 8).unwrap();
    assert_eq!(p1, p1_again);
    assert_eq!(p1, b.predict(&x1, 1, 16, 8).unwrap());
}

#[test]
fn model_file_round_trip_under_the_unet_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let ich = IchNet::new(CpuBackend::<f32>::new(), ModelConfig::tiny(), 1).unwrap();
    let c = cfg(3, 2, 2, 0.5);
    let mut un = UNet::new(CpuBackend::<f32>::new(), c.clone(), 12).unwrap();
    let mut rng = Rng::new(13);
    let x: Vec<f32> = (0..2 * 3 * 16 * 16).map(|_| rng.normal() as f32).collect();
    let t: Vec<f32> = (0..2 * 16 * 16)
        .map(|i| (i % 7 == 0) as u8 as f32)
        .collect();
    un.forward_backward(&x, &t, 2, 16, 16).unwrap();
    un.step(&OptimizerConfig::adam(1e-2)).unwrap();
    let want = un.predict(&x, 2, 16, 16).unwrap();

    // No U-Net in a plain model file.
    checkpoint::save(&ich, &path, &SaveOptions::default()).unwrap();
    assert!(unet::checkpoint::load(CpuBackend::<f32>::new(), &path)
        .unwrap()
        .is_none());

    let sec = unet::checkpoint::section(&un).unwrap();
    assert!(sec
        .tensors
        .iter()
        .any(|(n, _, _)| n == "unet.encoder1.enc1conv1.weight"));
    assert!(sec
        .tensors
        .iter()
        .any(|(n, _, _)| n == "unet.decoder1.dec1norm2.running_var"));
    checkpoint::save_with(&ich, &[sec], &path, &SaveOptions::default()).unwrap();
    // The ResNet-LSTM still loads from the file (its loader leaves `unet.*` alone)...
    let (ich2, loaded) = checkpoint::load(CpuBackend::<f32>::new(), &path).unwrap();
    assert_eq!(
        ich2.param("fc.weight").unwrap(),
        ich.param("fc.weight").unwrap()
    );
    assert!(loaded.metadata.contains_key(unet::checkpoint::CONFIG_KEY));
    // ... and the U-Net comes back with its config, weights and running stats.
    let mut un2 = unet::checkpoint::load(CpuBackend::<f32>::new(), &path)
        .unwrap()
        .unwrap();
    assert_eq!(un2.cfg(), &c);
    for name in un.names() {
        assert_eq!(
            un2.param(&name).unwrap(),
            un.param(&name).unwrap(),
            "{name}"
        );
    }
    assert_eq!(un2.predict(&x, 2, 16, 16).unwrap(), want);

    // A U-Net of another width does not fit the file's tensors: every mismatch is named.
    let (mut tensors, _) = checkpoint::read_tensors(&path).unwrap();
    let wide = UNetConfig {
        features: 3,
        ..c.clone()
    };
    let mut other = UNet::new(CpuBackend::<f32>::new(), wide, 0).unwrap();
    let e = unet::checkpoint::assign(&mut other, &tensors, unet::checkpoint::PREFIX, &path)
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("shape mismatch: encoder1.enc1conv1.weight"),
        "{msg}"
    );
    // A missing tensor and an unknown one are both reported.
    tensors.remove("unet.seg.bias");
    let extra = tensors["unet.seg.weight"].clone();
    tensors.insert("unet.seg2.weight".into(), extra);
    let e = unet::checkpoint::assign(&mut un2, &tensors, unet::checkpoint::PREFIX, &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing: seg.bias") && e.contains("unexpected: seg2.weight"),
        "{e}"
    );
}
