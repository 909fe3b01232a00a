//! Launchers of kernels/elementwise.cu: unary ops and their derivatives (GELU, |x|, sqrt, x^2,
//! ln, angle wrapping, rounding through f16/bf16), binary ops, in-place updates, and the
//! one-element-scalar broadcasts.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{check_len, elementwise_config, launched, Gpu};
use crate::backend::{Binary, Unary};
use crate::error::Result;

/// The kernels' code of a unary op (the order of `unary_value` in elementwise.cu).
fn unary_code(op: Unary) -> i32 {
    match op {
        Unary::Gelu => 0,
        Unary::Abs => 1,
        Unary::Sqrt => 2,
        Unary::Square => 3,
        Unary::Log => 4,
        Unary::WrapAngle => 5,
        Unary::RoundF16 => 6,
        Unary::RoundBf16 => 7,
    }
}

impl Gpu {
    /// Launches `name(inputs.., y, n[, code])` over y's elements after checking every input's length.
    fn map(&self, name: &'static str, inputs: &[&CudaSlice<f32>], y: &mut CudaSlice<f32>, code: Option<i32>) -> Result<()> {
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
        if let Some(c) = &code {
            l.arg(c);
        }
        // SAFETY: every input has y's length.
        launched(name, unsafe { l.launch(elementwise_config(n)) })
    }

    /// y = f(x) for any unary op.
    pub fn unary(&self, op: Unary, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        self.map("unary_f32", &[x], y, Some(unary_code(op)))
    }

    /// dx = dy f'(x).
    pub fn unary_bwd(&self, op: Unary, x: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) -> Result<()> {
        self.map("unary_bwd_f32", &[x, dy], dx, Some(unary_code(op)))
    }

    pub fn binary(&self, op: Binary, a: &CudaSlice<f32>, b: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        let code = match op {
            Binary::Add => 0,
            Binary::Sub => 1,
            Binary::Mul => 2,
        };
        self.map("binary_f32", &[a, b], y, Some(code))
    }

    /// acc += x, in place.
    pub fn add_assign(&self, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        const OP: &str = "add_assign_f32";
        let n = acc.len();
        check_len(OP, "x", x, n)?;
        let n64 = n as i64;
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(acc).arg(x).arg(&n64);
        // SAFETY: x has acc's length.
        launched(OP, unsafe { l.launch(elementwise_config(n)) })
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

    /// x *= s, in place.
    pub fn scale_inplace(&self, x: &mut CudaSlice<f32>, s: f32) -> Result<()> {
        self.inplace("scale_inplace_f32", x, s)
    }

    /// x = clamp(x, -c, c), in place.
    pub fn clamp(&self, x: &mut CudaSlice<f32>, c: f32) -> Result<()> {
        self.inplace("clamp_f32", x, c)
    }

    fn inplace(&self, name: &'static str, x: &mut CudaSlice<f32>, v: f32) -> Result<()> {
        let n = x.len();
        let n64 = n as i64;
        let f = self.function(name)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(&n64).arg(&v);
        // SAFETY: the kernel stays inside [0, n).
        launched(name, unsafe { l.launch(elementwise_config(n)) })
    }

    /// y = x * s[0], or x / s[0] when `divide`; s is a one-element buffer (it stays on the GPU).
    pub fn scale_by(&self, x: &CudaSlice<f32>, s: &CudaSlice<f32>, divide: bool, y: &mut CudaSlice<f32>) -> Result<()> {
        const OP: &str = "scale_by_f32";
        let n = y.len();
        check_len(OP, "x", x, n)?;
        check_len(OP, "s", s, 1)?;
        let (n64, d) = (n as i64, divide as i32);
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(s).arg(y).arg(&n64).arg(&d);
        // SAFETY: x has y's length and s one element.
        launched(OP, unsafe { l.launch(elementwise_config(n)) })
    }

    /// y = g[0] everywhere.
    pub fn fill_scalar(&self, g: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        const OP: &str = "fill_scalar_f32";
        check_len(OP, "g", g, 1)?;
        let n = y.len();
        let n64 = n as i64;
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(g).arg(y).arg(&n64);
        // SAFETY: g has one element; the kernel stays inside y.
        launched(OP, unsafe { l.launch(elementwise_config(n)) })
    }
}
