//! The fused optimiser updates (kernels/optim.cu), in place: Adam / AdamW and SGD with momentum
//! (PyTorch's formulas), fp32 master weights and moments on the GPU, f64 arithmetic on the CPU.
//! Hyper-parameters: [`AdamStep`] / [`SgdStep`]; the kernels take `AdamParams` / `SgdParams`
//! (kernels/params.cuh).

mod cpu;
mod cuda;

pub use super::kernels::{AdamParams, SgdParams};
use super::{check_eq, check_same, on_device, own};
use crate::error::Result;
use crate::tensor::Tensor;

/// One Adam/AdamW update (PyTorch's formulas). `grad_scale` multiplies the gradient first (the
/// clipping factor and 1/accumulation steps folded in).
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW (p *= 1 - lr wd) rather than Adam's L2 term (g += wd p).
    pub decoupled: bool,
    /// The 1-based update count, for bias correction.
    pub step: u64,
    pub grad_scale: f64,
}

/// One SGD update (PyTorch's formulas, dampening 0).
#[derive(Clone, Copy, Debug)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// The first update (the momentum buffer starts as the gradient).
    pub first: bool,
    pub grad_scale: f64,
}

impl AdamParams {
    /// The kernel's parameters of an update of n elements.
    pub fn of(h: &AdamStep, n: usize) -> AdamParams {
        AdamParams {
            n: n as i64,
            lr: h.lr as f32,
            b1: h.beta1 as f32,
            b2: h.beta2 as f32,
            eps: h.eps as f32,
            wd: h.weight_decay as f32,
            bc1: (1.0 - h.beta1.powi(h.step as i32)) as f32,
            bc2: (1.0 - h.beta2.powi(h.step as i32)) as f32,
            s: h.grad_scale as f32,
            decoupled: h.decoupled as i32,
        }
    }
}

impl SgdParams {
    pub fn of(h: &SgdStep, n: usize) -> SgdParams {
        SgdParams {
            n: n as i64,
            lr: h.lr as f32,
            mu: h.momentum as f32,
            wd: h.weight_decay as f32,
            s: h.grad_scale as f32,
            nesterov: h.nesterov as i32,
            first: h.first as i32,
        }
    }
}

/// In place: the Adam/AdamW update of p with gradient g and moments m, v.
pub fn adam_step(p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, h: &AdamStep) -> Result<()> {
    let _p = super::profile::scope("adam_step");
    check_same("adam_step", &[p, g, m, v])?;
    for t in [g, &*m, &*v] {
        check_eq("adam_step", p, t)?;
    }
    own(p)?;
    own(m)?;
    own(v)?;
    let dev = p.device().clone();
    let hp = AdamParams::of(h, p.numel());
    on_device(&dev, (p, m, v), |(p, m, v)| cpu::adam(p, g, m, v, h), |gpu, (p, m, v)| cuda::adam_step(gpu, hp, p, g, m, v))
}

/// In place: the SGD update of p, with its momentum buffer when momentum > 0.
pub fn sgd_step(p: &mut Tensor, g: &Tensor, buf: Option<&mut Tensor>, h: &SgdStep) -> Result<()> {
    let _p = super::profile::scope("sgd_step");
    check_same("sgd_step", &[p, g])?;
    check_eq("sgd_step", p, g)?;
    own(p)?;
    let buf = match buf {
        Some(b) => {
            check_eq("sgd_step", p, b)?;
            own(b)?;
            Some(b)
        }
        None => None,
    };
    let dev = p.device().clone();
    let hp = SgdParams::of(h, p.numel());
    on_device(&dev, (p, buf), |(p, buf)| cpu::sgd(p, g, buf, h), |gpu, (p, buf)| cuda::sgd_step(gpu, hp, p, g, buf))
}
