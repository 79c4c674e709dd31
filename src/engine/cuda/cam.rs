//! Class activation maps on the device (`kernels/cam.cu`, mirroring `cpu/cam.rs`): the
//! channel-weighted sum of feature maps, Grad-CAM (per-channel gradient means, then the
//! weighted sum and a ReLU), the bilinear resize and the per-row min-max normalisation,
//! and the vanilla CAM, its resize and normalisation fused in one kernel (`cam_fused`).

use cudarc::driver::CudaSlice;

use super::launch::{blocks, dim, grid, int_args, kernels};
use super::CudaBackend;
use crate::engine::shapes::{Maps, Resize};
use crate::engine::{EngineError, Result};

kernels!("cam" {
    weight: "cam_weight",
    row_mean: "row_mean",
    gradcam_combine: "gradcam_combine",
    upsample: "upsample_bilinear",
    minmax: "minmax_normalize",
    fused: "cam_fused",
});

/// The most feature-map values `cam_fused` holds in shared memory (48 KiB less its own
/// reduction arrays): larger maps take the three separate kernels.
const FUSED_MAX_HW: usize = (48 * 1024 - 256) / 4;

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.cam.get(|| Kernels::load(be.modules()))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn cam_weight(
    be: &CudaBackend,
    n: usize,
    c: usize,
    hw: usize,
    features: &CudaSlice<f32>,
    weights: &CudaSlice<f32>,
    cam: &mut CudaSlice<f32>,
) -> Result<()> {
    let maps = Maps { n, c, hw };
    if n * hw == 0 {
        return Ok(());
    }
    dim(maps.len())?;
    let a = int_args([n, c, hw])?;
    // SAFETY: features hold n*c*hw values, weights c and cam n*hw (checked).
    unsafe {
        kernels(be)?
            .weight
            .on(be.stream())
            .arg(features)
            .arg(weights)
            .arg(cam)
            .ints(&a)
            .launch(grid(n * hw))
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn gradcam(
    be: &CudaBackend,
    n: usize,
    c: usize,
    hw: usize,
    features: &CudaSlice<f32>,
    grads: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "gradcam";
    let maps = Maps { n, c, hw };
    if n * hw == 0 {
        return Ok(());
    }
    dim(maps.len())?;
    let k = kernels(be)?;
    let mut alpha = be.alloc::<f32>(n * c)?;
    if n * c > 0 {
        // One warp per (image, channel) row.
        let cfg = blocks(OP, ((n * c * 32).div_ceil(256), 1, 1), 256)?;
        let a = int_args([n * c, hw])?;
        // SAFETY: grads hold n*c rows of hw values, alpha n*c.
        unsafe {
            k.row_mean
                .on(be.stream())
                .arg(grads)
                .arg(&mut alpha)
                .ints(&a)
                .launch(cfg)?;
        }
    }
    let a = int_args([n, c, hw])?;
    // SAFETY: features hold n*c*hw values, alpha n*c and out n*hw (checked).
    unsafe {
        k.gradcam_combine
            .on(be.stream())
            .arg(features)
            .arg(&alpha)
            .arg(out)
            .ints(&a)
            .launch(grid(n * hw))
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn upsample_bilinear(
    be: &CudaBackend,
    n: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let r = Resize { n, h, w, oh, ow };
    if !r.has_output() {
        return Ok(());
    }
    int_args([n * h * w, n * oh * ow])?;
    let a = int_args([n, h, w, oh, ow])?;
    // SAFETY: x holds n*h*w values and y n*oh*ow (checked).
    unsafe {
        kernels(be)?
            .upsample
            .on(be.stream())
            .arg(x)
            .arg(y)
            .ints(&a)
            .launch(grid(n * oh * ow))
    }
}

pub(crate) fn minmax_normalize(
    be: &CudaBackend,
    n: usize,
    len: usize,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "minmax_normalize";
    if n * len == 0 {
        return Ok(());
    }
    if n > i32::MAX as usize {
        return Err(EngineError::Shape {
            op: OP,
            detail: format!("{n} rows exceed the grid limit"),
        });
    }
    dim(n * len)?;
    // One block per row.
    let cfg = blocks(OP, (n, 1, 1), 256)?;
    let a = int_args([n, len])?;
    // SAFETY: x and y hold n*len values (checked).
    unsafe {
        kernels(be)?
            .minmax
            .on(be.stream())
            .arg(x)
            .arg(y)
            .ints(&a)
            .launch(cfg)
    }
}

/// The vanilla CAM at feature resolution into `cam` and, resized to `oh x ow` and min-max
/// normalised per slice, into `norm`: one `cam_fused` launch (one block per slice) when the
/// feature map fits in shared memory, else the three kernels with an arena scratch buffer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cam_normalized(
    be: &CudaBackend,
    n: usize,
    c: usize,
    fh: usize,
    fw: usize,
    oh: usize,
    ow: usize,
    features: &CudaSlice<f32>,
    weights: &CudaSlice<f32>,
    cam: &mut CudaSlice<f32>,
    norm: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "cam_normalized";
    let hw = fh * fw;
    let maps = Maps { n, c, hw };
    let r = Resize {
        n,
        h: fh,
        w: fw,
        oh,
        ow,
    };
    if n * hw == 0 && !r.has_output() {
        return Ok(());
    }
    if hw > FUSED_MAX_HW || n * hw == 0 || !r.has_output() {
        cam_weight(be, n, c, hw, features, weights, cam)?;
        let mut up = be.take_scratch(n * oh * ow)?;
        let out = upsample_bilinear(be, n, fh, fw, oh, ow, cam, &mut up)
            .and_then(|()| minmax_normalize(be, n, oh * ow, &up, norm));
        be.give_scratch(up);
        return out;
    }
    dim(maps.len())?;
    dim(n * oh * ow)?;
    let mut cfg = blocks(OP, (n, 1, 1), 256)?;
    cfg.shared_mem_bytes = (hw * 4) as u32;
    let a = int_args([n, c, fh, fw, oh, ow])?;
    // SAFETY: features hold n*c*fh*fw values, weights c, cam n*fh*fw and norm n*oh*ow
    // (checked by the trait); one block per slice with fh*fw floats of dynamic shared memory.
    unsafe {
        kernels(be)?
            .fused
            .on(be.stream())
            .arg(features)
            .arg(weights)
            .arg(cam)
            .arg(norm)
            .ints(&a)
            .launch(cfg)
    }
}
