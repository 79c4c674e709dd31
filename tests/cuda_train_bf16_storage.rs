//! bf16 storage of the channels-last training activations on CUDA (issue 14, round 2):
//!
//! - `CudaBackend::set_train_storage` (`StorageChoice`, one enum with the eval storage's):
//!   `auto` stores the training activations in bf16 at `--precision bf16` on a channels-last
//!   training backbone only, f32 at tf32 / f32 or NCHW; an explicit `bf16` below bf16 is
//!   ignored; `force_f32_train_storage`; two values per slot;
//! - `pack_bf16` / `unpack_bf16` bit for bit the CPU reference (`precision::round_bf16`);
//! - the native `relu_bwd_bf16` (`elementwise.cu`) bit for bit the CPU's on the same
//!   stored y; the native `batchnorm_bwd_nhwc_bf16` (`bn_bwd_partial_nhwc_bf16`, the
//!   finalize, `bn_bwd_apply_bf16`: z, y read in bf16 storage, dz written rounded) against
//!   the CPU reference (dz within one bf16 step elementwise, at most 1% of its stored values
//!   differing from the CPU's, its relative error under 4e-3;
//!   dgamma / dbeta within 1e-5), with and without the fused ReLU, one channel, 300 channels
//!   (two channel tiles) and several pixel chunks;
//! - `conv2d_bn_train_fwd_nhwc_bf16` (on this branch by conversions: the statistics those
//!   of the rounded z) and the two convolution gradients on bf16 storage against the CPU
//!   reference, at f32 (1e-5 on the f32 outputs; z and y within one bf16 step) and bf16
//!   precision (1e-2).
//!
//! Not here (not done this round): the model's training backbone in bf16 storage (a whole
//! step bf16 vs f32 storage, vs the CPU, the captured step).
//!
//! Runs on a GPU or on the emulated driver (`scripts/cuda-emu.sh`); without either the
//! device tests are reported as ignored (tests/common/cuda.rs).

mod common;
use common::cuda::{device, gpu_at, rel_err};
use common::nhwc::bn_of;
use common::rng::SplitMix64;
use common::shapes::conv;

use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::backend::{LayoutChoice, StorageChoice};
use ichcam::engine::cuda::CudaBackend;
use ichcam::engine::precision::round_bf16;
use ichcam::engine::{ActStorage, Backend, BatchNorm2d, Precision};

fn main() {
    common::cuda::main_with_threads(
        vec![
            device("train_storage_setting", train_storage_setting),
            device("pack_unpack_match_cpu", pack_unpack_match_cpu),
            device("relu_bwd_bf16_matches_cpu", relu_bwd_bf16_matches_cpu),
            device("bn_bwd_nhwc_bf16_matches_cpu", bn_bwd_nhwc_bf16_matches_cpu),
            device("train_ops_bf16_match_cpu_f32", || {
                train_ops_bf16_match_cpu(Precision::F32, 1e-5)
            }),
            device("train_ops_bf16_match_cpu_bf16", || {
                train_ops_bf16_match_cpu(Precision::Bf16, 1e-2)
            }),
        ],
        1,
    )
}

type Cpu = CpuBackend<f32>;
type Buf = <CudaBackend as Backend>::Buf;

fn cpu() -> Cpu {
    Cpu::new()
        .with_channels_last_train(true)
        .with_train_storage(ActStorage::Bf16)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| round_bf16(x)).collect()
}

/// `v` (f32, values) into bf16 storage on the device.
fn stored(g: &CudaBackend, v: &[f32]) -> Buf {
    let f = g.upload(v).expect("upload");
    let mut b = g
        .zeros(g.storage_slots(ActStorage::Bf16, v.len()))
        .expect("zeros");
    g.pack_bf16(&f, &mut b).expect("pack");
    b
}

/// The values of a device tensor of `len` values in bf16 storage.
fn values(g: &CudaBackend, b: &Buf, len: usize) -> Vec<f32> {
    let mut f = g.zeros(len).expect("zeros");
    g.unpack_bf16(b, &mut f).expect("unpack");
    g.download(&f).expect("download")
}

/// Each value within one bf16 step (2^-7 relative) of the reference, or `abs` absolute.
fn within_a_bf16_step(got: &[f32], want: &[f32], abs: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let tol = (b.abs() as f64 * 2f64.powi(-7)).max(abs);
        assert!(
            (a as f64 - b as f64).abs() <= tol,
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

fn train_storage_setting() {
    use ActStorage::{Bf16, F32};
    for (p, layout, st, want) in [
        (
            Precision::Bf16,
            LayoutChoice::Auto,
            StorageChoice::Auto,
            Bf16,
        ),
        (
            Precision::Bf16,
            LayoutChoice::Nhwc,
            StorageChoice::Bf16,
            Bf16,
        ),
        (Precision::Bf16, LayoutChoice::Auto, StorageChoice::F32, F32),
        (
            Precision::Bf16,
            LayoutChoice::Nchw,
            StorageChoice::Auto,
            F32,
        ),
        (
            Precision::Bf16,
            LayoutChoice::Nchw,
            StorageChoice::Bf16,
            F32,
        ),
        (
            Precision::Tf32,
            LayoutChoice::Auto,
            StorageChoice::Auto,
            F32,
        ),
        (
            Precision::Tf32,
            LayoutChoice::Nhwc,
            StorageChoice::Bf16,
            F32,
        ),
        (Precision::F32, LayoutChoice::Nhwc, StorageChoice::Bf16, F32),
    ] {
        let mut g = gpu_at(p);
        assert_eq!(g.train_storage_setting(), StorageChoice::Auto);
        g.set_train_layout(layout);
        g.set_train_storage(st);
        assert_eq!(g.train_storage(), want, "{p} {layout} {st}");
        assert_eq!(g.clone().train_storage(), want, "a clone keeps the setting");
        // The eval storage is a setting of its own.
        assert_eq!(g.eval_storage_setting(), StorageChoice::Auto);
        g.force_f32_train_storage();
        assert_eq!(g.train_storage(), F32);
    }
    let g = gpu_at(Precision::Bf16);
    assert_eq!(g.storage_slots(ActStorage::Bf16, 7), 4);
    assert_eq!(g.storage_slots(ActStorage::F32, 7), 7);
}

fn pack_unpack_match_cpu() {
    let g = gpu_at(Precision::F32);
    let mut rng = SplitMix64::fresh("cuda-bf16s-pack");
    for len in [1usize, 2, 7, 1000, 4099] {
        let mut v = rng.vec_f32(len, -3.0, 3.0);
        v[0] = 1.0 + 2f32.powi(-8); // a tie: rounds to even (1.0)
        let b = stored(&g, &v);
        assert_eq!(g.len(&b), len.div_ceil(2));
        assert_eq!(bits(&values(&g, &b, len)), bits(&rounded(&v)), "len {len}");
    }
}

fn relu_bwd_bf16_matches_cpu() {
    let g = gpu_at(Precision::F32);
    let c = cpu();
    let mut rng = SplitMix64::fresh("cuda-bf16s-relu");
    for len in [1usize, 9, 3001] {
        let mut y = rounded(&rng.vec_f32(len, -1.0, 1.0));
        for v in y.iter_mut().step_by(2) {
            *v = v.max(0.0);
        }
        let dy = rng.vec_f32(len, -1.0, 1.0);
        let mut want = vec![f32::NAN; len];
        c.relu_bwd_bf16(&y, &dy, &mut want).expect("cpu");
        let yb = stored(&g, &y);
        let dyb = g.upload(&dy).expect("dy");
        let mut dx = g.upload(&vec![f32::NAN; len]).expect("dx");
        g.relu_bwd_bf16(&yb, &dyb, &mut dx).expect("cuda");
        assert_eq!(
            bits(&g.download(&dx).expect("dx")),
            bits(&want),
            "len {len}"
        );
    }
}

fn bn_bwd_nhwc_bf16_matches_cpu() {
    let g = gpu_at(Precision::F32);
    let c = cpu();
    let mut rng = SplitMix64::fresh("cuda-bf16s-bn-bwd");
    for (n, ch, hw) in [
        (2usize, 1usize, 37usize),
        (2, 300, 9),
        (2, 3, 4100),
        (3, 64, 35),
    ] {
        let s = BatchNorm2d {
            n,
            c: ch,
            hw,
            eps: 1e-5,
            momentum: 0.1,
        };
        let z = rounded(&rng.vec_f32(s.len(), -1.0, 1.0));
        let y = rounded(&rng.vec_f32(s.len(), -1.0, 1.0));
        let dy = rng.vec_f32(s.len(), -1.0, 1.0);
        let gamma = rng.vec_f32(ch, 0.5, 1.5);
        let sm = rng.vec_f32(ch, -0.2, 0.2);
        let si = rng.vec_f32(ch, 0.5, 2.0);
        for relu in [false, true] {
            let mut want = vec![f32::NAN; s.len()];
            let (mut wg, mut wb) = (vec![f32::NAN; ch], vec![f32::NAN; ch]);
            c.batchnorm_bwd_nhwc_bf16(
                &s, &z, &y, &dy, &gamma, &sm, &si, &mut want, &mut wg, &mut wb, relu,
            )
            .expect("cpu");
            let (zb, yb) = (stored(&g, &z), stored(&g, &y));
            let up = |v: &[f32]| g.upload(v).expect("upload");
            let mut dz = g.zeros(s.len().div_ceil(2)).expect("dz");
            let (mut dg, mut db) = (up(&vec![f32::NAN; ch]), up(&vec![f32::NAN; ch]));
            g.batchnorm_bwd_nhwc_bf16(
                &s,
                &zb,
                &yb,
                &up(&dy),
                &up(&gamma),
                &up(&sm),
                &up(&si),
                &mut dz,
                &mut dg,
                &mut db,
                relu,
            )
            .expect("cuda");
            let what = format!("({n}, {ch}, {hw}) relu {relu}");
            let got = values(&g, &dz, s.len());
            within_a_bf16_step(&got, &want, 1e-6, &format!("{what} dz"));
            let e = rel_err(&got, &want);
            assert!(e < 4e-3, "{what}: dz rel err {e:e}");
            // Rounded to nearest even from f32 values that differ from the CPU's in their
            // last bits at most: almost every stored value the CPU's bit for bit.
            let differ = bits(&got)
                .iter()
                .zip(bits(&want))
                .filter(|(a, b)| **a != *b)
                .count();
            assert!(
                differ * 100 <= s.len(),
                "{what}: {differ} of {} stored dz values differ from the CPU's",
                s.len()
            );
            // dgamma and dbeta per channel against the size of their terms (a one-channel
            // sum of 74 terms may cancel to near zero: seen 1.3e-5 relative to the sum itself
            // with ICHCAM_SEED=11043604918336307386), within 1e-5 of sum |term|.
            let (gg, gb) = (g.download(&dg).expect("dg"), g.download(&db).expect("db"));
            let (mut eg, mut eb) = (0.0f64, 0.0f64);
            for k in 0..ch {
                let (mut sg, mut sb) = (1e-30f64, 1e-30f64);
                for i in (k..s.len()).step_by(ch) {
                    let d = f64::from(dy[i]).abs();
                    sb += d;
                    sg += d * (f64::from(z[i]) - f64::from(sm[k])).abs() * f64::from(si[k]);
                }
                eg = eg.max((f64::from(gg[k]) - f64::from(wg[k])).abs() / sg);
                eb = eb.max((f64::from(gb[k]) - f64::from(wb[k])).abs() / sb);
            }
            assert!(eg < 1e-5 && eb < 1e-5, "{what}: dgamma {eg:e} dbeta {eb:e}");
            println!("{what}: dz {e:.2e} dgamma {eg:.2e} dbeta {eb:.2e}");
        }
    }
}

fn train_ops_bf16_match_cpu(p: Precision, tol: f64) {
    let g = gpu_at(p);
    let c = cpu();
    let mut rng = SplitMix64::fresh("cuda-bf16s-train-ops");
    for s in [
        conv(2, 5, 9, 7, 6, 3, 1, 1),
        conv(1, 8, 13, 11, 16, 3, 2, 1),
        conv(3, 16, 6, 6, 32, 1, 2, 0),
    ] {
        let bn = bn_of(&s);
        let ch = s.c_out;
        let x = rounded(&rng.vec_f32(s.x_len(), -1.0, 1.0));
        let w = rng.vec_f32(s.w_len(), -0.5, 0.5);
        let gamma = rng.vec_f32(ch, 0.5, 1.5);
        let beta = rng.vec_f32(ch, -0.5, 0.5);
        let r = rounded(&rng.vec_f32(s.y_len(), -1.0, 1.0));
        let dy = rounded(&rng.vec_f32(s.y_len(), -1.0, 1.0));
        let up = |v: &[f32]| g.upload(v).expect("upload");
        for (residual, relu) in [(false, true), (true, true), (true, false)] {
            let what = format!("{p} {s:?} residual {residual} relu {relu}");
            // [rm, rv, sm, si] and z, y (values) of the CPU reference.
            let (mut rm, mut rv) = (vec![0.0; ch], vec![1.0; ch]);
            let (mut sm, mut si) = (vec![f32::NAN; ch], vec![f32::NAN; ch]);
            let (mut z, mut y) = (vec![f32::NAN; s.y_len()], vec![f32::NAN; s.y_len()]);
            c.conv2d_bn_train_fwd_nhwc_bf16(
                &s,
                &bn,
                &x,
                &w,
                &gamma,
                &beta,
                &mut rm,
                &mut rv,
                &mut sm,
                &mut si,
                &mut z,
                &mut y,
                residual.then_some(&r),
                relu,
            )
            .expect("cpu");
            let (mut grm, mut grv) = (up(&vec![0.0; ch]), up(&vec![1.0; ch]));
            let (mut gsm, mut gsi) = (up(&vec![f32::NAN; ch]), up(&vec![f32::NAN; ch]));
            let slots = s.y_len().div_ceil(2);
            let (mut gz, mut gy) = (g.zeros(slots).expect("z"), g.zeros(slots).expect("y"));
            let rb = stored(&g, &r);
            g.conv2d_bn_train_fwd_nhwc_bf16(
                &s,
                &bn,
                &stored(&g, &x),
                &up(&w),
                &up(&gamma),
                &up(&beta),
                &mut grm,
                &mut grv,
                &mut gsm,
                &mut gsi,
                &mut gz,
                &mut gy,
                residual.then_some(&rb),
                relu,
            )
            .expect("cuda");
            let gzv = values(&g, &gz, s.y_len());
            let gyv = values(&g, &gy, s.y_len());
            let ez = rel_err(&gzv, &z);
            let ey = rel_err(&gyv, &y);
            let dl = |a: &Buf| g.download(a).expect("dl");
            let es = [
                rel_err(&dl(&grm), &rm),
                rel_err(&dl(&grv), &rv),
                rel_err(&dl(&gsm), &sm),
                rel_err(&dl(&gsi), &si),
            ];
            println!("{what}: z {ez:.2e} y {ey:.2e} stats {es:?}");
            // bf16 storage: at f32 a value may round the other way (one bf16 step).
            let ztol = tol.max(4e-3);
            assert!(ez < ztol && ey < ztol, "{what}: z {ez:e} y {ey:e}");
            assert!(
                es.iter().all(|&e| e < tol.max(1e-4)),
                "{what}: stats {es:?}"
            );
            if p == Precision::F32 {
                within_a_bf16_step(&gzv, &z, 1e-5, &format!("{what} z"));
            }
        }
        // The convolution gradients on bf16 storage.
        let mut want = vec![f32::NAN; s.x_len()];
        c.conv2d_bwd_data_nhwc_bf16(&s, &dy, &w, &mut want)
            .expect("cpu dx");
        let mut dx = up(&vec![f32::NAN; s.x_len()]);
        g.conv2d_bwd_data_nhwc_bf16(&s, &stored(&g, &dy), &up(&w), &mut dx)
            .expect("cuda dx");
        let e = rel_err(&g.download(&dx).expect("dx"), &want);
        assert!(e < tol, "{p} {s:?}: dx {e:e}");
        let mut want = vec![f32::NAN; s.w_len()];
        c.conv2d_bwd_weight_nhwc_bf16(&s, &x, &dy, &mut want)
            .expect("cpu dw");
        let mut dw = up(&vec![f32::NAN; s.w_len()]);
        g.conv2d_bwd_weight_nhwc_bf16(&s, &stored(&g, &x), &stored(&g, &dy), &mut dw)
            .expect("cuda dw");
        let e2 = rel_err(&g.download(&dw).expect("dw"), &want);
        assert!(e2 < tol, "{p} {s:?}: dw {e2:e}");
        println!("{p} {s:?}: dx {e:.2e} dw {e2:.2e}");
    }
}
