//! Finite differences in f64 on whole tiny networks, end to end: the stage-1 net (ResNet ->
//! GAP -> LSTM -> head, BN in training mode, BCE with pos_weight) for a sample of entries of
//! every trainable tensor, and stage 2's fc gradients with the backbone frozen.

use ichcam::engine::cpu::CpuBackend;
use ichcam::model::{BlockKind, Group, IchNet, ModelConfig, ParamKind};
use ichcam::rng::Rng;

fn cfg(block: BlockKind, layers: Vec<usize>, base: usize, lstm_layers: usize) -> ModelConfig {
    ModelConfig {
        block,
        layers,
        base_width: base,
        lstm_hidden: 3,
        lstm_layers,
        head: vec![6, 4],
        bn_eps: 1e-5,
        bn_momentum: 0.1,
        in_channels: 3,
    }
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.normal()).collect()
}

/// Non-zero, non-trivial BN affine parameters and biases (as the PyTorch fixtures do), so
/// no gradient is checked only at its initial zero/one values.
fn perturb_params(net: &mut IchNet<CpuBackend<f64>>, rng: &mut Rng) {
    for name in net.names() {
        let p = net.params().get(&name).unwrap();
        if p.kind == ParamKind::Trainable && p.shape.len() == 1 {
            let n = p.numel();
            let v: Vec<f64> = (0..n).map(|_| rng.range(-0.5, 1.5)).collect();
            net.set_param(&name, &v).unwrap();
        }
    }
}

/// Central differences against the analytic gradient for up to `per_tensor` entries of every
/// trainable tensor of `groups`; `loss` runs a full forward (+ backward) and returns the loss.
fn check<F>(
    net: &mut IchNet<CpuBackend<f64>>,
    loss: F,
    in_group: impl Fn(Group) -> bool,
    per_tensor: usize,
    rng: &mut Rng,
) -> usize
where
    F: Fn(&mut IchNet<CpuBackend<f64>>) -> f64,
{
    loss(net);
    let names: Vec<String> = net
        .names()
        .into_iter()
        .filter(|n| {
            let p = net.params().get(n).unwrap();
            p.kind == ParamKind::Trainable && in_group(p.group)
        })
        .collect();
    let analytic: Vec<Vec<f64>> = names.iter().map(|n| net.grad(n).unwrap()).collect();
    let eps = 1e-5;
    let mut checked = 0;
    for (name, ana) in names.iter().zip(&analytic) {
        let base = net.param(name).unwrap();
        assert!(ana.iter().any(|g| *g != 0.0), "{name}: all-zero gradient");
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
            net.set_param(name, &p).unwrap();
            let lp = loss(net);
            p[i] = base[i] - eps;
            net.set_param(name, &p).unwrap();
            let lm = loss(net);
            net.set_param(name, &base).unwrap();
            let num = (lp - lm) / (2.0 * eps);
            let err = (num - ana[i]).abs();
            let scale = num.abs().max(ana[i].abs());
            assert!(
                err <= 1e-8 + 1e-5 * scale,
                "{name}[{i}]: numeric {num:.10e} analytic {:.10e}",
                ana[i]
            );
            checked += 1;
        }
    }
    checked
}

fn stage1(block: BlockKind, layers: Vec<usize>, base: usize, lstm_layers: usize, seed: u64) {
    let (b, s, h, w) = (1, 2, 16, 16);
    let mut net = IchNet::new(
        CpuBackend::<f64>::new(),
        cfg(block, layers, base, lstm_layers),
        seed,
    )
    .unwrap();
    let mut rng = Rng::new(seed + 100);
    perturb_params(&mut net, &mut rng);
    let x = randn(&mut rng, b * s * 3 * h * w);
    let labels = vec![1.0, 0.0];
    let f = |n: &mut IchNet<CpuBackend<f64>>| {
        n.stage1_forward_backward(&x, &labels, b, s, h, w, 1.7)
            .unwrap()
            .loss
    };
    let checked = check(&mut net, f, |g| g != Group::Fc, 4, &mut rng);
    let tensors = net
        .names()
        .iter()
        .filter(|n| !n.contains("running") && !n.starts_with("fc."))
        .count();
    assert!(
        checked >= tensors,
        "{checked} entries over {tensors} tensors"
    );
}

#[test]
fn stage1_basic_whole_net() {
    stage1(BlockKind::Basic, vec![1, 1], 4, 1, 1);
}

#[test]
fn stage1_basic_four_stages_two_lstm_layers() {
    stage1(BlockKind::Basic, vec![1, 1, 1, 1], 2, 2, 2);
}

#[test]
fn stage1_bottleneck_whole_net() {
    stage1(BlockKind::Bottleneck, vec![2, 1], 2, 1, 3);
}

#[test]
fn stage2_fc_only() {
    let (n, h, w) = (3, 16, 16);
    let mut net = IchNet::new(
        CpuBackend::<f64>::new(),
        cfg(BlockKind::Basic, vec![1, 1], 4, 1),
        4,
    )
    .unwrap();
    let mut rng = Rng::new(7);
    perturb_params(&mut net, &mut rng);
    // Non-trivial running stats, as after some stage-1 training.
    let x1 = randn(&mut rng, 2 * 3 * h * w);
    net.stage1_forward_backward(&x1, &[1.0, 0.0], 1, 2, h, w, 1.0)
        .unwrap();
    net.zero_grads().unwrap();
    let stats_before: Vec<Vec<f64>> = net
        .names()
        .iter()
        .filter(|n| n.contains("running"))
        .map(|n| net.param(n).unwrap())
        .collect();

    let x = randn(&mut rng, n * 3 * h * w);
    let labels = vec![1.0, 0.0, 1.0];
    let f = |m: &mut IchNet<CpuBackend<f64>>| {
        m.stage2_forward_backward(&x, &labels, n, h, w, 2.5)
            .unwrap()
    };
    let checked = check(&mut net, f, |g| g == Group::Fc, 1000, &mut rng);
    assert_eq!(checked, net.feature_channels() + 1);

    // The backbone is frozen: no gradient, running stats untouched (eval-mode BN).
    for name in net.names() {
        let p = net.params().get(&name).unwrap();
        if p.kind == ParamKind::Trainable && p.group != Group::Fc {
            assert!(
                net.grad(&name).unwrap().iter().all(|g| *g == 0.0),
                "{name} got a gradient in stage 2"
            );
        }
    }
    let stats_after: Vec<Vec<f64>> = net
        .names()
        .iter()
        .filter(|n| n.contains("running"))
        .map(|n| net.param(n).unwrap())
        .collect();
    assert_eq!(stats_before, stats_after);
}
