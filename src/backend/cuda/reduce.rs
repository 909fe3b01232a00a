//! Launchers of kernels/reduce.cu: deterministic sums, sums of squares and dot products (two
//! launches each), and the sums of squares of many tensors at once (one more launch per tensor).

use cudarc::driver::{CudaSlice, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{check_len, int, launched, per_block_config, push_opt, Gpu, BLOCK};
use crate::backend::Reduce;
use crate::error::{Error, Result};

/// Blocks of the first pass at most. A reduction of n elements uses min(256, ceil(n / BLOCK))
/// blocks: a function of n alone, so the order of additions never changes for a given shape.
pub const PARTIALS: usize = 256;

/// Blocks of the first pass over n elements.
pub fn partials(n: usize) -> usize {
    n.div_ceil(BLOCK as usize).clamp(1, PARTIALS)
}

impl Gpu {
    /// The first pass over x (and y for the dot product) into `partial`, `partials(n)` blocks.
    fn reduce_partial(&self, code: i32, x: &CudaSlice<f32>, y: Option<&CudaSlice<f32>>, partial: &mut CudaViewMut<f32>) -> Result<()> {
        const OP: &str = "reduce_partial_f32";
        let parts = partials(x.len());
        if partial.len() < parts {
            return Err(Error::invalid(OP, format!("{} partial slots for {parts} blocks", partial.len())));
        }
        let n64 = x.len() as i64;
        let null = 0u64;
        let f = self.function(OP)?;
        let cfg = LaunchConfig { grid_dim: (parts as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(&f);
        l.arg(x);
        push_opt(&mut l, OP, "y", y, x.len(), &null)?;
        l.arg(partial).arg(&n64).arg(&code);
        // SAFETY: partial holds one slot per block; the kernel bounds-checks x (and y) by n.
        launched(OP, unsafe { l.launch(cfg) })
    }

    /// The second pass: out[k] = the sum of segment k of `partial` (segments of p slots).
    fn reduce_final(&self, partial: &CudaSlice<f32>, out: &mut CudaSlice<f32>, p: usize) -> Result<()> {
        const OP: &str = "reduce_final_f32";
        let segments = out.len();
        check_len(OP, "partial", partial, segments * p)?;
        let pi = int(OP, p)?;
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(partial).arg(out).arg(&pi);
        // SAFETY: one block per segment reads its p slots and writes out[segment].
        launched(OP, unsafe { l.launch(per_block_config(segments)?) })
    }

    /// out[0] = sum x, sum x^2, or (with `y`) sum x y; the result stays on the GPU.
    pub fn reduce_into(&self, op: Reduce, x: &CudaSlice<f32>, y: Option<&CudaSlice<f32>>, out: &mut CudaSlice<f32>) -> Result<()> {
        check_len("reduce_final_f32", "out", out, 1)?;
        let code: i32 = match (op, y) {
            (_, Some(_)) => 2,
            (Reduce::Sum, None) => 0,
            (Reduce::SumSq, None) => 1,
        };
        let parts = partials(x.len());
        let mut partial = self.zeros::<f32>(parts)?;
        self.reduce_partial(code, x, y, &mut partial.slice_mut(..))?;
        self.reduce_final(&partial, out, parts)
    }

    /// out[t] = sum xs[t] or sum xs[t]^2, each bitwise what `reduce_into` gives: one first pass
    /// per tensor into its own segment of PARTIALS slots (unused slots stay 0), then one launch
    /// for every segment, so that the results come back to the host in one copy.
    pub fn reduce_each(&self, op: Reduce, xs: &[&CudaSlice<f32>], out: &mut CudaSlice<f32>) -> Result<()> {
        check_len("reduce_final_f32", "out", out, xs.len())?;
        if xs.is_empty() {
            return Ok(());
        }
        let code = if op == Reduce::Sum { 0 } else { 1 };
        let mut partial = self.zeros::<f32>(xs.len() * PARTIALS)?;
        for (t, x) in xs.iter().enumerate() {
            self.reduce_partial(code, x, None, &mut partial.slice_mut(t * PARTIALS..(t + 1) * PARTIALS))?;
        }
        self.reduce_final(&partial, out, PARTIALS)
    }

    /// sum x or sum x^2, as one number copied back.
    pub fn reduce(&self, op: Reduce, x: &CudaSlice<f32>) -> Result<f32> {
        let mut out = self.zeros::<f32>(1)?;
        self.reduce_into(op, x, None, &mut out)?;
        Ok(self.download(&out)?[0])
    }
}
