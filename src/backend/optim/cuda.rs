//! Launchers of kernels/optim.cu.

use super::{AdamParams, SgdParams};
use crate::backend::gpu::{check_len, elementwise_config, Gpu};
use crate::backend::kernels;
use crate::error::Result;
use crate::tensor::Tensor;

/// One update of p, m, v (all [n]) from g.
pub(super) fn adam_step(gpu: &Gpu, h: AdamParams, p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor) -> Result<()> {
    const OP: &str = "adam_step_f32";
    let (p, g, m, v) = (p.cuda_mut()?, g.cuda()?, m.cuda_mut()?, v.cuda_mut()?);
    let n = h.n as usize;
    for (name, len) in [("p", p.len()), ("g", g.len()), ("m", m.len()), ("v", v.len())] {
        if len != n {
            return Err(crate::error::Error::invalid(OP, format!("{name} holds {len} elements, the update is of {n}")));
        }
    }
    // SAFETY: every buffer holds n floats.
    unsafe { kernels::adam_step_f32(gpu, elementwise_config(n), p, g, m, v, h) }
}

/// One SGD update of p (and its momentum buffer, when given) from g.
pub(super) fn sgd_step(gpu: &Gpu, h: SgdParams, p: &mut Tensor, g: &Tensor, buf: Option<&mut Tensor>) -> Result<()> {
    const OP: &str = "sgd_step_f32";
    let (p, g) = (p.cuda_mut()?, g.cuda()?);
    let mut buf = buf.map(Tensor::cuda_mut).transpose()?;
    let n = h.n as usize;
    check_len(OP, "p", p, n)?;
    check_len(OP, "g", g, n)?;
    if let Some(b) = &buf {
        check_len(OP, "buf", b, n)?;
    }
    // SAFETY: every buffer holds n floats.
    unsafe { kernels::sgd_step_f32(gpu, elementwise_config(n), p, g, &mut buf, h) }
}
