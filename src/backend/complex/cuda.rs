//! Launchers of kernels/complex.cu.

use crate::backend::gpu::{check_len, elementwise_config, Gpu};
use crate::backend::kernels;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// y = z p (or z conj(p)); z, y [P, H, W, 2], p [H, W, 2].
pub(super) fn complex_mul(gpu: &Gpu, z: &Tensor, p: &Tensor, conj: bool, y: &mut Tensor) -> Result<()> {
    const OP: &str = "complex_mul_f32";
    let hw = p.numel() / 2;
    let (z, p, y) = (z.cuda()?, p.cuda()?, y.cuda_mut()?);
    let n = z.len() / 2;
    check_len(OP, "y", y, z.len())?;
    check_len(OP, "p", p, 2 * hw)?;
    if hw == 0 || n % hw != 0 {
        return Err(Error::invalid(OP, format!("{n} complex elements are not whole planes of {hw}")));
    }
    let (hw, conj) = (hw as i64, conj as i32);
    let cfg = elementwise_config(n);
    let n = n as i64;
    // SAFETY: lengths checked above.
    unsafe { kernels::complex_mul_f32(gpu, cfg, z, p, y, n, hw, conj) }
}

/// y = |z| (`angle` false) or arg z; z [n, 2], y [n].
fn complex_unary(gpu: &Gpu, z: &Tensor, angle: bool, y: &mut Tensor) -> Result<()> {
    let (z, y) = (z.cuda()?, y.cuda_mut()?);
    let (cfg, n) = (elementwise_config(y.len()), y.len() as i64);
    check_len(if angle { "complex_angle_f32" } else { "complex_abs_f32" }, "z", z, 2 * y.len())?;
    // SAFETY: z holds 2n floats, y n.
    unsafe {
        if angle {
            kernels::complex_angle_f32(gpu, cfg, z, y, n)
        } else {
            kernels::complex_abs_f32(gpu, cfg, z, y, n)
        }
    }
}

/// dz from dy of |z| (`angle` false) or arg z; z, dz [n, 2], dy [n].
fn complex_unary_bwd(gpu: &Gpu, z: &Tensor, dy: &Tensor, angle: bool, dz: &mut Tensor) -> Result<()> {
    let (z, dy, dz) = (z.cuda()?, dy.cuda()?, dz.cuda_mut()?);
    let name = if angle { "complex_angle_bwd_f32" } else { "complex_abs_bwd_f32" };
    check_len(name, "z", z, 2 * dy.len())?;
    check_len(name, "dz", dz, 2 * dy.len())?;
    let (cfg, n) = (elementwise_config(dy.len()), dy.len() as i64);
    // SAFETY: z and dz hold 2n floats, dy n.
    unsafe {
        if angle {
            kernels::complex_angle_bwd_f32(gpu, cfg, z, dy, dz, n)
        } else {
            kernels::complex_abs_bwd_f32(gpu, cfg, z, dy, dz, n)
        }
    }
}

/// y = |z|.
pub(super) fn complex_abs(gpu: &Gpu, z: &Tensor, y: &mut Tensor) -> Result<()> {
    complex_unary(gpu, z, false, y)
}

/// y = arg z.
pub(super) fn complex_angle(gpu: &Gpu, z: &Tensor, y: &mut Tensor) -> Result<()> {
    complex_unary(gpu, z, true, y)
}

/// dz of |z| from dy.
pub(super) fn complex_abs_bwd(gpu: &Gpu, z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
    complex_unary_bwd(gpu, z, dy, false, dz)
}

/// dz of arg z from dy.
pub(super) fn complex_angle_bwd(gpu: &Gpu, z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
    complex_unary_bwd(gpu, z, dy, true, dz)
}
