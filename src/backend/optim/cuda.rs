//! Launchers of kernels/optim.cu: Adam over every tensor of an update in one launch, SGD per tensor.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{AdamParams, AdamSlot, AdamStep, AdamTensors, SgdParams};
use crate::backend::gpu::{check_len, elementwise_config, int, Gpu};
use crate::backend::kernels;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One update of every item's p, m, v from its g, in one launch: the items' device addresses
/// go up as a table of `AdamSlot`s, and the kernel numbers their elements one after another.
pub(super) fn adam_step(gpu: &Gpu, h: &AdamStep, items: &mut [AdamTensors]) -> Result<()> {
    const OP: &str = "adam_step_f32";
    let mut slots = Vec::with_capacity(items.len());
    let mut total = 0usize;
    for t in items.iter_mut() {
        let (p, g, m, v) = (t.p.cuda_mut()?, t.g.cuda()?, t.m.cuda_mut()?, t.v.cuda_mut()?);
        let n = p.len();
        for (name, len) in [("g", g.len()), ("m", m.len()), ("v", v.len())] {
            if len != n {
                return Err(Error::invalid(OP, format!("{name} holds {len} elements, its parameter {n}")));
            }
        }
        let (p, _sp) = p.device_ptr_mut(&gpu.stream);
        let (g, _sg) = g.device_ptr(&gpu.stream);
        let (m, _sm) = m.device_ptr_mut(&gpu.stream);
        let (v, _sv) = v.device_ptr_mut(&gpu.stream);
        slots.push(AdamSlot { p, g, m, v, n: n as i64, start: total as i64 });
        total += n;
    }
    if total == 0 {
        return Ok(());
    }
    let count = int(OP, slots.len())?;
    let slots = gpu.upload(&slots)?;
    let h = AdamParams::of(h, total);
    // SAFETY: each slot addresses live buffers of its n floats (the tensors are borrowed for the
    // call, and the stream runs the launch before any later free); h.n is the sum of the n.
    unsafe { kernels::adam_step_f32(gpu, elementwise_config(total), &slots, count, h) }
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
