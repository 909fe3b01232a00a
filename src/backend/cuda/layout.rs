//! Launchers of kernels/layout.cu: per-channel bias, scale and dot, channel concat/slice, complex
//! packing and circular shifts. Activations are [B, C, S] with S the product of the rest.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{check_len, elementwise_config, int, launched, per_block_config, push_opt, Gpu};
use crate::error::Result;

/// [B, C, S] sizes of an activation.
pub type Bcs = (usize, usize, usize);

impl Gpu {
    /// y[b, c, s] += bias[c], in place.
    pub fn channel_bias(&self, y: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, (b, c, s): Bcs) -> Result<()> {
        const OP: &str = "channel_bias_f32";
        check_len(OP, "y", y, b * c * s)?;
        check_len(OP, "bias", bias, c)?;
        let (n, ci, s64) = ((b * c * s) as i64, int(OP, c)?, s as i64);
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(y).arg(bias).arg(&n).arg(&ci).arg(&s64);
        // SAFETY: lengths checked above.
        launched(OP, unsafe { l.launch(elementwise_config(b * c * s)) })
    }

    /// y[b, c, s] = x[b, c, s] l[c].
    pub fn channel_scale(&self, x: &CudaSlice<f32>, l: &CudaSlice<f32>, y: &mut CudaSlice<f32>, (b, c, s): Bcs) -> Result<()> {
        const OP: &str = "channel_scale_f32";
        check_len(OP, "x", x, b * c * s)?;
        check_len(OP, "y", y, b * c * s)?;
        check_len(OP, "l", l, c)?;
        let (n, ci, s64) = ((b * c * s) as i64, int(OP, c)?, s as i64);
        let f = self.function(OP)?;
        let mut a = self.stream.launch_builder(&f);
        a.arg(x).arg(l).arg(y).arg(&n).arg(&ci).arg(&s64);
        // SAFETY: lengths checked above.
        launched(OP, unsafe { a.launch(elementwise_config(b * c * s)) })
    }

    /// out[c] = sum over b, s of a[b, c, s] y[b, c, s] (or of a alone), b summed in order.
    pub fn channel_dot(&self, a: &CudaSlice<f32>, y: Option<&CudaSlice<f32>>, out: &mut CudaSlice<f32>, (b, c, s): Bcs) -> Result<()> {
        const OP: &str = "channel_dot_partials_f32";
        check_len(OP, "a", a, b * c * s)?;
        check_len(OP, "out", out, c)?;
        let mut partial = self.zeros::<f32>(b * c)?;
        let (planes, s64, null) = (int(OP, b * c)?, s as i64, 0u64);
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(a);
        push_opt(&mut l, OP, "b", y, b * c * s, &null)?;
        l.arg(&mut partial).arg(&planes).arg(&s64);
        // SAFETY: lengths checked above; one block per (b, c) plane.
        launched(OP, unsafe { l.launch(per_block_config(b * c)?) })?;
        self.channel_sum_partials(&partial, out, b, c)
    }

    /// Concat (`slice` false): dst[:, off .. off + Cs] = src; slice: dst = src[:, off .. off + Cd].
    /// src is [B, Cs, S] and dst [B, Cd, S].
    #[allow(clippy::too_many_arguments)]
    pub fn copy_channels(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        b: usize,
        cs: usize,
        cd: usize,
        s: usize,
        off: usize,
        slice: bool,
    ) -> Result<()> {
        const OP: &str = "copy_channels_f32";
        check_len(OP, "src", src, b * cs * s)?;
        check_len(OP, "dst", dst, b * cd * s)?;
        let inner = if slice { cd } else { cs };
        let outer = if slice { cs } else { cd };
        if off + inner > outer {
            return Err(crate::error::Error::invalid(OP, format!("channels {off}..{} do not fit {outer}", off + inner)));
        }
        let (bi, csi, cdi, s64, offi, sl) = (int(OP, b)?, int(OP, cs)?, int(OP, cd)?, s as i64, int(OP, off)?, slice as i32);
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(src).arg(dst).arg(&bi).arg(&csi).arg(&cdi).arg(&s64).arg(&offi).arg(&sl);
        // SAFETY: lengths and the channel window checked above.
        launched(OP, unsafe { l.launch(elementwise_config(b * inner * s)) })
    }

    /// [B, 2C, S] real-then-imaginary channels to complex [B, C, S, 2], or back (`unpack`).
    pub fn pack_complex(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, (b, c, s): Bcs, unpack: bool) -> Result<()> {
        const OP: &str = "pack_complex_f32";
        check_len(OP, "x", x, b * c * s * 2)?;
        check_len(OP, "y", y, b * c * s * 2)?;
        let (bi, ci, s64, u) = (int(OP, b)?, int(OP, c)?, s as i64, unpack as i32);
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(y).arg(&bi).arg(&ci).arg(&s64).arg(&u);
        // SAFETY: lengths checked above.
        launched(OP, unsafe { l.launch(elementwise_config(b * c * s)) })
    }

    /// Circular shift by (sh, sw) of the (H, W) dimensions of `planes` planes of [H, W, inner].
    #[allow(clippy::too_many_arguments)]
    pub fn roll2d(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, planes: usize, h: usize, w: usize, inner: usize, sh: usize, sw: usize) -> Result<()> {
        const OP: &str = "roll2d_f32";
        let n = planes * h * w * inner;
        check_len(OP, "x", x, n)?;
        check_len(OP, "y", y, n)?;
        if n == 0 {
            return Ok(());
        }
        let (p64, hi, wi, ii, shi, swi) = (planes as i64, int(OP, h)?, int(OP, w)?, int(OP, inner)?, int(OP, sh % h)?, int(OP, sw % w)?);
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(y).arg(&p64).arg(&hi).arg(&wi).arg(&ii).arg(&shi).arg(&swi);
        // SAFETY: lengths checked above.
        launched(OP, unsafe { l.launch(elementwise_config(n)) })
    }
}
