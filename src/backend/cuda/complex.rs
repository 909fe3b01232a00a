//! Launchers of kernels/complex.cu: complex products with a broadcast probe, moduli and angles
//! with their derivatives. Complex buffers are interleaved (re, im) f32.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{check_len, elementwise_config, launched, Gpu};
use crate::error::Result;

impl Gpu {
    /// y = z p (or z conj(p)); z, y [P, H, W, 2], p [H, W, 2] with hw = H W.
    pub fn complex_mul(&self, z: &CudaSlice<f32>, p: &CudaSlice<f32>, conj: bool, y: &mut CudaSlice<f32>, hw: usize) -> Result<()> {
        const OP: &str = "complex_mul_f32";
        let n = z.len() / 2;
        check_len(OP, "y", y, z.len())?;
        check_len(OP, "p", p, 2 * hw)?;
        if hw == 0 || n % hw != 0 {
            return Err(crate::error::Error::invalid(OP, format!("{n} complex elements are not whole planes of {hw}")));
        }
        let (n64, hw64, c) = (n as i64, hw as i64, conj as i32);
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(z).arg(p).arg(y).arg(&n64).arg(&hw64).arg(&c);
        // SAFETY: lengths checked above.
        launched(OP, unsafe { l.launch(elementwise_config(n)) })
    }

    /// y = |z| (`angle` false) or arg z; z [n, 2], y [n].
    pub fn complex_unary(&self, z: &CudaSlice<f32>, angle: bool, y: &mut CudaSlice<f32>) -> Result<()> {
        let name = if angle { "complex_angle_f32" } else { "complex_abs_f32" };
        let n = y.len();
        check_len(name, "z", z, 2 * n)?;
        let n64 = n as i64;
        let f = self.function(name)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(z).arg(y).arg(&n64);
        // SAFETY: z holds 2n floats, y n.
        launched(name, unsafe { l.launch(elementwise_config(n)) })
    }

    /// dz from dy of |z| (`angle` false) or arg z; z, dz [n, 2], dy [n].
    pub fn complex_unary_bwd(&self, z: &CudaSlice<f32>, dy: &CudaSlice<f32>, angle: bool, dz: &mut CudaSlice<f32>) -> Result<()> {
        let name = if angle { "complex_angle_bwd_f32" } else { "complex_abs_bwd_f32" };
        let n = dy.len();
        check_len(name, "z", z, 2 * n)?;
        check_len(name, "dz", dz, 2 * n)?;
        let n64 = n as i64;
        let f = self.function(name)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(z).arg(dy).arg(dz).arg(&n64);
        // SAFETY: z and dz hold 2n floats, dy n.
        launched(name, unsafe { l.launch(elementwise_config(n)) })
    }
}
