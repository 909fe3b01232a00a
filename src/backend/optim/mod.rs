//! The fused optimiser updates (kernels/optim.cu), in place: Adam / AdamW and SGD with momentum
//! (PyTorch's formulas), fp32 master weights and moments on the GPU, f64 arithmetic on the CPU.
//! Hyper-parameters: [`AdamStep`] / [`SgdStep`]; the kernels take `AdamParams` / `SgdParams`
//! (kernels/params.cuh).

mod cpu;
mod cuda;

pub use super::kernels::{AdamParams, AdamSlot, SgdParams};
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

/// One tensor of an Adam update: the parameter, its gradient and its two moments (one shape).
pub struct AdamTensors<'a> {
    pub p: &'a mut Tensor,
    pub g: &'a Tensor,
    pub m: &'a mut Tensor,
    pub v: &'a mut Tensor,
}

/// In place: the Adam/AdamW update of every tensor of `items` (all on one device), in one launch
/// on a GPU.
pub fn adam_step(items: &mut [AdamTensors], h: &AdamStep) -> Result<()> {
    let _p = super::profile::scope("adam_step");
    let Some(first) = items.first() else { return Ok(()) };
    let dev = first.p.device().clone();
    let firsts: Vec<&Tensor> = items.iter().map(|t| &*t.p).collect();
    check_same("adam_step", &firsts)?;
    for t in items.iter_mut() {
        check_same("adam_step", &[t.p, t.g, t.m, t.v])?;
        for u in [t.g, &*t.m, &*t.v] {
            check_eq("adam_step", t.p, u)?;
        }
        own(t.p)?;
        own(t.m)?;
        own(t.v)?;
    }
    on_device(&dev, items, |items| items.iter_mut().try_for_each(|t| cpu::adam_step(t.p, t.g, t.m, t.v, h)), |gpu, items| cuda::adam_step(gpu, h, items))
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
    on_device(&dev, (p, buf), |(p, buf)| cpu::sgd_step(p, g, buf, h), |gpu, (p, buf)| cuda::sgd_step(gpu, hp, p, g, buf))
}
