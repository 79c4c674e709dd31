//! The tensor-core convolutions chosen by the device's shared memory per block
//! (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`, `DeviceInfo::shared_memory_per_block`;
//! conv.rs's `TcKernel` table): on a device that gives a block less than a kernel needs (sm_80:
//! 163 KiB, sm_86 / sm_89: 99 KiB, sm_75: 64 KiB), a smaller tile, a shallower cp.async ring
//! or the fallback (the WMMA
//! kernels for NCHW, layout changes / conversions around them for channels-last) runs instead
//! of a launch that would fail.
//!
//! The emulated driver is an H100 (227 KiB) and refuses only above that, so the limit is
//! lowered through the test hook `CudaBackend::limit_shared_memory_for_tests`; the emulator
//! does not enforce the lowered limit: the tests assert the choice (the kernel-name
//! diagnostics, against the sizes written out here) and the results, and the backend's own
//! launch guard (`smem_dynamic`) errors on a kernel that does not fit.
//!
//! - the table's static shared memory per kernel family equals what the driver reports for the
//!   compiled kernel (`CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES`; the dynamic sizes are pinned by the
//!   kernels' static_asserts);
//! - the hook: the device's limit by default (232,448 bytes on the emulator); never raised
//!   above it, nor below 48 KiB (errors, the limit unchanged);
//! - the kernel each op takes at tf32 and bf16 at 227 / 163 / 150 / 128 / 112 / 99 / 64 KiB
//!   (each kernel's need between two of them): NCHW forward
//!   and gradients (route `Always`), the channels-last eval forward, training forward, data
//!   and weight gradients on f32 and bf16 storage, the opted-in wgmma eval forward;
//! - at 99 and 64 KiB, each of those ops (NCHW eval forward, data and weight gradient;
//!   channels-last eval forward, training forward, data and weight gradient; the same four
//!   on bf16 storage at bf16) runs and matches the CPU reference within the precision's
//!   tolerance (bf16 storage: the CPU's bf16-storage ops, within 2x the bf16 tolerance); at
//!   99 KiB the NCHW ones, the channels-last f32-storage ones and the bf16-storage ones on
//!   their shallow rings (`_s2`; `_s4` / `_m64_s3`, `_s5`; but for tf32's channels-last weight
//!   gradient, whose deep ring fits; tests/cuda_conv_smem_99k.rs compares them with the deep
//!   rings bit for bit).
//!
//! Runs on a GPU or on the emulated driver
//! (`scripts/cuda-emu.sh run target/release/deps/cuda_conv_smem_limit-* --include-ignored`);
//! without a device the device tests are ignored.

mod common;
use common::cuda::{device, emulated, gpu_at, rel_err};
use common::nhwc::{bf16s_outputs, bn_of, nhwc_outputs, OpData};
use common::shapes::conv;

use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::{CudaBackend, MmaRoute};
use ichcam::engine::{Backend, Conv2d, Precision};

fn main() {
    common::cuda::main_with_threads(
        vec![
            device("hook_lowers_only", hook_lowers_only),
            device("static_sizes_match_the_compiled_kernels", || {
                static_sizes_match_the_compiled_kernels()
            }),
            device("kernels_by_limit", kernels_by_limit),
            device(
                "ops_match_cpu_at_lowered_limits",
                ops_match_cpu_at_lowered_limits,
            ),
        ],
        1,
    )
}

const KIB: u32 = 1024;
/// sm_80 / sm_87's per-block limit (163 KiB).
const SM80: u32 = 166_912;
/// sm_86 / sm_89's (99 KiB).
const SM86: u32 = 101_376;
/// sm_75's (64 KiB).
const SM75: u32 = 65_536;

fn hook_lowers_only() {
    let mut g = gpu_at(Precision::Bf16);
    let device = g.info().shared_memory_per_block;
    assert_eq!(g.shared_memory_per_block(), device);
    if emulated() {
        assert_eq!(device, 232_448, "the emulator is an H100");
    }
    assert!(g.limit_shared_memory_for_tests(device + 1).is_err());
    assert!(g.limit_shared_memory_for_tests(48 * KIB - 1).is_err());
    assert_eq!(
        g.shared_memory_per_block(),
        device,
        "unchanged by a refusal"
    );
    g.limit_shared_memory_for_tests(SM86).expect("99 KiB");
    assert_eq!(g.shared_memory_per_block(), SM86);
    g.limit_shared_memory_for_tests(48 * KIB).expect("48 KiB");
    g.limit_shared_memory_for_tests(device)
        .expect("back to the device's");
    // A backend made afterwards has the device's.
    assert_eq!(gpu_at(Precision::Tf32).shared_memory_per_block(), device);
}

/// The table's static shared memory (the pixel tables, the WMMA stages) is what the driver
/// reports for the compiled kernels.
fn static_sizes_match_the_compiled_kernels() {
    let g = gpu_at(Precision::Bf16);
    let sizes = g.tc_static_shared_memory().expect("the kernels load");
    assert!(sizes.len() >= 14);
    for (name, driver, table) in sizes {
        eprintln!("{name}: {driver} bytes static (table {table})");
        assert_eq!(driver, table, "{name}");
    }
}

/// c_out 48 and c_in 16 (both at most 64: the 64 x 256 tile where it fits; c_in % 8 == 0: the
/// wgmma kernel's shapes).
fn small() -> Conv2d {
    conv(2, 16, 12, 10, 48, 3, 1, 1)
}

/// The backend at `p` and limit `limit` (None: the device's), route `r`.
fn at(p: Precision, limit: Option<u32>, r: MmaRoute) -> CudaBackend {
    let mut g = gpu_at(p);
    g.set_mma_route(r);
    if let Some(l) = limit {
        g.limit_shared_memory_for_tests(l)
            .expect("a limit below the device's");
    }
    g
}

/// Whether a kernel needing `total` bytes (dynamic + static: conv.rs's table, pinned by
/// conv_tc.cu's and conv_wgmma.cu's static_asserts) fits `limit`.
fn fits(total: u32, limit: u32) -> bool {
    total <= limit
}

fn kernels_by_limit() {
    let s = small();
    for p in [Precision::Tf32, Precision::Bf16] {
        let bf16 = p == Precision::Bf16;
        let device = gpu_at(p).info().shared_memory_per_block;
        for limit in [device, SM80, 150 * KIB, 128 * KIB, 112 * KIB, SM86, SM75] {
            let mut g = at(p, Some(limit), MmaRoute::Always);
            let ctx = format!("{p} at {limit} bytes");
            // NCHW: the 128x128 mma kernels (122 / 103.5 KiB), else their 2-stage ring
            // (`_s2`: 87.5 / 69 KiB), else the 64x64 WMMA ones.
            let (nchw, nchw_s2) = if bf16 {
                (124_928, 89_600)
            } else {
                (105_984, 70_656)
            };
            let want: [String; 3] =
                ["conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"].map(|k| {
                    if fits(nchw, limit) {
                        format!("{k}_mma_{p}")
                    } else if fits(nchw_s2, limit) {
                        format!("{k}_mma_{p}_s2")
                    } else {
                        format!("{k}_{p}")
                    }
                });
            assert_eq!(g.conv_kernels(&s).map(String::from), want, "{ctx}");
            // Channels-last, f32 storage: 64 x 256 (bf16 164 KiB, tf32 139 KiB), else
            // 128 x 128 (130 / 110 KiB), else their 2-stage rings (`_m64_s2` at tf32 94 KiB, none
            // at bf16; `_s2` 94 / 74 KiB), else none (layout changes around NCHW).
            let (m64, square, m64_s2, square_s2) = if bf16 {
                (167_936, 133_120, None, 96_256)
            } else {
                (142_336, 112_640, Some(96_256), 75_776)
            };
            let tile = if fits(m64, limit) {
                Some("_m64")
            } else if fits(square, limit) {
                Some("")
            } else if m64_s2.is_some_and(|m| fits(m, limit)) {
                Some("_m64_s2")
            } else if fits(square_s2, limit) {
                Some("_s2")
            } else {
                None
            };
            let name = |k: &str| tile.map(|t| format!("{k}_{p}{t}"));
            assert_eq!(
                g.conv_bn_eval_nhwc_kernel(&s).map(String::from),
                name("conv2d_fwd_bn_mma_nhwc"),
                "{ctx}"
            );
            assert_eq!(
                g.conv_fwd_stats_nhwc_kernel(&s).map(String::from),
                name("conv2d_fwd_stats_mma_nhwc"),
                "{ctx}"
            );
            assert_eq!(
                g.conv_bwd_data_nhwc_kernel(&s).map(String::from),
                name("conv2d_bwd_data_mma_nhwc"),
                "{ctx}"
            );
            // The weight gradient: 116 KiB at bf16, exactly 99 KiB at tf32; else at bf16 its
            // 2-stage ring (`_s2`, 83 KiB).
            let wgrad = if bf16 { 118_784 } else { 101_376 };
            let want = if fits(wgrad, limit) {
                Some(format!("conv2d_bwd_weight_mma_nhwc_{p}"))
            } else if bf16 && fits(84_992, limit) {
                Some("conv2d_bwd_weight_mma_nhwc_bf16_s2".to_string())
            } else {
                None
            };
            assert_eq!(
                g.conv_bwd_weight_nhwc_kernel(&s).map(String::from),
                want,
                "{ctx}"
            );
            // bf16 storage (bf16 only): 64 x 256 154 KiB, 128 x 128 122 KiB, else their
            // shallow rings (`_m64_s3` 79 KiB; `_s4` 82 KiB for more than 64 rows); its weight
            // gradient 102 KiB, else its shallow ring (`_s5` 85 KiB); the wgmma kernel 131 KiB.
            let tile = if !bf16 {
                None
            } else if fits(157_696, limit) {
                Some("_m64")
            } else if fits(124_928, limit) {
                Some("")
            } else if fits(80_896, limit) {
                Some("_m64_s3")
            } else {
                None
            };
            let name = |k: &str| tile.map(|t| format!("{k}_bf16s{t}"));
            assert_eq!(
                g.conv_bn_eval_nhwc_bf16s_kernel(&s).map(String::from),
                name("conv2d_fwd_bn_mma_nhwc"),
                "{ctx}"
            );
            assert_eq!(
                g.conv_fwd_stats_nhwc_bf16s_kernel(&s).map(String::from),
                name("conv2d_fwd_stats_mma_nhwc"),
                "{ctx}"
            );
            assert_eq!(
                g.conv_bwd_data_nhwc_bf16s_kernel(&s).map(String::from),
                name("conv2d_bwd_data_mma_nhwc"),
                "{ctx}"
            );
            let wgrad_bf16s = if !bf16 {
                None
            } else if fits(104_448, limit) {
                Some("conv2d_bwd_weight_mma_nhwc_bf16s")
            } else if fits(87_040, limit) {
                Some("conv2d_bwd_weight_mma_nhwc_bf16s_s5")
            } else {
                None
            };
            assert_eq!(
                g.conv_bwd_weight_nhwc_bf16s_kernel(&s),
                wgrad_bf16s,
                "{ctx}"
            );
            g.set_wgmma(true);
            let hopper = g.info().compute_capability == (9, 0);
            assert_eq!(
                g.conv_bn_eval_nhwc_bf16s_wgmma_kernel(&s),
                (hopper && tile.is_some() && fits(134_144, limit))
                    .then_some("conv2d_fwd_bn_wgmma_n64"),
                "{ctx}"
            );
        }
    }
}

/// Every op's outputs on `be` for the case's data (f32 storage: NCHW, then channels-last,
/// [`nhwc_outputs`]; then at bf16 the bf16-storage ops, [`bf16s_outputs`]).
fn outputs<B: Backend<T = f32>>(be: &B, d: &OpData, bf16s: bool) -> Vec<(&'static str, Vec<f32>)> {
    let s = &d.s;
    let bn = bn_of(s);
    let up = |v: &[f32]| be.upload(v).expect("upload");
    let nan = |n: usize| up(&vec![f32::NAN; n]);
    let down = |b: &B::Buf| be.download(b).expect("download");
    let (x, w, dy, res) = (up(&d.x), up(&d.w), up(&d.dy), up(&d.residual));
    let [ga, bt, rm, rv] = [0, 1, 2, 3].map(|i| up(&d.bn[i]));
    let mut out = Vec::new();
    // NCHW (x, dy and the residual read as NCHW here: any data will do).
    let mut y = nan(s.y_len());
    be.conv2d_bn_eval_fwd(s, &bn, &x, &w, &ga, &bt, &rm, &rv, Some(&res), true, &mut y)
        .expect("conv2d_bn_eval_fwd");
    out.push(("nchw eval", down(&y)));
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

fn ops_match_cpu_at_lowered_limits() {
    // A 3x3 stride-2 layer of 16 -> 48 channels (the 64 x 256 tile's rows where it fits) and
    // a 1x1 of 96 -> 80 (128 x 128).
    for s in [
        conv(2, 16, 13, 11, 48, 3, 2, 1),
        conv(2, 96, 9, 8, 80, 1, 1, 0),
    ] {
        let d = OpData::new(s, "smem_limit");
        let cpu = CpuBackend::<f32>::new();
        for p in [Precision::Tf32, Precision::Bf16] {
            let bf16 = p == Precision::Bf16;
            let want = outputs(&cpu, &d, bf16);
            let tol = p.tolerance().expect("a reduced precision");
            for limit in [SM86, SM75] {
                let g = at(p, Some(limit), MmaRoute::Always);
                // At 99 KiB the shallow rings (NCHW and f32-storage channels-last `_s2`, bf16
                // storage `_s4` / `_m64_s3` / `_s5`) and at tf32 the channels-last weight
                // gradient's deep ring; at 64 KiB nothing native.
                assert_eq!(
                    g.conv_kernels(&s)[0].contains("mma"),
                    limit == SM86,
                    "{p} {limit}"
                );
                assert_eq!(
                    g.conv_bn_eval_nhwc_bf16s_kernel(&s).is_some(),
                    bf16 && limit == SM86,
                    "{p} {limit}"
                );
                assert_eq!(
                    g.conv_bwd_weight_nhwc_bf16s_kernel(&s).is_some(),
                    bf16 && limit == SM86,
                    "{p} {limit}"
                );
                assert_eq!(
                    g.conv_bn_eval_nhwc_kernel(&s).is_some(),
                    limit == SM86,
                    "{p} {limit}"
                );
                assert_eq!(
                    g.conv_bwd_weight_nhwc_kernel(&s).is_some(),
                    limit == SM86,
                    "{p} {limit}"
                );
                let got = outputs(&g, &d, bf16);
                assert_eq!(got.len(), want.len());
                for ((name, gv), (_, cv)) in got.iter().zip(&want) {
                    let e = rel_err(gv, cv);
                    let tol = if name.starts_with("bf16s") {
                        2.0 * tol
                    } else {
                        tol
                    };
                    eprintln!("{s:?} {p} limit {limit}: {name} rel err {e:.3e}");
                    assert!(
                        e <= tol,
                        "{s:?} {p} limit {limit}: {name} rel err {e:.3e} > {tol:.0e}"
                    );
                    // The reduced path ran (not an f32 fallback), but for the bf16-storage
                    // weight gradient, whose operands are both bf16 already: exact products,
                    // f32 sums, which may well equal the CPU's.
                    let exact_ok = name.contains("running") || *name == "bf16s bwd_weight";
                    assert!(
                        e > 0.0 || exact_ok,
                        "{p} {limit}: {name}: the reduced path ran"
                    );
                }
            }
        }
    }
}
