//! The CPU backend: the numerical specification of every op, and a usable trainer.
//!
//! Kernels are generic over f32 and f64 (`Float`). Parallel work is split in fixed-size pieces
//! whose results are combined in a fixed order, so every result is bit-for-bit the same whatever
//! the thread count. Reductions accumulate in f64.

mod complex;
mod conv;
mod norm;
mod optim;
mod spectral;

#[allow(unused_imports)]
use crate::tensor::Element as _;
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};
use rayon::prelude::*;

use super::{AdamStep, Backend, Binary, Conv2dParams, NormKind, Reduce, SgdStep, Unary, Units};
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Tensor};

/// Elements per parallel piece of an element-wise kernel or a reduction.
pub(crate) const CHUNK: usize = 1 << 14;

/// A floating-point type the CPU computes in.
pub trait Float: Element + num_traits::Float + rustfft::FftNum + Default + std::iter::Sum + std::ops::AddAssign {
    /// C = alpha * A B + beta * C with explicit row and column strides (matrixmultiply).
    ///
    /// # Safety
    /// The strides and sizes must describe memory inside the pointed-to buffers.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Float for f32 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Float for f64 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

/// A row-major matrix operand of `gemm`: its data, and whether to use it transposed.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl<'a, T> Mat<'a, T> {
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, transposed: false }
    }
    pub fn t(self) -> Self {
        Mat { transposed: !self.transposed, ..self }
    }
    /// (rows, cols, row stride, column stride) of the operand as used.
    fn view(&self) -> (usize, usize, isize, isize) {
        if self.transposed {
            (self.cols, self.rows, 1, self.cols as isize)
        } else {
            (self.rows, self.cols, self.cols as isize, 1)
        }
    }
}

/// c [m, n] (row-major) = a b + beta c. Sizes are checked, so the unsafe call stays in bounds.
pub(crate) fn gemm<T: Float>(a: Mat<T>, b: Mat<T>, c: &mut [T], beta: T) -> Result<()> {
    let (m, k, rsa, csa) = a.view();
    let (k2, n, rsb, csb) = b.view();
    if k != k2 || a.data.len() < a.rows * a.cols || b.data.len() < b.rows * b.cols || c.len() < m * n {
        return Err(Error::invalid("gemm", format!("operands do not fit: [{m}x{k}] x [{k2}x{n}] into {} places", c.len())));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: the checks above bound every index the strides can reach.
    unsafe { T::gemm_raw(m, k, n, T::one(), a.data.as_ptr(), rsa, csa, b.data.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize, 1) }
    Ok(())
}

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` (f32 or f64).
macro_rules! with_float {
    ($dtype:expr, $op:literal, |$T:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            other => Err(Error::UnsupportedDType { op: $op, dtype: other, why: "the CPU computes in f32 or f64" }),
        }
    };
}
pub(crate) use with_float;

fn erf(x: f64) -> f64 {
    libm::erf(x)
}

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn unary_f(op: Unary, x: f64) -> f64 {
    match op {
        Unary::Gelu => 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2)),
        Unary::Abs => x.abs(),
        Unary::Sqrt => x.sqrt(),
        Unary::Square => x * x,
        Unary::Log => x.ln(),
        Unary::WrapAngle => x - std::f64::consts::TAU * (x / std::f64::consts::TAU).round(),
        Unary::RoundF16 => half::f16::from_f64(x).to_f64(),
        Unary::RoundBf16 => half::bf16::from_f64(x).to_f64(),
    }
}

fn unary_df(op: Unary, x: f64) -> f64 {
    match op {
        // d/dx x Phi(x) = Phi(x) + x phi(x)
        Unary::Gelu => 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp(),
        Unary::Abs => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        Unary::Sqrt => 0.5 / x.sqrt(),
        Unary::Square => 2.0 * x,
        Unary::Log => 1.0 / x,
        // Rounding is treated as the identity by the chain rule (a straight-through cast);
        // `ops::round_to` rounds the gradient itself.
        Unary::WrapAngle | Unary::RoundF16 | Unary::RoundBf16 => 1.0,
    }
}

/// y[i] = f(i-th elements) in parallel pieces.
fn map1<T: Float>(x: &[T], y: &mut [T], f: impl Fn(T) -> T + Sync) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(yc, xc)| yc.iter_mut().zip(xc).for_each(|(y, &x)| *y = f(x)));
}

fn map2<T: Float>(a: &[T], b: &[T], y: &mut [T], f: impl Fn(T, T) -> T + Sync) {
    y.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(yc, (ac, bc))| {
        for ((y, &a), &b) in yc.iter_mut().zip(ac).zip(bc) {
            *y = f(a, b)
        }
    });
}

/// sum_i f(a_i, b_i) in f64: fixed pieces summed in order, so the result does not depend on threads.
pub(crate) fn sum_pairs<T: Float>(a: &[T], b: &[T], f: impl Fn(f64, f64) -> f64 + Sync) -> f64 {
    let parts: Vec<f64> =
        a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)).map(|(ac, bc)| ac.iter().zip(bc).map(|(&a, &b)| f(a.as_f64(), b.as_f64())).sum()).collect();
    parts.iter().sum()
}

/// [B, C, S] view sizes of a tensor of rank >= 2.
pub(crate) fn bcs(t: &Tensor) -> (usize, usize, usize) {
    let d = t.dims();
    (d[0], d[1], d[2..].iter().product())
}

pub(crate) fn scalar<T: Float>(t: &Tensor) -> Result<T> {
    Ok(t.as_slice::<T>()?[0])
}

pub struct CpuBackend;

impl Backend for CpuBackend {
    fn unary(&self, op: Unary, x: &Tensor, y: &mut Tensor) -> Result<()> {
        with_float!(x.dtype(), "unary", |T| {
            map1(x.as_slice::<T>()?, y.as_mut_slice::<T>()?, |v| T::of_f64(unary_f(op, v.as_f64())));
            Ok(())
        })
    }

    fn unary_bwd(&self, op: Unary, x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        with_float!(x.dtype(), "unary_bwd", |T| {
            map2(x.as_slice::<T>()?, dy.as_slice::<T>()?, dx.as_mut_slice::<T>()?, |x, g| T::of_f64(g.as_f64() * unary_df(op, x.as_f64())));
            Ok(())
        })
    }

    fn binary(&self, op: Binary, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
        with_float!(a.dtype(), "binary", |T| {
            let (a, b, y) = (a.as_slice::<T>()?, b.as_slice::<T>()?, y.as_mut_slice::<T>()?);
            match op {
                Binary::Add => map2(a, b, y, |a, b| a + b),
                Binary::Sub => map2(a, b, y, |a, b| a - b),
                Binary::Mul => map2(a, b, y, |a, b| a * b),
            }
            Ok(())
        })
    }

    fn add_assign(&self, acc: &mut Tensor, other: &Tensor) -> Result<()> {
        with_float!(acc.dtype(), "add_assign", |T| {
            let o = other.as_slice::<T>()?;
            acc.as_mut_slice::<T>()?.par_chunks_mut(CHUNK).zip(o.par_chunks(CHUNK)).for_each(|(ac, oc)| ac.iter_mut().zip(oc).for_each(|(a, &o)| *a += o));
            Ok(())
        })
    }

    fn add_channel_bias(&self, y: &mut Tensor, bias: &Tensor) -> Result<()> {
        let (_, c, s) = bcs(y);
        with_float!(y.dtype(), "add_channel_bias", |T| {
            let bias = bias.as_slice::<T>()?;
            if s > 0 {
                y.as_mut_slice::<T>()?.par_chunks_mut(s).enumerate().for_each(|(i, plane)| plane.iter_mut().for_each(|v| *v += bias[i % c]));
            }
            Ok(())
        })
    }

    fn affine(&self, x: &Tensor, alpha: f64, beta: f64, y: &mut Tensor) -> Result<()> {
        with_float!(x.dtype(), "affine", |T| {
            let (a, b) = (T::of_f64(alpha), T::of_f64(beta));
            map1(x.as_slice::<T>()?, y.as_mut_slice::<T>()?, |v| a * v + b);
            Ok(())
        })
    }

    fn scale_by(&self, x: &Tensor, s: &Tensor, divide: bool, y: &mut Tensor) -> Result<()> {
        with_float!(x.dtype(), "scale_by", |T| {
            let s = scalar::<T>(s)?;
            if divide {
                map1(x.as_slice::<T>()?, y.as_mut_slice::<T>()?, |v| v / s);
            } else {
                map1(x.as_slice::<T>()?, y.as_mut_slice::<T>()?, |v| v * s);
            }
            Ok(())
        })
    }

    fn reduce(&self, op: Reduce, x: &Tensor, y: &mut Tensor) -> Result<()> {
        self.reduce_each(op, &[x], y)
    }

    fn reduce_each(&self, op: Reduce, xs: &[&Tensor], y: &mut Tensor) -> Result<()> {
        with_float!(y.dtype(), "reduce", |T| {
            let ys = y.as_mut_slice::<T>()?;
            for (out, x) in ys.iter_mut().zip(xs) {
                let v = x.as_slice::<T>()?;
                let total = match op {
                    Reduce::Sum => sum_pairs(v, v, |a, _| a),
                    Reduce::SumSq => sum_pairs(v, v, |a, _| a * a),
                };
                *out = T::of_f64(total);
            }
            Ok(())
        })
    }

    fn dot(&self, a: &Tensor, b: &Tensor, y: &mut Tensor) -> Result<()> {
        with_float!(a.dtype(), "dot", |T| {
            let total = sum_pairs(a.as_slice::<T>()?, b.as_slice::<T>()?, |a, b| a * b);
            y.as_mut_slice::<T>()?[0] = T::of_f64(total);
            Ok(())
        })
    }

    fn broadcast_scalar(&self, g: &Tensor, _like: &Tensor, y: &mut Tensor) -> Result<()> {
        with_float!(g.dtype(), "broadcast_scalar", |T| {
            let g = scalar::<T>(g)?;
            y.as_mut_slice::<T>()?.par_chunks_mut(CHUNK).for_each(|c| c.fill(g));
            Ok(())
        })
    }

    fn channel_scale(&self, x: &Tensor, l: &Tensor, y: &mut Tensor) -> Result<()> {
        let (_, c, s) = bcs(x);
        with_float!(x.dtype(), "channel_scale", |T| {
            let (xs, l) = (x.as_slice::<T>()?, l.as_slice::<T>()?);
            if s > 0 {
                y.as_mut_slice::<T>()?.par_chunks_mut(s).zip(xs.par_chunks(s)).enumerate().for_each(|(i, (yp, xp))| {
                    let g = l[i % c];
                    yp.iter_mut().zip(xp).for_each(|(y, &x)| *y = x * g);
                });
            }
            Ok(())
        })
    }

    fn channel_dot(&self, a: &Tensor, b: Option<&Tensor>, y: &mut Tensor) -> Result<()> {
        let (bn, c, s) = bcs(a);
        with_float!(a.dtype(), "channel_dot", |T| {
            let a = a.as_slice::<T>()?;
            let b = b.map(|b| b.as_slice::<T>()).transpose()?;
            // One f64 sum per (sample, channel) plane, then summed over samples in order.
            let planes: Vec<f64> = (0..bn * c)
                .into_par_iter()
                .map(|p| {
                    let ap = &a[p * s..(p + 1) * s];
                    match b {
                        Some(b) => ap.iter().zip(&b[p * s..(p + 1) * s]).map(|(&x, &y)| x.as_f64() * y.as_f64()).sum(),
                        None => ap.iter().map(|&x| x.as_f64()).sum(),
                    }
                })
                .collect();
            let y = y.as_mut_slice::<T>()?;
            for (ch, out) in y.iter_mut().enumerate() {
                *out = T::of_f64((0..bn).map(|n| planes[n * c + ch]).sum());
            }
            Ok(())
        })
    }

    fn layerscale_bwd(&self, dy: &Tensor, branch: &Tensor, l: &Tensor, dbranch: &mut Tensor, dl: &mut Tensor) -> Result<()> {
        self.channel_scale(dy, l, dbranch)?;
        self.channel_dot(dy, Some(branch), dl)
    }

    fn layerscale_fwd(&self, x: &Tensor, branch: &Tensor, l: &Tensor, y: &mut Tensor) -> Result<()> {
        let (_, c, s) = bcs(x);
        with_float!(x.dtype(), "layerscale_fwd", |T| {
            let (xs, bs, l) = (x.as_slice::<T>()?, branch.as_slice::<T>()?, l.as_slice::<T>()?);
            if s > 0 {
                y.as_mut_slice::<T>()?.par_chunks_mut(s).zip(xs.par_chunks(s).zip(bs.par_chunks(s))).enumerate().for_each(|(i, (yp, (xp, bp)))| {
                    let g = l[i % c];
                    for ((y, &x), &b) in yp.iter_mut().zip(xp).zip(bp) {
                        *y = x + g * b;
                    }
                });
            }
            Ok(())
        })
    }

    fn copy_channels(&self, src: &Tensor, dst: &mut Tensor, offset: usize) -> Result<()> {
        let (b, cs, s) = bcs(src);
        let cd = dst.dims()[1];
        with_float!(src.dtype(), "copy_channels", |T| {
            let src = src.as_slice::<T>()?;
            let dst = dst.as_mut_slice::<T>()?;
            for n in 0..b {
                let d0 = (n * cd + offset) * s;
                dst[d0..d0 + cs * s].copy_from_slice(&src[n * cs * s..(n + 1) * cs * s]);
            }
            Ok(())
        })
    }

    fn slice_channels(&self, src: &Tensor, offset: usize, dst: &mut Tensor) -> Result<()> {
        let (b, cs, s) = bcs(src);
        let cd = dst.dims()[1];
        with_float!(src.dtype(), "slice_channels", |T| {
            let src = src.as_slice::<T>()?;
            let dst = dst.as_mut_slice::<T>()?;
            for n in 0..b {
                let s0 = (n * cs + offset) * s;
                dst[n * cd * s..(n + 1) * cd * s].copy_from_slice(&src[s0..s0 + cd * s]);
            }
            Ok(())
        })
    }

    fn conv2d_fwd(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams, y: &mut Tensor) -> Result<()> {
        conv::conv2d_fwd(x, w, b, p, y)
    }
    fn conv2d_bwd_input(&self, dy: &Tensor, w: &Tensor, p: Conv2dParams, dx: &mut Tensor) -> Result<()> {
        conv::conv2d_bwd_input(dy, w, p, dx)
    }
    fn conv2d_bwd_weight(&self, x: &Tensor, dy: &Tensor, p: Conv2dParams, dw: &mut Tensor) -> Result<()> {
        conv::conv2d_bwd_weight(x, dy, p, dw)
    }
    fn rfft2(&self, x: &Tensor, y: &mut Tensor) -> Result<()> {
        spectral::rfft2(x, y, false)
    }
    fn rfft2_bwd(&self, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        spectral::irfft2(dy, dx, true)
    }
    fn irfft2(&self, z: &Tensor, y: &mut Tensor) -> Result<()> {
        spectral::irfft2(z, y, false)
    }
    fn irfft2_bwd(&self, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
        spectral::rfft2(dy, dz, true)
    }
    fn spectral_mix_fwd(&self, xh: &Tensor, w: &Tensor, rows: &[usize], y: &mut Tensor) -> Result<()> {
        spectral::mix_fwd(xh, w, rows, y)
    }
    fn spectral_mix_bwd_input(&self, dyh: &Tensor, w: &Tensor, rows: &[usize], dxh: &mut Tensor) -> Result<()> {
        spectral::mix_bwd_input(dyh, w, rows, dxh)
    }
    fn spectral_mix_bwd_weight(&self, xh: &Tensor, dyh: &Tensor, rows: &[usize], dw: &mut Tensor) -> Result<()> {
        spectral::mix_bwd_weight(xh, dyh, rows, dw)
    }
    fn norm_fwd(
        &self,
        kind: NormKind,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f64,
        y: &mut Tensor,
        mean: &mut Tensor,
        rstd: &mut Tensor,
    ) -> Result<()> {
        norm::fwd(kind, x, gamma, beta, eps, y, mean, rstd)
    }
    fn norm_bwd(
        &self,
        kind: NormKind,
        x: &Tensor,
        dy: &Tensor,
        gamma: Option<&Tensor>,
        mean: &Tensor,
        rstd: &Tensor,
        dx: &mut Tensor,
        dgamma: Option<&mut Tensor>,
        dbeta: Option<&mut Tensor>,
    ) -> Result<()> {
        norm::bwd(kind, x, dy, gamma, mean, rstd, dx, dgamma, dbeta)
    }
    fn complex_mul(&self, z: &Tensor, p: &Tensor, conj: bool, y: &mut Tensor) -> Result<()> {
        complex::mul(z, p, conj, y)
    }
    fn fft2(&self, z: &Tensor, inverse: bool, scale: f64, y: &mut Tensor) -> Result<()> {
        complex::fft2(z, inverse, scale, y)
    }
    fn roll2d(&self, x: &Tensor, sh: usize, sw: usize, complex: bool, y: &mut Tensor) -> Result<()> {
        complex::roll2d(x, sh, sw, complex, y)
    }
    fn complex_abs(&self, z: &Tensor, y: &mut Tensor) -> Result<()> {
        complex::abs(z, y)
    }
    fn complex_abs_bwd(&self, z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
        complex::abs_bwd(z, dy, dz)
    }
    fn complex_angle(&self, z: &Tensor, y: &mut Tensor) -> Result<()> {
        complex::angle(z, y)
    }
    fn complex_angle_bwd(&self, z: &Tensor, dy: &Tensor, dz: &mut Tensor) -> Result<()> {
        complex::angle_bwd(z, dy, dz)
    }
    fn pack_complex(&self, x: &Tensor, unpack: bool, y: &mut Tensor) -> Result<()> {
        complex::pack(x, unpack, y)
    }
    fn adam_step(&self, p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, h: &AdamStep) -> Result<()> {
        optim::adam(p, g, m, v, h)
    }
    fn sgd_step(&self, p: &mut Tensor, g: &Tensor, buf: Option<&mut Tensor>, h: &SgdStep) -> Result<()> {
        optim::sgd(p, g, buf, h)
    }
    fn agc(&self, w: &Tensor, g: &mut Tensor, units: Units, lambda: f64, eps: f64) -> Result<()> {
        optim::agc(w, g, units, lambda, eps)
    }
    fn clamp(&self, x: &mut Tensor, c: f64) -> Result<()> {
        with_float!(x.dtype(), "clamp", |T| {
            let c = T::of_f64(c);
            x.as_mut_slice::<T>()?.par_chunks_mut(CHUNK).for_each(|ch| ch.iter_mut().for_each(|v| *v = v.max(-c).min(c)));
            Ok(())
        })
    }
}
