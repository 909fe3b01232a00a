//! Launchers of kernels/norm.cu (f32 tensors, what training runs) and, in [`dev`], of
//! kernels/dev/norm_lowp.cu (f16 and bf16 buffers, for tests and benchmarks).

use cudarc::driver::CudaSlice;

use super::NormGeom;
use crate::backend::gpu::{per_block_config, Gpu};
use crate::backend::kernels;
use crate::error::Result;
use crate::tensor::Tensor;

/// Checks the lengths of a norm's buffers against its geometry (`c` for the per-channel ones).
fn lengths(op: &'static str, g: &NormGeom, full: &[(&str, usize)], per_group: &[(&str, usize)], per_channel: &[(&str, Option<usize>)]) -> Result<()> {
    for (name, len) in full {
        check_len_raw(op, name, *len, g.numel())?;
    }
    for (name, len) in per_group {
        check_len_raw(op, name, *len, g.groups())?;
    }
    for (name, len) in per_channel {
        if let Some(len) = len {
            check_len_raw(op, name, *len, g.c as usize)?;
        }
    }
    Ok(())
}

fn check_len_raw(op: &'static str, what: &str, len: usize, want: usize) -> Result<()> {
    if len != want {
        return Err(crate::error::Error::invalid(op, format!("{what} holds {len} elements, the shape needs {want}")));
    }
    Ok(())
}

/// y = xhat gamma + beta; mean and rstd per group (fp32).
#[allow(clippy::too_many_arguments)]
pub(super) fn fwd(
    gpu: &Gpu,
    g: NormGeom,
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    y: &mut Tensor,
    mean: &mut Tensor,
    rstd: &mut Tensor,
) -> Result<()> {
    let (x, y, mean, rstd) = (x.cuda()?, y.cuda_mut()?, mean.cuda_mut()?, rstd.cuda_mut()?);
    let (gamma, beta) = (gamma.map(Tensor::cuda).transpose()?, beta.map(Tensor::cuda).transpose()?);
    lengths(
        "norm_fwd_f32",
        &g,
        &[("x", x.len()), ("y", y.len())],
        &[("mean", mean.len()), ("rstd", rstd.len())],
        &[("gamma", gamma.map(CudaSlice::len)), ("beta", beta.map(CudaSlice::len))],
    )?;
    // SAFETY: lengths checked against the geometry; one block per group.
    unsafe { kernels::norm_fwd_f32(gpu, per_block_config(g.groups())?, x, &gamma, &beta, y, mean, rstd, g) }
}

/// dx, and dgamma / dbeta (fp32) when asked for.
#[allow(clippy::too_many_arguments)]
pub(super) fn bwd(
    gpu: &Gpu,
    g: NormGeom,
    x: &Tensor,
    dy: &Tensor,
    gamma: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    dx: &mut Tensor,
    dgamma: Option<&mut Tensor>,
    dbeta: Option<&mut Tensor>,
) -> Result<()> {
    let (x, dy, mean, rstd, dx) = (x.cuda()?, dy.cuda()?, mean.cuda()?, rstd.cuda()?, dx.cuda_mut()?);
    let gamma = gamma.map(Tensor::cuda).transpose()?;
    let mut dgamma = dgamma.map(Tensor::cuda_mut).transpose()?;
    let mut dbeta = dbeta.map(Tensor::cuda_mut).transpose()?;
    lengths(
        "norm_bwd_f32",
        &g,
        &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())],
        &[("mean", mean.len()), ("rstd", rstd.len())],
        &[("gamma", gamma.map(CudaSlice::len)), ("dgamma", dgamma.as_ref().map(|d| d.len())), ("dbeta", dbeta.as_ref().map(|d| d.len()))],
    )?;
    // SAFETY: lengths checked against the geometry; one block per group.
    unsafe { kernels::norm_bwd_f32(gpu, per_block_config(g.groups())?, x, dy, &gamma, mean, rstd, dx, g)? };
    if dgamma.is_none() && dbeta.is_none() {
        return Ok(());
    }
    // SAFETY: as above; one block per channel.
    unsafe { kernels::norm_affine_bwd_f32(gpu, per_block_config(g.c as usize)?, x, dy, mean, rstd, &mut dgamma, &mut dbeta, g) }
}

/// The f16 and bf16 norms of kernels/dev/norm_lowp.cu on raw device buffers: no training path
/// launches them yet (GPU activations are f32); tests/cuda.rs checks them against the CPU and
/// benches/cuda_kernels.rs times them beside the f32 kernels.
pub mod dev {
    use cudarc::driver::CudaSlice;

    use super::{lengths, NormGeom};
    use crate::backend::gpu::{per_block_config, Gpu};
    use crate::backend::kernels;
    use crate::error::Result;

    /// A 2-byte element type with norm kernels.
    pub trait LowElem: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy {
        /// # Safety
        /// The buffers have the lengths of the geometry (checked by [`norm_fwd`]).
        #[allow(clippy::too_many_arguments)]
        unsafe fn fwd(
            gpu: &Gpu,
            g: NormGeom,
            x: &CudaSlice<Self>,
            gamma: Option<&CudaSlice<f32>>,
            beta: Option<&CudaSlice<f32>>,
            y: &mut CudaSlice<Self>,
            mean: &mut CudaSlice<f32>,
            rstd: &mut CudaSlice<f32>,
        ) -> Result<()>;
        /// # Safety
        /// The buffers have the lengths of the geometry (checked by [`norm_bwd`]).
        #[allow(clippy::too_many_arguments)]
        unsafe fn bwd(
            gpu: &Gpu,
            g: NormGeom,
            x: &CudaSlice<Self>,
            dy: &CudaSlice<Self>,
            gamma: Option<&CudaSlice<f32>>,
            mean: &CudaSlice<f32>,
            rstd: &CudaSlice<f32>,
            dx: &mut CudaSlice<Self>,
        ) -> Result<()>;
        /// # Safety
        /// The buffers have the lengths of the geometry (checked by [`norm_bwd`]).
        #[allow(clippy::too_many_arguments)]
        unsafe fn affine(
            gpu: &Gpu,
            g: NormGeom,
            x: &CudaSlice<Self>,
            dy: &CudaSlice<Self>,
            mean: &CudaSlice<f32>,
            rstd: &CudaSlice<f32>,
            dgamma: &mut CudaSlice<f32>,
            dbeta: &mut CudaSlice<f32>,
        ) -> Result<()>;
    }

    impl LowElem for half::f16 {
        unsafe fn fwd(
            gpu: &Gpu,
            g: NormGeom,
            x: &CudaSlice<Self>,
            gamma: Option<&CudaSlice<f32>>,
            beta: Option<&CudaSlice<f32>>,
            y: &mut CudaSlice<Self>,
            mean: &mut CudaSlice<f32>,
            rstd: &mut CudaSlice<f32>,
        ) -> Result<()> {
            unsafe { kernels::norm_fwd_f16(gpu, per_block_config(g.groups())?, x, &gamma, &beta, y, mean, rstd, g) }
        }
        unsafe fn bwd(
            gpu: &Gpu,
            g: NormGeom,
            x: &CudaSlice<Self>,
            dy: &CudaSlice<Self>,
            gamma: Option<&CudaSlice<f32>>,
            mean: &CudaSlice<f32>,
            rstd: &CudaSlice<f32>,
            dx: &mut CudaSlice<Self>,
        ) -> Result<()> {
            unsafe { kernels::norm_bwd_f16(gpu, per_block_config(g.groups())?, x, dy, &gamma, mean, rstd, dx, g) }
        }
        unsafe fn affine(
            gpu: &Gpu,
            g: NormGeom,
            x: &CudaSlice<Self>,
            dy: &CudaSlice<Self>,
            mean: &CudaSlice<f32>,
            rstd: &CudaSlice<f32>,
            dgamma: &mut CudaSlice<f32>,
            dbeta: &mut CudaSlice<f32>,
        ) -> Result<()> {
            unsafe { kernels::norm_affine_bwd_f16(gpu, per_block_config(g.c as usize)?, x, dy, mean, rstd, dgamma, dbeta, g) }
        }
    }

    impl LowElem for half::bf16 {
        unsafe fn fwd(
            gpu: &Gpu,
            g: NormGeom,
            x: &CudaSlice<Self>,
            gamma: Option<&CudaSlice<f32>>,
            beta: Option<&CudaSlice<f32>>,
            y: &mut CudaSlice<Self>,
            mean: &mut CudaSlice<f32>,
            rstd: &mut CudaSlice<f32>,
        ) -> Result<()> {
            unsafe { kernels::norm_fwd_bf16(gpu, per_block_config(g.groups())?, x, &gamma, &beta, y, mean, rstd, g) }
        }
        unsafe fn bwd(
            gpu: &Gpu,
            g: NormGeom,
            x: &CudaSlice<Self>,
            dy: &CudaSlice<Self>,
            gamma: Option<&CudaSlice<f32>>,
            mean: &CudaSlice<f32>,
            rstd: &CudaSlice<f32>,
            dx: &mut CudaSlice<Self>,
        ) -> Result<()> {
            unsafe { kernels::norm_bwd_bf16(gpu, per_block_config(g.groups())?, x, dy, &gamma, mean, rstd, dx, g) }
        }
        unsafe fn affine(
            gpu: &Gpu,
            g: NormGeom,
            x: &CudaSlice<Self>,
            dy: &CudaSlice<Self>,
            mean: &CudaSlice<f32>,
            rstd: &CudaSlice<f32>,
            dgamma: &mut CudaSlice<f32>,
            dbeta: &mut CudaSlice<f32>,
        ) -> Result<()> {
            unsafe { kernels::norm_affine_bwd_bf16(gpu, per_block_config(g.c as usize)?, x, dy, mean, rstd, dgamma, dbeta, g) }
        }
    }

    /// y = xhat gamma + beta in T; mean and rstd per group (fp32).
    #[allow(clippy::too_many_arguments)]
    pub fn norm_fwd<T: LowElem>(
        gpu: &Gpu,
        g: NormGeom,
        x: &CudaSlice<T>,
        gamma: Option<&CudaSlice<f32>>,
        beta: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<T>,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
    ) -> Result<()> {
        lengths(
            "norm_fwd (dev)",
            &g,
            &[("x", x.len()), ("y", y.len())],
            &[("mean", mean.len()), ("rstd", rstd.len())],
            &[("gamma", gamma.map(CudaSlice::len)), ("beta", beta.map(CudaSlice::len))],
        )?;
        // SAFETY: lengths checked against the geometry.
        unsafe { T::fwd(gpu, g, x, gamma, beta, y, mean, rstd) }
    }

    /// dx in T, dgamma and dbeta in fp32.
    #[allow(clippy::too_many_arguments)]
    pub fn norm_bwd<T: LowElem>(
        gpu: &Gpu,
        g: NormGeom,
        x: &CudaSlice<T>,
        dy: &CudaSlice<T>,
        gamma: Option<&CudaSlice<f32>>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        dx: &mut CudaSlice<T>,
        dgamma: &mut CudaSlice<f32>,
        dbeta: &mut CudaSlice<f32>,
    ) -> Result<()> {
        lengths(
            "norm_bwd (dev)",
            &g,
            &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())],
            &[("mean", mean.len()), ("rstd", rstd.len())],
            &[("gamma", gamma.map(CudaSlice::len)), ("dgamma", Some(dgamma.len())), ("dbeta", Some(dbeta.len()))],
        )?;
        // SAFETY: lengths checked against the geometry.
        unsafe {
            T::bwd(gpu, g, x, dy, gamma, mean, rstd, dx)?;
            T::affine(gpu, g, x, dy, mean, rstd, dgamma, dbeta)
        }
    }
}
