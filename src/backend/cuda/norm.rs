//! Launchers of kernels/norm.cu: FP32-promoted LayerNorm, RMSNorm and InstanceNorm for f32, f16
//! and bf16 inputs (statistics, gamma, beta and their gradients in fp32).

use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};

use super::{check_len, int, launched, per_block_config, push_opt, Gpu};
use crate::backend::NormKind;
use crate::error::Result;

/// An element type the norm kernels read and write.
pub trait NormElem: DeviceRepr {
    const SUFFIX: &'static str;
}
impl NormElem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl NormElem for half::f16 {
    const SUFFIX: &'static str = "f16";
}
impl NormElem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

fn kind_code(k: NormKind) -> i32 {
    match k {
        NormKind::LayerNorm => 0,
        NormKind::RmsNorm => 1,
        NormKind::InstanceNorm => 2,
    }
}

/// Normalisation groups of x [B, C, S]: B S for the channel norms, B C for InstanceNorm.
pub fn groups(kind: NormKind, (b, c, s): (usize, usize, usize)) -> usize {
    if kind.over_channels() {
        b * s
    } else {
        b * c
    }
}

impl Gpu {
    /// y = xhat gamma + beta; mean and rstd per group (fp32).
    #[allow(clippy::too_many_arguments)]
    pub fn norm_fwd<T: NormElem>(
        &self,
        kind: NormKind,
        x: &CudaSlice<T>,
        gamma: Option<&CudaSlice<f32>>,
        beta: Option<&CudaSlice<f32>>,
        eps: f32,
        y: &mut CudaSlice<T>,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        bcs: (usize, usize, usize),
    ) -> Result<()> {
        const OP: &str = "norm_fwd";
        let (b, c, s) = bcs;
        let g = groups(kind, bcs);
        check_len(OP, "x", x, b * c * s)?;
        check_len(OP, "y", y, b * c * s)?;
        check_len(OP, "mean", mean, g)?;
        check_len(OP, "rstd", rstd, g)?;
        let name = format!("norm_fwd_{}", T::SUFFIX);
        let f = self.function(&name)?;
        let (k, bi, ci, si) = (kind_code(kind), int(OP, b)?, int(OP, c)?, int(OP, s)?);
        let null = 0u64;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x);
        push_opt(&mut l, OP, "gamma", gamma, c, &null)?;
        push_opt(&mut l, OP, "beta", beta, c, &null)?;
        l.arg(y).arg(mean).arg(rstd).arg(&k).arg(&bi).arg(&ci).arg(&si).arg(&eps);
        // SAFETY: lengths checked above; one block per group.
        launched(OP, unsafe { l.launch(per_block_config(g)?) })
    }

    /// dx (in the input's type), and dgamma / dbeta (fp32) when asked for.
    #[allow(clippy::too_many_arguments)]
    pub fn norm_bwd<T: NormElem>(
        &self,
        kind: NormKind,
        x: &CudaSlice<T>,
        dy: &CudaSlice<T>,
        gamma: Option<&CudaSlice<f32>>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        dx: &mut CudaSlice<T>,
        dgamma: Option<&mut CudaSlice<f32>>,
        dbeta: Option<&mut CudaSlice<f32>>,
        bcs: (usize, usize, usize),
    ) -> Result<()> {
        const OP: &str = "norm_bwd";
        let (b, c, s) = bcs;
        let g = groups(kind, bcs);
        for (name, buf) in [("x", x), ("dy", dy)] {
            check_len(OP, name, buf, b * c * s)?;
        }
        check_len(OP, "dx", dx, b * c * s)?;
        check_len(OP, "mean", mean, g)?;
        check_len(OP, "rstd", rstd, g)?;
        let (k, bi, ci, si) = (kind_code(kind), int(OP, b)?, int(OP, c)?, int(OP, s)?);
        let name = format!("norm_bwd_{}", T::SUFFIX);
        let f = self.function(&name)?;
        let null = 0u64;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(dy);
        push_opt(&mut l, OP, "gamma", gamma, c, &null)?;
        l.arg(mean).arg(rstd).arg(dx).arg(&k).arg(&bi).arg(&ci).arg(&si);
        // SAFETY: lengths checked above; one block per group.
        launched(OP, unsafe { l.launch(per_block_config(g)?) })?;
        if dgamma.is_none() && dbeta.is_none() {
            return Ok(());
        }
        let name = format!("norm_affine_bwd_{}", T::SUFFIX);
        let f = self.function(&name)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(dy).arg(mean).arg(rstd);
        push_opt(&mut l, OP, "dgamma", dgamma, c, &null)?;
        push_opt(&mut l, OP, "dbeta", dbeta, c, &null)?;
        l.arg(&k).arg(&bi).arg(&ci).arg(&si);
        // SAFETY: lengths checked above; one block per channel.
        launched(OP, unsafe { l.launch(per_block_config(c)?) })
    }
}
