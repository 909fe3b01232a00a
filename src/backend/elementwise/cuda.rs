//! Launchers of kernels/elementwise.cu: one thread per element, grid-stride.

use super::{Binary, Unary};
use crate::backend::gpu::{check_len, elementwise_config, Gpu};
use crate::backend::kernels;
use crate::error::Result;
use crate::tensor::Tensor;

pub(super) fn unary(gpu: &Gpu, op: Unary, x: &Tensor, y: &mut Tensor) -> Result<()> {
    let (x, y) = (x.cuda()?, y.cuda_mut()?);
    let (n, op) = (y.len() as i64, op.code());
    check_len("unary_f32", "x", x, y.len())?;
    // SAFETY: x and y hold n floats.
    unsafe { kernels::unary_f32(gpu, elementwise_config(y.len()), x, y, n, op) }
}

pub(super) fn unary_bwd(gpu: &Gpu, op: Unary, x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    let (x, dy, dx) = (x.cuda()?, dy.cuda()?, dx.cuda_mut()?);
    let (n, op) = (dx.len() as i64, op.code());
    check_len("unary_bwd_f32", "x", x, dx.len())?;
    check_len("unary_bwd_f32", "dy", dy, dx.len())?;
    // SAFETY: x, dy and dx hold n floats.
    unsafe { kernels::unary_bwd_f32(gpu, elementwise_config(dx.len()), x, dy, dx, n, op) }
}

/// y = a op b; with `gelu`, also GELU(y) into it, in the same launch.
pub(super) fn binary(gpu: &Gpu, op: Binary, a: &Tensor, b: &Tensor, y: &mut Tensor, gelu: Option<&mut Tensor>) -> Result<()> {
    let (a, b, y) = (a.cuda()?, b.cuda()?, y.cuda_mut()?);
    let mut act = gelu.map(Tensor::cuda_mut).transpose()?;
    if let Some(act) = &act {
        check_len("binary_f32", "act", act, y.len())?;
    }
    let n = y.len() as i64;
    let op = match op {
        Binary::Add => 0,
        Binary::Sub => 1,
        Binary::Mul => 2,
    };
    check_len("binary_f32", "a", a, y.len())?;
    check_len("binary_f32", "b", b, y.len())?;
    // SAFETY: a, b, y (and act) hold n floats.
    unsafe { kernels::binary_f32(gpu, elementwise_config(y.len()), a, b, y, &mut act, n, op) }
}

pub(crate) fn add_assign(gpu: &Gpu, acc: &mut Tensor, x: &Tensor) -> Result<()> {
    let (acc, x) = (acc.cuda_mut()?, x.cuda()?);
    let n = acc.len() as i64;
    check_len("add_assign_f32", "x", x, acc.len())?;
    // SAFETY: acc and x hold n floats.
    unsafe { kernels::add_assign_f32(gpu, elementwise_config(acc.len()), acc, x, n) }
}

pub(super) fn affine(gpu: &Gpu, x: &Tensor, alpha: f64, beta: f64, y: &mut Tensor) -> Result<()> {
    let (x, y) = (x.cuda()?, y.cuda_mut()?);
    let (n, alpha, beta) = (y.len() as i64, alpha as f32, beta as f32);
    check_len("affine_f32", "x", x, y.len())?;
    // SAFETY: x and y hold n floats.
    unsafe { kernels::affine_f32(gpu, elementwise_config(y.len()), x, y, n, alpha, beta) }
}

pub(super) fn scale_by(gpu: &Gpu, x: &Tensor, s: &Tensor, divide: bool, y: &mut Tensor) -> Result<()> {
    let (x, s, y) = (x.cuda()?, s.cuda()?, y.cuda_mut()?);
    let (n, divide) = (y.len() as i64, divide as i32);
    check_len("scale_by_f32", "x", x, y.len())?;
    check_len("scale_by_f32", "s", s, 1)?;
    // SAFETY: x and y hold n floats, s one.
    unsafe { kernels::scale_by_f32(gpu, elementwise_config(y.len()), x, s, y, n, divide) }
}

pub(super) fn fill(gpu: &Gpu, g: &Tensor, y: &mut Tensor) -> Result<()> {
    let (g, y) = (g.cuda()?, y.cuda_mut()?);
    let n = y.len() as i64;
    check_len("fill_scalar_f32", "g", g, 1)?;
    // SAFETY: g holds one float, y n.
    unsafe { kernels::fill_scalar_f32(gpu, elementwise_config(y.len()), g, y, n) }
}

pub(super) fn clamp(gpu: &Gpu, x: &mut Tensor, c: f64) -> Result<()> {
    let x = x.cuda_mut()?;
    let (n, c) = (x.len() as i64, c as f32);
    // SAFETY: the kernel stays inside x's n floats.
    unsafe { kernels::clamp_f32(gpu, elementwise_config(x.len()), x, n, c) }
}

/// x *= s in place, on a raw buffer (the scale after a cuFFT transform).
pub(crate) fn scale_in_place(gpu: &Gpu, x: &mut cudarc::driver::CudaSlice<f32>, s: f32) -> Result<()> {
    let n = x.len() as i64;
    // SAFETY: the kernel stays inside x's n floats.
    unsafe { kernels::scale_in_place_f32(gpu, elementwise_config(x.len()), x, n, s) }
}
