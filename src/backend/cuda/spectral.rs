//! Launchers of kernels/spectral.cu: the spectral mode multiply and its two backward products.
//! Complex buffers are interleaved (re, im) f32: spectra [B, C, H, Wh, 2], weights [Ci, Co, R, My, 2].

use std::collections::hash_map::Entry;

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{check_len, elementwise_config, int, launched, Gpu};
use crate::error::{Error, Result};

/// Sizes of one spectral mix; the kept rows (R of them) are passed beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpectralDims {
    pub b: usize,
    pub ci: usize,
    pub co: usize,
    pub h: usize,
    /// Columns of the half spectrum (W / 2 + 1).
    pub wh: usize,
    /// Kept columns.
    pub my: usize,
}

impl SpectralDims {
    /// Floats of a [B, c, H, Wh] complex spectrum.
    fn spectrum(&self, c: usize) -> usize {
        self.b * c * self.h * self.wh * 2
    }
    /// Floats of a [Ci, Co, R, My] complex weight.
    fn weight(&self, r: usize) -> usize {
        self.ci * self.co * r * self.my * 2
    }
    fn check(&self, op: &'static str, rows: &[usize]) -> Result<()> {
        if self.my > self.wh || rows.len() > self.h || rows.iter().any(|&r| r >= self.h) {
            return Err(Error::invalid(op, format!("kept modes do not fit the spectrum: rows {rows:?}, {} of {} columns, {} rows", self.my, self.wh, self.h)));
        }
        Ok(())
    }
}

type Bufs<'a> = (&'a CudaSlice<f32>, &'a CudaSlice<f32>);

impl Gpu {
    fn spectral_launch(&self, name: &'static str, inputs: Bufs, rows: &[usize], out: &mut CudaSlice<f32>, d: SpectralDims, threads: usize) -> Result<()> {
        let rows_i: Vec<i32> = rows.iter().map(|&r| int(name, r)).collect::<Result<_>>()?;
        // The kept rows of a layer never change: uploaded once, not once per launch (an upload
        // from pageable memory may also wait for the stream).
        let mut cache = self.spectral_rows.lock().map_err(|_| Error::invalid(name, "a thread panicked during a spectral launch"))?;
        let rows_d = match cache.entry(rows_i) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let uploaded = self.upload(e.key())?;
                e.insert(uploaded)
            }
        };
        let f = self.function(name)?;
        // The kernels' trailing ints, in their order: B, Ci, Co, H, Wh, R, My.
        let dims: Vec<i32> = [d.b, d.ci, d.co, d.h, d.wh, rows.len(), d.my].into_iter().map(|v| int(name, v)).collect::<Result<_>>()?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(inputs.0).arg(inputs.1).arg(&*rows_d).arg(out);
        for v in &dims {
            l.arg(v);
        }
        // SAFETY: the launcher checked every buffer's length against the kernel's indexing.
        launched(name, unsafe { l.launch(elementwise_config(threads)) })
    }

    /// y = mix(x, w) on the kept modes, zero elsewhere.
    pub fn spectral_mix_fwd(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: &[usize], y: &mut CudaSlice<f32>, d: SpectralDims) -> Result<()> {
        const OP: &str = "spectral_mix_fwd_f32";
        d.check(OP, rows)?;
        check_len(OP, "x", x, d.spectrum(d.ci))?;
        check_len(OP, "w", w, d.weight(rows.len()))?;
        check_len(OP, "y", y, d.spectrum(d.co))?;
        self.clear(y)?;
        self.spectral_launch(OP, (x, w), rows, y, d, d.b * d.co * rows.len() * d.my)
    }

    /// dx = sum_o dy conj(w) on the kept modes, zero elsewhere.
    pub fn spectral_mix_bwd_input(&self, dy: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: &[usize], dx: &mut CudaSlice<f32>, d: SpectralDims) -> Result<()> {
        const OP: &str = "spectral_mix_bwd_input_f32";
        d.check(OP, rows)?;
        check_len(OP, "dy", dy, d.spectrum(d.co))?;
        check_len(OP, "w", w, d.weight(rows.len()))?;
        check_len(OP, "dx", dx, d.spectrum(d.ci))?;
        self.clear(dx)?;
        self.spectral_launch(OP, (dy, w), rows, dx, d, d.b * d.ci * rows.len() * d.my)
    }

    /// dw = sum_b conj(x) dy.
    pub fn spectral_mix_bwd_weight(&self, x: &CudaSlice<f32>, dy: &CudaSlice<f32>, rows: &[usize], dw: &mut CudaSlice<f32>, d: SpectralDims) -> Result<()> {
        const OP: &str = "spectral_mix_bwd_weight_f32";
        d.check(OP, rows)?;
        check_len(OP, "x", x, d.spectrum(d.ci))?;
        check_len(OP, "dy", dy, d.spectrum(d.co))?;
        check_len(OP, "dw", dw, d.weight(rows.len()))?;
        self.spectral_launch(OP, (x, dy), rows, dw, d, d.ci * d.co * rows.len() * d.my)
    }
}
