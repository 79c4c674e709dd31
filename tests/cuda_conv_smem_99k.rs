//! The shallow cp.async rings of the tensor-core convolutions (conv.rs's `Ring`, the `_s2` /
//! `_s4` / `_m64_s3` / `_s5` kernels of `kernels/conv_tc.cu`) on a device of 99 KiB per block
//! (sm_86 / sm_89: 101,376 bytes), where the deep rings, sized for sm_90's 227 KiB, do not fit:
//!
//! - at 99 KiB the NCHW `mma.sync` forwards (plain, eval, training) and gradients run their
//!   2-stage ring (`_s2`), the channels-last f32-storage eval forward, training forward and
//!   data gradient their 2-stage ring (`_s2`: 128 x 128 at bf16 for any rows, no 64 x 256 ring
//!   fitting there; at tf32 64 x 256 `_m64_s2` for at most 64 rows) and its weight gradient
//!   at bf16 its 2-stage ring (`_bf16_s2`; tf32's deep ring fits), the bf16-storage
//!   channels-last eval forward, training forward and data gradient their 4-stage 128 x 128
//!   ring (`_s4`) or 3-stage 64 x 256 ring (`_m64_s3`) and the bf16-storage weight gradient
//!   its 5-stage ring (`_s5`), by the kernel-name diagnostics; at 64 KiB (sm_75) none of them
//!   (WMMA, or the layout changes / conversions around it);
//! - each of those ops gives, at 99 KiB, BIT FOR BIT what the deep ring gives on the same
//!   inputs without the limit (the depth changes how many K tiles are in flight, never the
//!   order of the arithmetic), and is within the precision's tolerance of the CPU reference;
//!   on shapes that take both tiles, every copy path of the bf16-storage x and dy (16-, 4-byte
//!   copies and 2-byte loads: channels % 8 == 0, even, odd), the NCHW and the channels-last
//!   f32-storage 16- and 4-byte paths (x, w, dy), and rings that wrap many times (18 K tiles
//!   of the 3x3 64-channel shape; 12 and 11 in the two splits of the 720-pixel weight gradient);
//! - a small model's eval passes at 99 KiB equal the unlimited ones bit for bit: the CAM pass
//!   of a bf16 model in bf16 channels-last storage (`ichcam segment`'s path), of NCHW models
//!   at tf32 and bf16 (route `Always`) and of channels-last f32-storage ones at tf32 and bf16,
//!   with the features;
//! - on the emulator, its launch profile (`EMU_PROFILE=1`, in child processes) shows every
//!   shallow kernel launched by those ops at 99 KiB, none of the deep ones and no layout
//!   change (`transpose_tiles*`), and the eval passes at 99 KiB launching shallow kernels
//!   (NCHW bf16 and tf32, bf16 storage, channels-last f32 storage at bf16 and tf32), no deep
//!   one.
//!
//! The limit is lowered through `CudaBackend::limit_shared_memory_for_tests` (the emulator is
//! an H100 and does not enforce it; the backend's launch guard `smem_dynamic` refuses a kernel
//! that does not fit). Runs on a GPU or on the emulated driver
//! (`scripts/cuda-emu.sh run target/release/deps/cuda_conv_smem_99k-* --include-ignored`);
//! without a device the device tests are ignored.

mod common;
use common::cuda::{device, emulated, gpu_at, rel_err};
use common::nhwc::{bf16s_outputs, bn_of, nhwc_outputs, OpData};
use common::rng::SplitMix64;
use common::shapes::conv;

use cudarc::driver::CudaSlice;
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::backend::{LayoutChoice, StorageChoice};
use ichcam::engine::cuda::{CudaBackend, MmaRoute};
use ichcam::engine::{Backend, Conv2d, Precision};
use ichcam::model::{BlockKind, CamPassBufs, IchNet, ModelConfig};

fn main() {
    common::cuda::main_with_threads(
        vec![
            device("shallow_kernels_by_limit", shallow_kernels_by_limit),
            device(
                "shallow_rings_match_deep_bit_for_bit",
                shallow_rings_match_deep_bit_for_bit,
            ),
            device(
                "eval_passes_at_99k_match_unlimited",
                eval_passes_at_99k_match_unlimited,
            ),
            device("shallow_kernels_launch", shallow_kernels_launch),
        ],
        1,
    )
}

/// sm_86 / sm_89's per-block limit (99 KiB).
const SM86: u32 = 101_376;
/// sm_75's (64 KiB).
const SM75: u32 = 65_536;

/// The backend at `p` and limit `limit` (None: the device's), route `Always`.
fn at(p: Precision, limit: Option<u32>) -> CudaBackend {
    let mut g = gpu_at(p);
    g.set_mma_route(MmaRoute::Always);
    if let Some(l) = limit {
        g.limit_shared_memory_for_tests(l)
            .expect("a limit below the device's");
    }
    g
}

/// The shapes: (shape, what it covers). Rows: `c_out` of the forwards, `c_in` of the data
/// gradient (at most 64: the 64 x 256 tile). The bf16-storage copy paths go by `c_in` for
/// the forwards' x and by `c_out` for the data gradient's dy (16-byte copies where % 8 == 0,
/// 4-byte where even, 2-byte loads where odd); the NCHW ones by K % 4 (the weights) and 1x1
/// stride 1 (x); the channels-last f32-storage ones by K % 4 (the weights), `c_in` % 4 (x)
/// and `c_out` % 4 (dy, the data gradient's weights): 16-byte copies for the first two and the
/// last shape, 4-byte for the third and fourth.
fn shapes() -> [(Conv2d, &'static str); 5] {
    [
        (
            conv(2, 16, 13, 11, 48, 3, 2, 1),
            "3x3/2 16->48: 64x256 both ways, 16-byte copies",
        ),
        (
            conv(2, 96, 9, 8, 80, 1, 1, 0),
            "1x1 96->80: 128x128 both ways, 16-byte copies of x and w (NCHW)",
        ),
        (
            conv(1, 3, 17, 15, 73, 3, 1, 1),
            "3x3 3->73: odd c_in and c_out (2-byte loads both ways), 128x128 forward, 64x256 data gradient",
        ),
        (
            conv(2, 10, 20, 18, 38, 3, 1, 1),
            "3x3 10->38: even c_in and c_out (4-byte copies both ways), 64x256 both ways, 720 pixels (the weight gradient's K)",
        ),
        (
            conv(1, 64, 10, 9, 136, 3, 2, 1),
            "3x3/2 64->136: K 576 (18 tiles), two channel tiles, 128x128 / 64x256",
        ),
    ]
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The kernels the ops of `s` take on `g`: the NCHW forward, data and weight gradients, the
/// channels-last f32-storage eval forward, training forward, data and weight gradients, and
/// the bf16-storage ones (None at tf32).
fn kernels(g: &CudaBackend, s: &Conv2d) -> Vec<Option<String>> {
    let mut k: Vec<Option<String>> = g.conv_kernels(s).map(|n| Some(n.to_string())).into();
    k.push(g.conv_bn_eval_nhwc_kernel(s).map(String::from));
    k.push(g.conv_fwd_stats_nhwc_kernel(s).map(String::from));
    k.push(g.conv_bwd_data_nhwc_kernel(s).map(String::from));
    k.push(g.conv_bwd_weight_nhwc_kernel(s).map(String::from));
    k.push(g.conv_bn_eval_nhwc_bf16s_kernel(s).map(String::from));
    k.push(g.conv_fwd_stats_nhwc_bf16s_kernel(s).map(String::from));
    k.push(g.conv_bwd_data_nhwc_bf16s_kernel(s).map(String::from));
    k.push(g.conv_bwd_weight_nhwc_bf16s_kernel(s).map(String::from));
    k
}

/// The names at each limit: without one the deep kernels (no suffix), at 99 KiB the shallow
/// ones (but tf32's channels-last weight gradient, whose deep ring fits; the 128 x 128 `_s2`
/// at bf16 for any rows: no 64 x 256 ring fits there), at 64 KiB WMMA and no channels-last
/// kernel.
fn shallow_kernels_by_limit() {
    for (s, what) in shapes() {
        for p in [Precision::Tf32, Precision::Bf16] {
            let bf16 = p == Precision::Bf16;
            let ctx = format!("{what} at {p}");
            let nchw = |sfx: &str| {
                ["conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"]
                    .map(|k| Some(format!("{k}{sfx}")))
            };
            let bf16s = |ring: &str| {
                [
                    ("conv2d_fwd_bn_mma_nhwc_bf16s", s.c_out),
                    ("conv2d_fwd_stats_mma_nhwc_bf16s", s.c_out),
                    ("conv2d_bwd_data_mma_nhwc_bf16s", s.c_in),
                ]
                .map(|(k, rows)| {
                    bf16.then(|| {
                        let m64 = rows <= 64;
                        let sfx = match (m64, ring) {
                            (false, "deep") => "",
                            (true, "deep") => "_m64",
                            (false, _) => "_s4",
                            (true, _) => "_m64_s3",
                        };
                        format!("{k}{sfx}")
                    })
                })
            };
            let nhwc = |ring: &str| {
                [
                    ("conv2d_fwd_bn_mma_nhwc", s.c_out),
                    ("conv2d_fwd_stats_mma_nhwc", s.c_out),
                    ("conv2d_bwd_data_mma_nhwc", s.c_in),
                ]
                .map(|(k, rows)| {
                    let m64 = rows <= 64;
                    let sfx = match (m64, ring, bf16) {
                        (false, "deep", _) => "",
                        (true, "deep", _) => "_m64",
                        (true, _, false) => "_m64_s2",
                        _ => "_s2",
                    };
                    Some(format!("{k}_{p}{sfx}"))
                })
            };
            let nhwc_wgrad = |sfx: &str| Some(format!("conv2d_bwd_weight_mma_nhwc_{p}{sfx}"));
            let wgrad = |sfx: &str| bf16.then(|| format!("conv2d_bwd_weight_mma_nhwc_bf16s{sfx}"));
            let want = |n: [Option<String>; 3],
                        f: [Option<String>; 3],
                        fw: Option<String>,
                        b: [Option<String>; 3],
                        w: Option<String>| {
                n.into_iter()
                    .chain(f)
                    .chain([fw])
                    .chain(b)
                    .chain([w])
                    .collect::<Vec<_>>()
            };
            let deep = want(
                nchw(&format!("_mma_{p}")),
                nhwc("deep"),
                nhwc_wgrad(""),
                bf16s("deep"),
                wgrad(""),
            );
            let shallow = want(
                nchw(&format!("_mma_{p}_s2")),
                nhwc("shallow"),
                nhwc_wgrad(if bf16 { "_s2" } else { "" }),
                bf16s("shallow"),
                wgrad("_s5"),
            );
            let wmma = want(
                nchw(&format!("_{p}")),
                [None, None, None],
                None,
                [None, None, None],
                None,
            );
            assert_eq!(kernels(&at(p, None), &s), deep, "{ctx}: no limit");
            assert_eq!(kernels(&at(p, Some(SM86)), &s), shallow, "{ctx}: 99 KiB");
            assert_eq!(kernels(&at(p, Some(SM75)), &s), wmma, "{ctx}: 64 KiB");
            println!("{ctx}: 99 KiB {:?}", kernels(&at(p, Some(SM86)), &s));
        }
    }
}

/// The outputs of the ops that have a shallow ring, on `be` (the CPU for the reference): the
/// NCHW plain, eval (residual, ReLU) and training forwards (z and y), data and weight
/// gradients; the channels-last f32-storage eval forward, training forward, data and weight
/// gradients ([`nhwc_outputs`]); at bf16 (`bf16s`) the bf16-storage ones, unpacked
/// ([`bf16s_outputs`]).
fn outputs<B: Backend<T = f32>>(be: &B, d: &OpData, bf16s: bool) -> Vec<(&'static str, Vec<f32>)> {
    let s = &d.s;
    let bn = bn_of(s);
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let nan = |n: usize| up(&vec![f32::NAN; n]);
    let down = |b: &B::Buf| be.download(b).expect("download");
    let (x, w, dy, res) = (up(&d.x), up(&d.w), up(&d.dy), up(&d.residual));
    let [ga, bt, rm, rv] = [0, 1, 2, 3].map(|i| up(&d.bn[i]));
    let c = s.c_out;
    let mut out = Vec::new();
    let mut y = nan(s.y_len());
    be.conv2d_fwd(s, &x, &w, &mut y).expect("conv2d_fwd");
    out.push(("nchw fwd", down(&y)));
    let mut y = nan(s.y_len());
    be.conv2d_bn_eval_fwd(s, &bn, &x, &w, &ga, &bt, &rm, &rv, Some(&res), true, &mut y)
        .expect("conv2d_bn_eval_fwd");
    out.push(("nchw eval", down(&y)));
    let (mut rm2, mut rv2) = (up(&d.bn[2]), up(&d.bn[3]));
    let (mut sm, mut si) = (nan(c), nan(c));
    let (mut z, mut y) = (nan(s.y_len()), nan(s.y_len()));
    be.conv2d_bn_train_fwd(
        s,
        &bn,
        &x,
        &w,
        &ga,
        &bt,
        &mut rm2,
        &mut rv2,
        &mut sm,
        &mut si,
        &mut z,
        &mut y,
        Some(&res),
        true,
    )
    .expect("conv2d_bn_train_fwd");
    out.push(("nchw train z", down(&z)));
    out.push(("nchw train y", down(&y)));
    out.push(("nchw train running_var", down(&rv2)));
    let mut dx = nan(s.x_len());
    be.conv2d_bwd_data(s, &dy, &w, &mut dx)
        .expect("conv2d_bwd_data");
    out.push(("nchw bwd_data", down(&dx)));
    let mut dw = nan(s.w_len());
    be.conv2d_bwd_weight(s, &x, &dy, &mut dw)
        .expect("conv2d_bwd_weight");
    out.push(("nchw bwd_weight", down(&dw)));
    out.extend(nhwc_outputs(be, d));
    if !bf16s {
        return out;
    }
    out.extend(bf16s_outputs(be, d));
    out
}

fn data(s: Conv2d) -> OpData {
    OpData::new(s, "smem_99k")
}

/// Each op at 99 KiB (the shallow ring) equals the op without a limit (the deep ring) bit for
/// bit, and the CPU within the precision's tolerance (2x for bf16 storage, as
/// tests/cuda_conv_smem_limit.rs).
fn shallow_rings_match_deep_bit_for_bit() {
    let cpu = CpuBackend::<f32>::new();
    let (mut values, mut ops) = (0usize, 0usize);
    for (s, what) in shapes() {
        let d = data(s);
        for p in [Precision::Tf32, Precision::Bf16] {
            let bf16 = p == Precision::Bf16;
            let (deep, shallow) = (at(p, None), at(p, Some(SM86)));
            assert!(deep.conv_fwd_kernel(&s).ends_with(&format!("_mma_{p}")));
            assert!(shallow.conv_fwd_kernel(&s).ends_with("_s2"), "{what} {p}");
            let (a, b) = (outputs(&deep, &d, bf16), outputs(&shallow, &d, bf16));
            let want = outputs(&cpu, &d, bf16);
            let tol = p.tolerance().expect("a reduced precision");
            assert_eq!((a.len(), b.len()), (want.len(), want.len()));
            for (((name, va), (_, vb)), (_, vc)) in a.iter().zip(&b).zip(&want) {
                let same = bits(va)
                    .iter()
                    .zip(bits(vb))
                    .filter(|(x, y)| **x == *y)
                    .count();
                assert_eq!(va.len(), vb.len());
                assert!(vb.iter().all(|v| v.is_finite()), "{what} {p} {name}");
                assert_eq!(
                    same,
                    va.len(),
                    "{what} {p}: {name}: {same} of {} values equal bit for bit",
                    va.len()
                );
                let tol = if name.starts_with("bf16s") {
                    2.0 * tol
                } else {
                    tol
                };
                let e = rel_err(vb, vc);
                assert!(e <= tol, "{what} {p}: {name} rel err {e:.3e} > {tol:.0e}");
                println!(
                    "{what} {p}: {name}: {same} / {} bit for bit, vs CPU {e:.3e}",
                    va.len()
                );
                values += same;
                ops += 1;
            }
        }
    }
    println!("{ops} outputs, {values} values: 99 KiB equals the deep ring bit for bit");
}

fn tiny_bottleneck() -> ModelConfig {
    ModelConfig {
        block: BlockKind::Bottleneck,
        layers: vec![1, 2, 1],
        base_width: 8,
        ..ModelConfig::tiny()
    }
}

/// A model of `cfg` (seed 13, untrained: its initial running statistics) in eval mode on `be`.
fn eval_net(be: CudaBackend, cfg: &ModelConfig) -> IchNet<CudaBackend> {
    let mut net = IchNet::new(be, cfg.clone(), 13).expect("net");
    net.set_train(false);
    net
}

/// The features (f32) and the CAM pass's logits, CAM and normalised CAM of `net` on `x`.
fn eval_outputs(
    net: &mut IchNet<CudaBackend>,
    x: &[f32],
    (n, h, w): (usize, usize, usize),
) -> Vec<Vec<f32>> {
    let f = net.stage2_features(x, n, h, w).expect("features");
    let xb = net.backend().upload(x).expect("upload");
    let mut bufs: Option<CamPassBufs<CudaBackend>> = None;
    net.stage2_cam_pass(&xb, n, h, w, &mut bufs)
        .expect("the CAM pass");
    let b = bufs.expect("bufs");
    let d = |v: &CudaSlice<f32>| net.backend().download(v).expect("download");
    vec![
        f.data.iter().map(|&v| v as f32).collect(),
        d(&b.logits),
        d(&b.cam),
        d(&b.norm),
    ]
}

/// The eval settings: bf16 in bf16 channels-last storage (`ichcam segment`'s path; default
/// route), NCHW at tf32 and bf16 (route `Always`: the `_s2` kernels), and channels-last f32
/// storage at tf32 and bf16 (default route).
const EVAL_SETTINGS: [(Precision, LayoutChoice, StorageChoice); 5] = [
    (Precision::Bf16, LayoutChoice::Nhwc, StorageChoice::Bf16),
    (Precision::Tf32, LayoutChoice::Nchw, StorageChoice::F32),
    (Precision::Bf16, LayoutChoice::Nchw, StorageChoice::F32),
    (Precision::Tf32, LayoutChoice::Nhwc, StorageChoice::F32),
    (Precision::Bf16, LayoutChoice::Nhwc, StorageChoice::F32),
];

/// The eval input's (n, h, w) and values (3 channels).
fn eval_input() -> ((usize, usize, usize), Vec<f32>) {
    let (n, h, w) = (3usize, 40usize, 36usize);
    let mut rng = SplitMix64::fresh("smem-99k-model");
    ((n, h, w), rng.vec_f32(n * 3 * h * w, -1.0, 1.0))
}

/// A model of `cfg` in eval mode at `p`, eval layout and storage as given, with the limit
/// `limit` (None: the device's).
fn eval_model(
    cfg: &ModelConfig,
    (p, layout, storage): (Precision, LayoutChoice, StorageChoice),
    limit: Option<u32>,
) -> IchNet<CudaBackend> {
    let mut be = gpu_at(p);
    be.set_eval_layout(layout);
    be.set_eval_storage(storage);
    if layout == LayoutChoice::Nchw {
        be.set_mma_route(MmaRoute::Always);
    }
    if let Some(l) = limit {
        be.limit_shared_memory_for_tests(l).expect("99 KiB");
    }
    eval_net(be, cfg)
}

/// The eval passes of small models at 99 KiB equal the unlimited ones bit for bit, in each
/// of [`EVAL_SETTINGS`] (that they run the shallow kernels: [`shallow_kernels_launch`]).
fn eval_passes_at_99k_match_unlimited() {
    let (dims, x) = eval_input();
    for cfg in [tiny_bottleneck(), ModelConfig::tiny()] {
        for setting in EVAL_SETTINGS {
            let (p, layout, storage) = setting;
            let mut a = eval_model(&cfg, setting, None);
            let mut b = eval_model(&cfg, setting, Some(SM86));
            let what = format!(
                "{:?} {:?} {p} {layout:?} {storage:?}",
                cfg.block, cfg.layers
            );
            let (oa, ob) = (
                eval_outputs(&mut a, &x, dims),
                eval_outputs(&mut b, &x, dims),
            );
            for (name, va, vb) in ["features", "logits", "CAM", "normalised CAM"]
                .iter()
                .zip(&oa)
                .zip(&ob)
                .map(|((n, a), b)| (n, a, b))
            {
                assert_eq!(va.len(), vb.len());
                let same = va
                    .iter()
                    .zip(vb)
                    .filter(|(x, y)| x.to_bits() == y.to_bits())
                    .count();
                println!("{what}: {name}: {same} / {} bit for bit", va.len());
                assert_eq!(same, va.len(), "{what}: {name}");
            }
        }
    }
}

const CHILD: &str = "ICHCAM_SMEM_99K_TEST_CHILD";

/// The layout-change kernels (`channels.cu`'s transposes, to and from bf16 too): what the
/// channels-last ops ran around the NCHW ones where no channels-last kernel fitted.
const LAYOUT_CHANGES: [&str; 3] = [
    "transpose_tiles",
    "transpose_tiles_to_bf16",
    "transpose_tiles_from_bf16",
];

/// Launches of `kernel` in the emulator's profile (`EMU_PROFILE=1`, printed at exit).
fn launches(profile: &str, kernel: &str) -> u64 {
    profile
        .lines()
        .filter_map(|l| {
            let mut t = l.split_whitespace();
            if t.next() != Some(kernel) {
                return None;
            }
            t.nth(1).and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// The launches of the kernel families with a shallow ring in a child process's emulator
/// profile (`EMU_PROFILE=1`): (deep kernel, its launches, shallow kernel, its launches), the
/// NCHW `mma.sync` ones at bf16 and tf32, then the bf16-storage ones of both tiles, then the
/// bf16-storage weight gradient, then the f32-storage channels-last ones.
fn family_launches(se: &str) -> Vec<(String, u64, String, u64)> {
    let mut v = Vec::new();
    for p in ["bf16", "tf32"] {
        for k in [
            "conv2d_fwd_mma",
            "conv2d_fwd_bn_mma",
            "conv2d_fwd_stats_mma",
            "conv2d_bwd_data_mma",
            "conv2d_bwd_weight_mma",
        ] {
            v.push((format!("{k}_{p}"), format!("{k}_{p}_s2")));
        }
    }
    for k in [
        "conv2d_fwd_bn_mma_nhwc_bf16s",
        "conv2d_fwd_stats_mma_nhwc_bf16s",
        "conv2d_bwd_data_mma_nhwc_bf16s",
    ] {
        for (deep, shallow) in [("", "_s4"), ("_m64", "_m64_s3")] {
            v.push((format!("{k}{deep}"), format!("{k}{shallow}")));
        }
    }
    let k = "conv2d_bwd_weight_mma_nhwc_bf16s";
    v.push((k.to_string(), format!("{k}_s5")));
    // The f32-storage channels-last ones (from index 17): both tiles at both precisions, the
    // 64 x 256 deep kernels at bf16 paired with the 128 x 128 `_s2` ones (no 64 x 256 ring
    // fits 99 KiB at bf16: the 128 x 128 one runs any rows there), then the bf16 weight
    // gradient (tf32's runs its deep ring at 99 KiB).
    for p in ["bf16", "tf32"] {
        for k in [
            "conv2d_fwd_bn_mma_nhwc",
            "conv2d_fwd_stats_mma_nhwc",
            "conv2d_bwd_data_mma_nhwc",
        ] {
            v.push((format!("{k}_{p}"), format!("{k}_{p}_s2")));
            let m64_s2 = if p == "tf32" { "_m64_s2" } else { "_s2" };
            v.push((format!("{k}_{p}_m64"), format!("{k}_{p}{m64_s2}")));
        }
    }
    let k = "conv2d_bwd_weight_mma_nhwc_bf16";
    v.push((k.to_string(), format!("{k}_s2")));
    v.into_iter()
        .map(|(d, s)| {
            let (nd, ns) = (launches(se, &d), launches(se, &s));
            (d, nd, s, ns)
        })
        .collect()
}

/// The child's stderr (the emulator's profile) after running this test with `CHILD` = `mode`.
fn child(mode: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "shallow_kernels_launch",
            "--exact",
            "--include-ignored",
            "--nocapture",
        ])
        .env(CHILD, mode)
        .env("EMU_PROFILE", "1")
        .output()
        .expect("run the child");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the child ({mode}) failed:\n{so}\n{se}"
    );
    assert!(
        so.contains("1 passed"),
        "the child ({mode}) ran no test:\n{so}"
    );
    se.into_owned()
}

/// Which kernels run at 99 KiB (emulator only: its profile counts launches by name), in child
/// processes: the ops of [`shapes`] at bf16 and tf32 launch every shallow kernel at least once
/// and no deep `mma.sync` one of those families; the eval passes of
/// [`eval_passes_at_99k_match_unlimited`] no deep one either, and shallow ones of each family
/// kind (NCHW at bf16 and at tf32, bf16 storage).
fn shallow_kernels_launch() {
    match std::env::var(CHILD).as_deref() {
        Ok("ops") => {
            for (s, _) in shapes() {
                let d = data(s);
                for p in [Precision::Tf32, Precision::Bf16] {
                    outputs(&at(p, Some(SM86)), &d, p == Precision::Bf16);
                }
            }
            return;
        }
        Ok("model") => {
            let (dims, x) = eval_input();
            for cfg in [tiny_bottleneck(), ModelConfig::tiny()] {
                for setting in EVAL_SETTINGS {
                    eval_outputs(&mut eval_model(&cfg, setting, Some(SM86)), &x, dims);
                }
            }
            return;
        }
        _ => {}
    }
    if !emulated() {
        println!("not on the emulator: no launch profile to read (the names are asserted above)");
        return;
    }
    let se = child("ops");
    let layout: u64 = LAYOUT_CHANGES.iter().map(|k| launches(&se, k)).sum();
    assert_eq!(layout, 0, "ops: layout changes launched:\n{se}");
    let mut seen = Vec::new();
    for (deep, nd, shallow, ns) in family_launches(&se) {
        assert!(
            nd == 0 && ns > 0,
            "ops: {deep}: {nd} launches, {shallow}: {ns}:\n{se}"
        );
        seen.push(format!("{shallow} {ns}"));
    }
    println!(
        "ops' launches at 99 KiB (emulator profile): {}",
        seen.join(", ")
    );
    let se = child("model");
    let f = family_launches(&se);
    for (deep, nd, ..) in &f {
        assert_eq!(*nd, 0, "eval passes: {deep} launched:\n{se}");
    }
    let sum = |r: std::ops::Range<usize>| f[r].iter().map(|l| l.3).sum::<u64>();
    let (bf16, tf32, bf16s) = (sum(0..5), sum(5..10), sum(10..17));
    // Channels-last f32 storage: the 128 x 128 `_s2` at bf16 (once: the 64 x 256 deep kernels'
    // pairs name it again) and both tiles at tf32.
    let (nhwc_bf16, nhwc_tf32) = (
        f[17..23].iter().step_by(2).map(|l| l.3).sum::<u64>(),
        f[23..29].iter().map(|l| l.3).sum::<u64>(),
    );
    assert!(
        bf16 > 0 && tf32 > 0 && bf16s > 0 && nhwc_bf16 > 0 && nhwc_tf32 > 0,
        "eval passes' shallow launches: NCHW bf16 {bf16}, tf32 {tf32}, bf16 storage {bf16s}, channels-last f32 storage bf16 {nhwc_bf16}, tf32 {nhwc_tf32}:\n{se}"
    );
    println!(
        "eval passes' launches at 99 KiB: NCHW _s2 bf16 {bf16}, tf32 {tf32}; bf16 storage _s4 / _m64_s3 {bf16s}; channels-last f32 storage _s2 bf16 {nhwc_bf16}, _s2 / _m64_s2 tf32 {nhwc_tf32}; deep 0"
    );
}
