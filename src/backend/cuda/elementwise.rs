//! Launchers of kernels/elementwise.cu: GELU forward and backward, rounding through f16/bf16,
//! add, affine.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{check_len, elementwise_config, launched, Gpu};
use crate::config::Precision;
use crate::error::Result;

impl Gpu {
    fn map(&self, name: &'static str, inputs: &[&CudaSlice<f32>], y: &mut CudaSlice<f32>) -> Result<()> {
        let n = y.len();
        for (i, x) in inputs.iter().enumerate() {
            check_len(name, &format!("input {i}"), x, n)?;
        }
        let n64 = n as i64;
        let f = self.function(name)?;
        let mut l = self.stream.launch_builder(&f);
        for x in inputs {
            l.arg(*x);
        }
        l.arg(y).arg(&n64);
        // SAFETY: every input has y's length.
        launched(name, unsafe { l.launch(elementwise_config(n)) })
    }

    /// y = x Phi(x).
    pub fn gelu_fwd(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        self.map("gelu_fwd_f32", &[x], y)
    }

    /// dx = dy GELU'(x).
    pub fn gelu_bwd(&self, x: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) -> Result<()> {
        self.map("gelu_bwd_f32", &[x, dy], dx)
    }

    /// y = x rounded through `p` (a copy for fp32).
    pub fn round_to(&self, x: &CudaSlice<f32>, p: Precision, y: &mut CudaSlice<f32>) -> Result<()> {
        match p {
            Precision::Fp32 => self.affine(x, 1.0, 0.0, y),
            Precision::Fp16 => self.map("round_f16_f32", &[x], y),
            Precision::Bf16 => self.map("round_bf16_f32", &[x], y),
        }
    }

    pub fn add(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        self.map("add_f32", &[a, b], y)
    }

    /// y = alpha x + beta.
    pub fn affine(&self, x: &CudaSlice<f32>, alpha: f32, beta: f32, y: &mut CudaSlice<f32>) -> Result<()> {
        const OP: &str = "affine_f32";
        let n = y.len();
        check_len(OP, "x", x, n)?;
        let n64 = n as i64;
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(y).arg(&n64).arg(&alpha).arg(&beta);
        // SAFETY: x has y's length.
        launched(OP, unsafe { l.launch(elementwise_config(n)) })
    }
}
