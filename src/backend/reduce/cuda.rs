//! Launchers of kernels/reduce.cu: two launches per reduction (partials, then their sum), the
//! number of first-pass blocks a function of n alone, so the order of additions never changes for
//! a given shape.

use cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr, LaunchConfig};

use super::Reduce;
use crate::backend::gpu::{check_len, int, per_block_config, Gpu, BLOCK};
use crate::backend::kernels::{self, ReduceSlot};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Blocks of the first pass at most. A reduction of n elements uses min(256, ceil(n / BLOCK))
/// blocks: a function of n alone, so the order of additions never changes for a given shape.
pub const PARTIALS: usize = 256;

/// Blocks of the first pass over n elements.
pub fn partials(n: usize) -> usize {
    n.div_ceil(BLOCK as usize).clamp(1, PARTIALS)
}

/// The first pass over x (and y for the dot product) into `partial`, `partials(n)` blocks.
fn first_pass(gpu: &Gpu, op: i32, x: &CudaSlice<f32>, y: Option<&CudaSlice<f32>>, partial: &mut CudaViewMut<f32>) -> Result<()> {
    const OP: &str = "reduce_partial_f32";
    let parts = partials(x.len());
    if partial.len() < parts {
        return Err(Error::invalid(OP, format!("{} partial slots for {parts} blocks", partial.len())));
    }
    if let Some(y) = y {
        check_len(OP, "y", y, x.len())?;
    }
    let n = x.len() as i64;
    let cfg = LaunchConfig { grid_dim: (parts as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: partial holds one slot per block; the kernel bounds-checks x (and y) by n.
    unsafe { kernels::reduce_partial_f32(gpu, cfg, x, &y, partial, n, op) }
}

/// The second pass: out[k] = the sum of segment k of `partial` (segments of p slots).
fn second_pass(gpu: &Gpu, partial: &CudaSlice<f32>, out: &mut CudaSlice<f32>, p: usize) -> Result<()> {
    const OP: &str = "reduce_final_f32";
    let segments = out.len();
    check_len(OP, "partial", partial, segments * p)?;
    let p = int(OP, p)?;
    // SAFETY: one block per segment reads its p slots and writes out[segment].
    unsafe { kernels::reduce_final_f32(gpu, per_block_config(segments)?, partial, out, p) }
}

/// out[0] = sum x or sum x^2; the result stays on the GPU.
pub(super) fn reduce(gpu: &Gpu, op: Reduce, x: &Tensor, out: &mut Tensor) -> Result<()> {
    two_pass(gpu, op, x, None, out)
}

/// out[0] = sum a b; the result stays on the GPU.
pub(super) fn dot(gpu: &Gpu, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()> {
    two_pass(gpu, Reduce::Sum, a, Some(b), out)
}

/// out[0] = sum x, sum x^2, or (with `y`) sum x y.
fn two_pass(gpu: &Gpu, op: Reduce, x: &Tensor, y: Option<&Tensor>, out: &mut Tensor) -> Result<()> {
    let (x, y, out) = (x.cuda()?, y.map(Tensor::cuda).transpose()?, out.cuda_mut()?);
    check_len("reduce_final_f32", "out", out, 1)?;
    let code = match (op, y) {
        (_, Some(_)) => 2,
        (Reduce::Sum, None) => 0,
        (Reduce::SumSq, None) => 1,
    };
    let parts = partials(x.len());
    // Every slot is written: the first pass runs one block per slot.
    let mut partial = gpu.uninit::<f32>(parts)?;
    first_pass(gpu, code, x, y, &mut partial.slice_mut(..))?;
    second_pass(gpu, &partial, out, parts)
}

/// out[t] = sum xs[t] or sum xs[t]^2, each bitwise what `reduce` gives: one first pass over every
/// tensor (`reduce_partial_each_f32`, each tensor's blocks doing what its own first pass would,
/// into its segment of PARTIALS slots), then one launch for every segment, so that the results
/// come back to the host in one copy.
pub(super) fn reduce_each(gpu: &Gpu, op: Reduce, xs: &[&Tensor], out: &mut Tensor) -> Result<()> {
    const OP: &str = "reduce_partial_each_f32";
    let out = out.cuda_mut()?;
    check_len("reduce_final_f32", "out", out, xs.len())?;
    let code = if op == Reduce::Sum { 0 } else { 1 };
    let mut slots = Vec::with_capacity(xs.len());
    let mut blocks = 0usize;
    for x in xs {
        let x = x.cuda()?;
        let parts = partials(x.len());
        let (ptr, _sync) = x.device_ptr(&gpu.stream);
        slots.push(ReduceSlot { x: ptr, n: x.len() as i64, first_block: blocks as i64, blocks: parts as i32 });
        blocks += parts;
    }
    let slots = gpu.upload(&slots)?;
    let mut partial = gpu.uninit::<f32>(xs.len() * PARTIALS)?;
    let cfg = per_block_config(blocks)?;
    let (count, p, op) = (int(OP, xs.len())?, int(OP, PARTIALS)?, code);
    // SAFETY: each slot addresses a live buffer of its n floats (the tensors are borrowed for the
    // call; the stream orders the launch before any later free); the blocks cover every slot's
    // and partial holds PARTIALS slots per tensor.
    unsafe { kernels::reduce_partial_each_f32(gpu, cfg, &slots, count, &mut partial, p, op)? };
    second_pass(gpu, &partial, out, PARTIALS)
}
