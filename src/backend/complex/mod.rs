//! Complex fields of the physics forward model (kernels/complex.cu), interleaved (re, im): the
//! product with a probe broadcast over the planes, moduli and angles with their derivatives. The
//! geometry is the element count and the probe's H W (plain scalars of the kernels).

mod cpu;
mod cuda;

use super::{check_complex, check_compute, check_rank, check_same, compute};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// y = z * p (or z * conj(p)), p [H, W, 2] broadcast over the leading dimensions of z.
pub fn complex_mul(z: &Tensor, p: &Tensor, conj: bool) -> Result<Tensor> {
    let _p = super::profile::scope("complex_mul");
    check_same("complex_mul", &[z, p])?;
    check_complex("complex_mul", z, 3)?;
    check_rank("complex_mul", p, 3, "probe")?;
    let zd = z.dims();
    if p.dims() != &zd[zd.len() - 3..] {
        return Err(Error::mismatch_because("complex_mul", z.shape(), p.shape(), "probe must be [H, W, 2] matching the field's last dimensions"));
    }
    compute(z.shape().clone(), z, |y| cpu::complex_mul(z, p, conj, y), |gpu, y| cuda::complex_mul(gpu, z, p, conj, y))
}

/// The checks of a modulus or angle: z [.., 2] and, for a backward, dy [..].
fn check_unary(op: &'static str, z: &Tensor, dy: Option<&Tensor>) -> Result<()> {
    check_compute(op, z)?;
    check_complex(op, z, 1)?;
    if let Some(dy) = dy {
        check_same(op, &[z, dy])?;
        if dy.dims() != &z.dims()[..z.rank() - 1] {
            return Err(Error::mismatch(op, z.shape(), dy.shape()));
        }
    }
    Ok(())
}

pub fn complex_abs(z: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("complex_abs");
    check_unary("complex_abs", z, None)?;
    compute(&z.dims()[..z.rank() - 1], z, |y| cpu::complex_abs(z, y), |gpu, y| cuda::complex_abs(gpu, z, y))
}

pub fn complex_abs_bwd(z: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("complex_abs_bwd");
    check_unary("complex_abs_bwd", z, Some(dy))?;
    compute(z.shape().clone(), z, |dz| cpu::complex_abs_bwd(z, dy, dz), |gpu, dz| cuda::complex_abs_bwd(gpu, z, dy, dz))
}

/// y = arg z = atan2(im, re).
pub fn complex_angle(z: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("complex_angle");
    check_unary("complex_angle", z, None)?;
    compute(&z.dims()[..z.rank() - 1], z, |y| cpu::complex_angle(z, y), |gpu, y| cuda::complex_angle(gpu, z, y))
}

/// dz = dy (-im, re) / |z|^2, defined as 0 at z = 0.
pub fn complex_angle_bwd(z: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let _p = super::profile::scope("complex_angle_bwd");
    check_unary("complex_angle_bwd", z, Some(dy))?;
    compute(z.shape().clone(), z, |dz| cpu::complex_angle_bwd(z, dy, dz), |gpu, dz| cuda::complex_angle_bwd(gpu, z, dy, dz))
}
