//! Launchers of kernels/reduce.cu: deterministic sums, sums of squares and dot products (two
//! launches each).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{check_len, int, launched, push_opt, Gpu, BLOCK};
use crate::backend::Reduce;
use crate::error::Result;

/// Blocks of the first pass (fixed, so the order of additions never changes).
pub const PARTIALS: usize = 256;

impl Gpu {
    /// out[0] = sum x, sum x^2, or (with `y`) sum x y; the result stays on the GPU.
    pub fn reduce_into(&self, op: Reduce, x: &CudaSlice<f32>, y: Option<&CudaSlice<f32>>, out: &mut CudaSlice<f32>) -> Result<()> {
        const OP: &str = "reduce_partial_f32";
        let code: i32 = match (op, y) {
            (_, Some(_)) => 2,
            (Reduce::Sum, None) => 0,
            (Reduce::SumSq, None) => 1,
        };
        check_len("reduce_final_f32", "out", out, 1)?;
        let n64 = x.len() as i64;
        let null = 0u64;
        let mut partial = self.zeros::<f32>(PARTIALS)?;
        let f = self.function(OP)?;
        let cfg = LaunchConfig { grid_dim: (PARTIALS as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(&f);
        l.arg(x);
        push_opt(&mut l, OP, "y", y, x.len(), &null)?;
        l.arg(&mut partial).arg(&n64).arg(&code);
        // SAFETY: partial holds one slot per block; the kernel bounds-checks x (and y) by n.
        launched(OP, unsafe { l.launch(cfg) })?;
        let p = int("reduce_final_f32", PARTIALS)?;
        let f = self.function("reduce_final_f32")?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = self.stream.launch_builder(&f);
        l.arg(&partial).arg(out).arg(&p);
        // SAFETY: one block reads PARTIALS values and writes out[0].
        launched("reduce_final_f32", unsafe { l.launch(cfg) })
    }

    /// sum x or sum x^2, as one number copied back.
    pub fn reduce(&self, op: Reduce, x: &CudaSlice<f32>) -> Result<f32> {
        let mut out = self.zeros::<f32>(1)?;
        self.reduce_into(op, x, None, &mut out)?;
        Ok(self.download(&out)?[0])
    }
}
