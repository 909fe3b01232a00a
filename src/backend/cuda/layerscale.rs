//! Launchers of kernels/layerscale.cu: y = x + l[c] br, and its backward (dbr = l dy, dl = sum dy br).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{check_len, elementwise_config, int, launched, per_block_config, Gpu};
use crate::error::Result;

impl Gpu {
    /// x, br, y [B, C, S]; l [C].
    pub fn layerscale_fwd(
        &self,
        x: &CudaSlice<f32>,
        br: &CudaSlice<f32>,
        l: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        bcs: (usize, usize, usize),
    ) -> Result<()> {
        const OP: &str = "layerscale_fwd_f32";
        let (b, c, s) = bcs;
        for (name, buf) in [("x", x), ("br", br)] {
            check_len(OP, name, buf, b * c * s)?;
        }
        check_len(OP, "y", y, b * c * s)?;
        check_len(OP, "l", l, c)?;
        let f = self.function(OP)?;
        let (bi, ci, si) = (int(OP, b)?, int(OP, c)?, int(OP, s)?);
        let mut a = self.stream.launch_builder(&f);
        a.arg(x).arg(br).arg(l).arg(y).arg(&bi).arg(&ci).arg(&si);
        // SAFETY: lengths checked above.
        launched(OP, unsafe { a.launch(elementwise_config(b * c * s)) })
    }

    /// dbr = l dy and dl = sum_{b,s} dy br (deterministic: per-plane partials summed in order).
    pub fn layerscale_bwd(
        &self,
        dy: &CudaSlice<f32>,
        br: &CudaSlice<f32>,
        l: &CudaSlice<f32>,
        dbr: &mut CudaSlice<f32>,
        dl: &mut CudaSlice<f32>,
        bcs: (usize, usize, usize),
    ) -> Result<()> {
        const OP: &str = "layerscale_bwd_f32";
        let (b, c, s) = bcs;
        check_len(OP, "dy", dy, b * c * s)?;
        check_len(OP, "br", br, b * c * s)?;
        check_len(OP, "dbr", dbr, b * c * s)?;
        check_len(OP, "l", l, c)?;
        check_len(OP, "dl", dl, c)?;
        let mut partial = self.zeros::<f32>(b * c)?;
        let (bi, ci, si) = (int(OP, b)?, int(OP, c)?, int(OP, s)?);
        let f = self.function(OP)?;
        let mut a = self.stream.launch_builder(&f);
        a.arg(dy).arg(br).arg(l).arg(dbr).arg(&mut partial).arg(&bi).arg(&ci).arg(&si);
        // SAFETY: lengths checked above; one block per (b, c) plane.
        launched(OP, unsafe { a.launch(per_block_config(b * c)?) })?;
        self.channel_sum_partials(&partial, dl, b, c)
    }

    /// out[c] = sum_b partial[b, c], in order of b.
    pub fn channel_sum_partials(&self, partial: &CudaSlice<f32>, out: &mut CudaSlice<f32>, b: usize, c: usize) -> Result<()> {
        const OP: &str = "channel_sum_partials_f32";
        check_len(OP, "partial", partial, b * c)?;
        check_len(OP, "out", out, c)?;
        let (bi, ci) = (int(OP, b)?, int(OP, c)?);
        let f = self.function(OP)?;
        let mut a = self.stream.launch_builder(&f);
        a.arg(partial).arg(out).arg(&bi).arg(&ci);
        // SAFETY: lengths checked above.
        launched(OP, unsafe { a.launch(elementwise_config(c)) })
    }
}
