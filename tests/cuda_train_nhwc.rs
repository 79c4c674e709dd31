//! The channels-last training backbone on CUDA (issue 14):
//!
//! - `CudaBackend::set_train_layout` (`LayoutChoice`): `nhwc` makes the training backbone
//!   channels-last, `nchw` keeps it NCHW, `auto` is channels-last at tf32 / bf16 (where the
//!   native channels-last kernels run) and NCHW at f32 or without the mma kernels, apart from
//!   the eval layout;
//! - the native channels-last batch-norm backward (`bn_bwd_partial_nhwc`, then the NCHW
//!   finalize and elementwise passes on NHWC elements) against the CPU reference (NCHW,
//!   transposed) within 1e-5 (relative), with and without the fused ReLU, on one channel,
//!   two channel tiles (300 channels) and several pixel chunks; against the CUDA NCHW
//!   kernel within 1e-6 (its f64 sums run in another order: the bits may differ);
//! - `conv2d_bn_train_fwd_nhwc` (at f32 the NCHW convolution with its statistics epilogue
//!   between layout changes, at tf32 / bf16 the native channels-last one, then
//!   `norm::batchnorm_train_from_partials` channels-last: the partials' combine, the normalisation
//!   pass on NHWC z): at f32 the CUDA NCHW op transposed bit for bit (z, y, running
//!   statistics, saved mean and invstd), with and without residual and ReLU, and within
//!   1e-5 / 1e-3 / 1e-2 of the CPU reference at f32 / tf32 / bf16;
//! - a whole stage-1 training step (three, with Adam) of a model with `set_train_layout(Nhwc)`
//!   (and f32 training storage: the layout's own effect) against the NCHW model: at f32 the loss, logits, every gradient and parameter within
//!   1e-5 (relative; bit-identical but for the batch norm backward's f64 sums in another
//!   order: the test prints how many tensors are bit-identical), at tf32 and bf16 (the
//!   native channels-last kernels) a step's gradients together within 1e-3 and 1e-2, or
//!   within the precision's own deviation (the NCHW step at f32 from the same state) on the
//!   ill-conditioned seeds (about 1 in 10: a ReLU decision flipped by a one-ulp difference,
//!   magnified by a nearly constant channel's batch norm; the NCHW step at tf32 is then up to
//!   0.14 from f32's), each tensor within 0.5 or 4x that, each step from the same state (the NCHW net's parameters and optimizer
//!   state copied over: the tolerance is one step's);
//! - the channels-last training step captured as a CUDA graph (at f32: layout changes around
//!   the NCHW kernels; at bf16: the native channels-last kernels, the activations in bf16
//!   storage, the default there) replays bit for bit the eager
//!   channels-last step (nothing allocated once warm: its layout copies and temporaries
//!   from the arena);
//! - `ichcam bench --what train-step --layout nhwc` trains channels-last and its JSON line
//!   says `"layout": "nhwc"`; `auto` at f32 says `nchw`.
//!
//! One test at a time (a capture marks the shared stream and arena as capturing). Runs on a
//! GPU or on the emulated driver (`scripts/cuda-emu.sh`); without either the device tests
//! are reported as ignored (tests/common/cuda.rs), and with `ICHCAM_REQUIRE_GPU=1` a missing
//! device fails them.

mod common;
use common::cuda::{device, gpu_at, rel_err};
use common::nhwc::{bn_of, to_nhwc};
use common::rng::SplitMix64;
use common::shapes::conv;

use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::backend::{LayoutChoice, StorageChoice};
use ichcam::engine::cuda::{CudaBackend, MmaRoute};
use ichcam::engine::{ActStorage, Backend, BatchNorm2d, Conv2d, Precision};
use ichcam::model::{IchNet, ModelConfig, OptimizerConfig, ParamGroup};

fn main() {
    common::cuda::main_with_threads(
        vec![
            device("train_layout_setting", train_layout_setting),
            device("bn_bwd_nhwc_matches_cpu", bn_bwd_nhwc_matches_cpu),
            device("train_fwd_nhwc_matches_nchw", train_fwd_nhwc_matches_nchw),
            device("train_step_nhwc_matches_nchw_f32", || {
                train_step_nhwc_matches_nchw(Precision::F32, 1e-5)
            }),
            device("train_step_nhwc_matches_nchw_tf32", || {
                train_step_nhwc_matches_nchw(Precision::Tf32, 1e-3)
            }),
            device("train_step_nhwc_matches_nchw_bf16", || {
                train_step_nhwc_matches_nchw(Precision::Bf16, 1e-2)
            }),
            device("nhwc_train_step_graph_replays_bit_identically_f32", || {
                nhwc_train_step_graph_replays(Precision::F32)
            }),
            device("nhwc_train_step_graph_replays_bit_identically_bf16", || {
                nhwc_train_step_graph_replays(Precision::Bf16)
            }),
            device(
                "bench_train_step_names_its_layout",
                bench_train_step_names_its_layout,
            ),
        ],
        1,
    )
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn train_at(p: Precision, l: LayoutChoice) -> CudaBackend {
    let mut be = gpu_at(p);
    be.set_train_layout(l);
    be
}

fn train_layout_setting() {
    for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
        let g = gpu_at(p);
        assert_eq!(g.train_layout(), LayoutChoice::Auto);
        assert_eq!(
            g.channels_last_train(),
            p != Precision::F32,
            "auto trains channels-last at tf32 / bf16 (the native kernels), NCHW at f32: {p}"
        );
        let mut never = gpu_at(p);
        never.set_mma_route(MmaRoute::Never);
        assert!(
            !never.channels_last_train(),
            "auto trains NCHW without the mma kernels: {p}"
        );
        assert!(!train_at(p, LayoutChoice::Nchw).channels_last_train());
        let n = train_at(p, LayoutChoice::Nhwc);
        assert!(n.channels_last_train(), "{p}");
        assert!(n.clone().channels_last_train(), "a clone keeps the setting");
        // The eval layout is a setting of its own.
        assert_eq!(n.eval_layout(), LayoutChoice::Auto);
        let mut e = gpu_at(p);
        e.set_eval_layout(LayoutChoice::Nhwc);
        assert_eq!(
            e.train_layout(),
            LayoutChoice::Auto,
            "the eval layout set the training one"
        );
        e.set_train_layout(LayoutChoice::Nchw);
        e.set_eval_layout(LayoutChoice::Nhwc);
        assert!(
            !e.channels_last_train(),
            "the eval layout set the training one"
        );
    }
}

fn bn_bwd_nhwc_matches_cpu() {
    let g = gpu_at(Precision::F32);
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("cuda-nhwc-bn-bwd");
    // (n, c, hw): one channel, 300 channels (two tiles of the NHWC reduction), 3 channels
    // over 8200 pixels (several pixel chunks), a ResNet width, one pixel per image.
    for (n, c, hw) in [
        (2usize, 1usize, 37usize),
        (2, 300, 9),
        (2, 3, 4100),
        (3, 64, 35),
        (2, 5, 2),
    ] {
        let s = BatchNorm2d {
            n,
            c,
            hw,
            eps: 1e-5,
            momentum: 0.1,
        };
        let x = rng.vec_f32(s.len(), -2.0, 2.0);
        let y: Vec<f32> = rng
            .vec_f32(s.len(), -1.0, 1.0)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect();
        let dy = rng.vec_f32(s.len(), -1.0, 1.0);
        let gamma = rng.vec_f32(c, 0.5, 1.5);
        // The saved statistics of x (so dx is a real backward, not a cancellation test).
        let mut mean = vec![0.0f32; c];
        let mut invstd = vec![0.0f32; c];
        for ch in 0..c {
            let v: Vec<f64> = (0..n)
                .flat_map(|i| (0..hw).map(move |p| (i, p)))
                .map(|(i, p)| x[(i * c + ch) * hw + p] as f64)
                .collect();
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / v.len() as f64;
            mean[ch] = m as f32;
            invstd[ch] = (1.0 / (var + 1e-5).sqrt()) as f32;
        }
        let t = |v: &[f32]| to_nhwc(v, n, c, hw);
        for relu in [false, true] {
            // CPU reference, NCHW.
            let up = |v: &[f32]| cpu.upload(v).expect("up");
            let (mut dx, mut dg, mut db) = (
                up(&vec![0.0; s.len()]),
                up(&vec![0.0; c]),
                up(&vec![0.0; c]),
            );
            cpu.batchnorm_bwd(
                &s,
                &up(&x),
                &up(&y),
                &up(&dy),
                &up(&gamma),
                &up(&mean),
                &up(&invstd),
                &mut dx,
                &mut dg,
                &mut db,
                relu,
            )
            .expect("cpu");
            // CUDA, NCHW and NHWC.
            let gu = |v: &[f32]| g.upload(v).expect("up");
            let run = |nhwc: bool| {
                let mut dx = gu(&vec![f32::NAN; s.len()]);
                let mut dg = gu(&vec![f32::NAN; c]);
                let mut db = gu(&vec![f32::NAN; c]);
                let (xx, yy, dd) = if nhwc {
                    (gu(&t(&x)), gu(&t(&y)), gu(&t(&dy)))
                } else {
                    (gu(&x), gu(&y), gu(&dy))
                };
                let op = if nhwc {
                    CudaBackend::batchnorm_bwd_nhwc
                } else {
                    CudaBackend::batchnorm_bwd
                };
                op(
                    &g,
                    &s,
                    &xx,
                    &yy,
                    &dd,
                    &gu(&gamma),
                    &gu(&mean),
                    &gu(&invstd),
                    &mut dx,
                    &mut dg,
                    &mut db,
                    relu,
                )
                .expect("cuda batchnorm_bwd");
                [dx, dg, db].map(|b| g.download(&b).expect("download"))
            };
            let [gdx, gdg, gdb] = run(true);
            let [ndx, ndg, ndb] = run(false);
            let what = format!("{s:?} relu {relu}");
            let want_dx = t(&dx);
            for (name, got, want, tol) in [
                ("dx vs cpu", &gdx, &want_dx, 1e-5),
                ("dgamma vs cpu", &gdg, &dg, 1e-5),
                ("dbeta vs cpu", &gdb, &db, 1e-5),
                ("dx vs cuda nchw", &gdx, &t(&ndx), 1e-6),
                ("dgamma vs cuda nchw", &gdg, &ndg, 1e-6),
                ("dbeta vs cuda nchw", &gdb, &ndb, 1e-6),
            ] {
                let e = rel_err(got, want);
                assert!(e <= tol, "{what}: {name}: relative error {e:e}");
            }
            let same = bits(&gdx) == bits(&t(&ndx)) && gdg == ndg && gdb == ndb;
            eprintln!("{what}: NHWC backward bit-identical to the NCHW kernel's: {same}");
        }
    }
}

fn train_fwd_nhwc_matches_nchw() {
    for (p, tol) in [
        (Precision::F32, 1e-5),
        (Precision::Tf32, 1e-3),
        (Precision::Bf16, 1e-2),
    ] {
        train_fwd_nhwc_at(p, tol);
    }
}

/// At f32 (layout changes around the NCHW kernels) bit for bit the CUDA NCHW op; at tf32 /
/// bf16 (the native channels-last kernel with its statistics epilogue where it runs the
/// shape) within `tol` of the CPU reference.
fn train_fwd_nhwc_at(p: Precision, tol: f64) {
    let g = gpu_at(p);
    let cpu = CpuBackend::<f32>::new();
    let mut rng = SplitMix64::fresh("cuda-nhwc-train-fwd");
    for s in [
        conv(2, 5, 9, 7, 6, 3, 1, 1),
        conv(1, 8, 13, 11, 16, 3, 2, 1),
        conv(3, 4, 6, 6, 12, 1, 2, 0),
        conv(2, 3, 23, 21, 9, 7, 2, 3),
        conv(2, 16, 17, 15, 70, 3, 1, 1),
    ] {
        let c = s.c_out;
        let x = rng.vec_f32(s.x_len(), -1.0, 1.0);
        let w = rng.vec_f32(s.w_len(), -0.5, 0.5);
        let gamma = rng.vec_f32(c, 0.5, 1.5);
        let beta = rng.vec_f32(c, -0.5, 0.5);
        let rm0 = rng.vec_f32(c, -0.2, 0.2);
        let rv0 = rng.vec_f32(c, 0.5, 2.0);
        let r = rng.vec_f32(s.y_len(), -1.0, 1.0);
        for (residual, relu) in [(false, true), (true, true), (true, false), (false, false)] {
            let what = format!("{p} {s:?} residual {residual} relu {relu}");
            // [rm, rv, mean, invstd, z, y] on `be`, NCHW or channels-last (outputs NCHW).
            fn run<B: Backend<T = f32>>(
                be: &B,
                s: &Conv2d,
                nhwc: bool,
                [x, w, gamma, beta, rm0, rv0, r]: [&[f32]; 7],
                residual: bool,
                relu: bool,
            ) -> [Vec<f32>; 6] {
                let bn = bn_of(s);
                let (n, c, ohw) = (s.n, s.c_out, s.out_h() * s.out_w());
                let up = |v: &[f32]| be.upload(v).expect("up");
                let (xx, rr) = if nhwc {
                    (
                        up(&to_nhwc(x, n, s.c_in, s.h * s.w)),
                        up(&to_nhwc(r, n, c, ohw)),
                    )
                } else {
                    (up(x), up(r))
                };
                let (mut rm, mut rv) = (up(rm0), up(rv0));
                let (mut sm, mut si) = (up(&vec![f32::NAN; c]), up(&vec![f32::NAN; c]));
                let mut z = up(&vec![f32::NAN; s.y_len()]);
                let mut y = up(&vec![f32::NAN; s.y_len()]);
                let op = if nhwc {
                    B::conv2d_bn_train_fwd_nhwc
                } else {
                    B::conv2d_bn_train_fwd
                };
                op(
                    be,
                    s,
                    &bn,
                    &xx,
                    &up(w),
                    &up(gamma),
                    &up(beta),
                    &mut rm,
                    &mut rv,
                    &mut sm,
                    &mut si,
                    &mut z,
                    &mut y,
                    residual.then_some(&rr),
                    relu,
                )
                .expect("train fwd");
                let d = |b: &B::Buf| be.download(b).expect("download");
                let back = |v: Vec<f32>| {
                    if nhwc {
                        // [n, hw, c] -> [n, c, hw]
                        let mut o = vec![0.0; v.len()];
                        for i in 0..n {
                            for p in 0..ohw {
                                for ch in 0..c {
                                    o[(i * c + ch) * ohw + p] = v[(i * ohw + p) * c + ch];
                                }
                            }
                        }
                        o
                    } else {
                        v
                    }
                };
                [d(&rm), d(&rv), d(&sm), d(&si), back(d(&z)), back(d(&y))]
            }
            let args = [&x[..], &w, &gamma, &beta, &rm0, &rv0, &r];
            let got = run(&g, &s, true, args, residual, relu);
            let nchw = run(&g, &s, false, args, residual, relu);
            let reference = run(&cpu, &s, false, args, residual, relu);
            for (k, name) in ["running mean", "running var", "mean", "invstd", "z", "y"]
                .iter()
                .enumerate()
            {
                if p == Precision::F32 {
                    assert_eq!(
                        bits(&got[k]),
                        bits(&nchw[k]),
                        "{what}: {name}: channels-last differs from the CUDA NCHW op"
                    );
                }
                let e = rel_err(&got[k], &reference[k]);
                assert!(e <= tol, "{what}: {name} vs the CPU: relative error {e:e}");
            }
        }
    }
}

fn cfgs() -> [ModelConfig; 2] {
    [
        ModelConfig {
            layers: vec![1, 1],
            base_width: 4,
            lstm_hidden: 5,
            ..ModelConfig::tiny()
        },
        ModelConfig {
            block: ichcam::model::BlockKind::Bottleneck,
            layers: vec![2, 1],
            base_width: 4,
            lstm_hidden: 5,
            ..ModelConfig::tiny()
        },
    ]
}

/// Three stage-1 training steps (Adam) of an NCHW and a channels-last model at `p`: the
/// loss, logits, every gradient and every tensor after each step within `tol` (relative).
fn train_step_nhwc_matches_nchw(p: Precision, tol: f64) {
    let (batch, seq, h, w) = (2, 3, 29, 26);
    let n = batch * seq;
    let mut rng = SplitMix64::fresh("cuda-nhwc-train-step");
    for cfg in cfgs() {
        let what = format!("{p} {:?} {:?}", cfg.block, cfg.layers);
        // The layout's own effect: f32 storage (bf16 storage, the default at bf16, moves the
        // gradients more: tests/cuda_train_bf16_storage.rs).
        let mut nets = [LayoutChoice::Nchw, LayoutChoice::Nhwc].map(|l| {
            let mut be = train_at(p, l);
            be.set_train_storage(StorageChoice::F32);
            IchNet::new(be, cfg.clone(), 13).expect("net")
        });
        // At tf32 / bf16: the NCHW net at f32 from the same state, the precision's own effect
        // on the step (the layout's must not exceed it).
        let mut f32_net = (p != Precision::F32).then(|| {
            IchNet::new(
                train_at(Precision::F32, LayoutChoice::Nchw),
                cfg.clone(),
                13,
            )
            .expect("net")
        });
        let opt = OptimizerConfig::adam(1e-2);
        let (mut tensors, mut identical, mut worst, mut worst_all) = (0, 0, 0.0f64, 0.0f64);
        for step in 0..3 {
            let x = rng.vec_f32(n * cfg.in_channels * h * w, -1.0, 1.0);
            let labels: Vec<f32> = (0..n).map(|i| ((i + step) % 2) as f32).collect();
            let [a, b] = &mut nets;
            let sa = a
                .stage1_forward_backward(&x, &labels, batch, seq, h, w, 1.5)
                .expect("nchw step");
            let sb = b
                .stage1_forward_backward(&x, &labels, batch, seq, h, w, 1.5)
                .expect("nhwc step");
            // The precision's own deviation of this step's gradients (NCHW at p vs f32).
            let mut e_prec = 0.0f64;
            if let Some(f) = f32_net.as_mut() {
                f.stage1_forward_backward(&x, &labels, batch, seq, h, w, 1.5)
                    .expect("f32 step");
                let (mut num, mut den) = (0.0f64, 0.0f64);
                for name in f.names() {
                    if let (Ok(gf), Ok(ga)) = (f.grad(&name), a.grad(&name)) {
                        for (&x, &y) in ga.iter().zip(&gf) {
                            num += (x as f64 - y as f64).powi(2);
                            den += (y as f64).powi(2);
                        }
                    }
                }
                e_prec = (num / den.max(1e-300)).sqrt();
            }
            assert_eq!(a.train_channels_last(), Some(false), "{what}");
            assert_eq!(b.train_channels_last(), Some(true), "{what}");
            let rel = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-30);
            assert!(
                rel(sb.loss, sa.loss) <= tol,
                "{what} step {step}: loss {} vs {}",
                sb.loss,
                sa.loss
            );
            let (la, lb): (Vec<f32>, Vec<f32>) = (
                sa.logits.iter().map(|&v| v as f32).collect(),
                sb.logits.iter().map(|&v| v as f32).collect(),
            );
            let e = rel_err(&lb, &la);
            assert!(e <= tol, "{what} step {step}: logits: {e:e}");
            // At tf32 / bf16 a one-ulp difference of the summation order can flip a ReLU
            // decision, and in these tiny nets a few values carry a whole channel's gradient
            // and a nearly constant channel's 1/sqrt(var + eps) magnifies it: about 1 seed in
            // 10 the NCHW step at tf32 itself is 2e-2 to 0.14 (all gradients) from the f32
            // one. So all of a step's gradients together within the tolerance or, on such a
            // seed, within the precision's own deviation `e_prec`; each tensor within 0.5 or
            // 4 e_prec (a wrong layout or index is O(1)).
            let per_tensor = if p == Precision::F32 {
                tol
            } else {
                0.5f64.max(4.0 * e_prec)
            };
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for name in a.names() {
                let mut pairs = vec![(
                    name.clone(),
                    a.param(&name).expect("param"),
                    b.param(&name).expect("param"),
                )];
                if let (Ok(ga), Ok(gb)) = (a.grad(&name), b.grad(&name)) {
                    pairs.push((format!("gradient of {name}"), ga, gb));
                }
                for (label, va, vb) in pairs {
                    tensors += 1;
                    identical += usize::from(bits(&va) == bits(&vb));
                    if va.iter().all(|&v| v == 0.0) {
                        assert!(vb.iter().all(|&v| v == 0.0), "{what} step {step}: {label}");
                        continue;
                    }
                    let e = rel_err(&vb, &va);
                    worst = worst.max(e);
                    assert!(
                        e <= per_tensor,
                        "{what} step {step}: {label}: relative error {e:e}"
                    );
                    if label.starts_with("gradient of ") {
                        for (&x, &y) in vb.iter().zip(&va) {
                            num += (x as f64 - y as f64).powi(2);
                            den += (y as f64).powi(2);
                        }
                    }
                }
            }
            let all = (num / den.max(1e-300)).sqrt();
            worst_all = worst_all.max(all);
            assert!(
                all <= tol.max(e_prec),
                "{what} step {step}: all gradients together: relative error {all:e} \
                 (the precision's own: {e_prec:e})"
            );
            a.step(&opt, ParamGroup::Stage1).expect("step");
            b.step(&opt, ParamGroup::Stage1).expect("step");
            if p != Precision::F32 {
                // Each step from the same state: Adam's normalised update turns the rounding
                // differences of near-zero gradients into steps of the learning rate, which
                // the next step's gradients would compound (seen: 2.7e-3 at tf32 on the third
                // step). The tolerance is one step's, the NCHW net's state copied over.
                for name in a.names() {
                    let v = a.param(&name).expect("param");
                    let st = a.opt_state(&name).expect("optimizer state");
                    for net in std::iter::once(&mut *b).chain(f32_net.as_mut()) {
                        net.set_param(&name, &v).expect("set param");
                        if st.steps > 0 {
                            net.set_opt_state(&name, st.m.as_deref(), st.v.as_deref(), st.steps)
                                .expect("set optimizer state");
                        }
                    }
                }
            }
        }
        eprintln!(
            "{what}: {identical} of {tensors} tensors and gradients bit-identical to NCHW, \
             worst relative error {worst:e} (one tensor), {worst_all:e} (a step's gradients)"
        );
    }
}

/// The channels-last training step eager and captured as a graph (replayed): bit for bit (at
/// f32 the layout changes around the NCHW kernels, at bf16 the native channels-last ones).
fn nhwc_train_step_graph_replays(p: Precision) {
    use ichcam::model::net_graph::GraphSteps;
    let be = train_at(p, LayoutChoice::Nhwc);
    let cfg = cfgs()[1].clone();
    let mut eager = IchNet::new(be.clone(), cfg.clone(), 21).expect("net");
    let mut graphed = IchNet::new(be.clone(), cfg.clone(), 21).expect("net");
    let (batch, seq, size) = (2, 3, 32);
    let n = batch * seq;
    let mut rng = SplitMix64::fresh("cuda-nhwc-train-graph");
    let mut steps = GraphSteps::default();
    for k in 0..4 {
        let x = rng.vec_f32(n * cfg.in_channels * size * size, -1.0, 1.0);
        let y: Vec<f32> = (0..n).map(|i| ((i + k) % 2) as f32).collect();
        let opt = OptimizerConfig::adam(1e-2 / (1.0 + k as f64));
        eager.zero_grads().expect("zero");
        let want = eager
            .stage1_forward_backward(&x, &y, batch, seq, size, size, 1.5)
            .expect("eager step");
        eager.step(&opt, ParamGroup::Stage1).expect("eager step");
        let got = graphed
            .stage1_step_graphed(&mut steps, &x, &y, batch, seq, size, size, 1.5, &opt)
            .expect("graphed step");
        if let Some(why) = steps.graph.as_ref().and_then(|t| t.failure()) {
            panic!("step {k}: the channels-last step was not captured: {why}");
        }
        assert_eq!(graphed.train_channels_last(), Some(true));
        // At bf16 the training activations in bf16 storage (the default there).
        let st = if p == Precision::Bf16 {
            ActStorage::Bf16
        } else {
            ActStorage::F32
        };
        assert_eq!(graphed.train_storage(), Some(st), "step {k}");
        assert_eq!(eager.train_storage(), Some(st), "step {k}");
        assert_eq!(got.loss.to_bits(), want.loss.to_bits(), "step {k}: loss");
        assert_eq!(got.logits, want.logits, "step {k}: logits");
        for name in eager.names() {
            let (pa, pb) = (
                eager.param(&name).expect("param"),
                graphed.param(&name).expect("param"),
            );
            assert_eq!(bits(&pa), bits(&pb), "step {k}: {name}");
            if let (Ok(ga), Ok(gb)) = (eager.grad(&name), graphed.grad(&name)) {
                assert_eq!(bits(&ga), bits(&gb), "step {k}: gradient of {name}");
            }
        }
    }
    let (captures, replays, eagers) = steps.counts();
    // The first step eager, the second captured and replayed, then replays.
    assert_eq!(
        (captures, replays, eagers),
        (1, 3, 1),
        "captures, replays, eager steps"
    );
    eprintln!(
        "channels-last train step graph: {} operations",
        steps.graph.as_ref().map_or(0, |t| t.nodes())
    );
}

/// `ichcam bench --what train-step --json --layout layout` on the device, tiny and short: the
/// JSON line's `layout`.
fn bench_layout(layout: &str) -> String {
    let out = common::bin()
        .args([
            "bench",
            "--device",
            "cuda",
            "--what",
            "train-step",
            "--config",
            "tiny",
        ])
        .args([
            "--batch", "1", "--slices", "2", "--size", "32", "--iters", "1",
        ])
        .args(["--warmup", "0", "--json", "--layout", layout])
        .output()
        .expect("running ichcam bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in {stdout}"));
    let j: serde_json::Value = serde_json::from_str(line).expect("JSON");
    assert_eq!(j["what"], "train-step", "{line}");
    j["layout"].as_str().unwrap_or("none").to_string()
}

fn bench_train_step_names_its_layout() {
    assert_eq!(bench_layout("nhwc"), "nhwc");
    assert_eq!(bench_layout("auto"), "nchw");
}
