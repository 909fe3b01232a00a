//! Launchers of kernels/adam.cu: the fused Adam / AdamW and SGD updates, in place.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{check_len, elementwise_config, launched, push_opt, Gpu};
use crate::backend::{AdamStep, SgdStep};
use crate::error::Result;

impl Gpu {
    /// One update of p, m, v (all [n]) from g, with the same hyper-parameters as the CPU's.
    pub fn adam_step(&self, p: &mut CudaSlice<f32>, g: &CudaSlice<f32>, m: &mut CudaSlice<f32>, v: &mut CudaSlice<f32>, h: &AdamStep) -> Result<()> {
        const OP: &str = "adam_step_f32";
        let n = p.len();
        check_len(OP, "g", g, n)?;
        check_len(OP, "m", m, n)?;
        check_len(OP, "v", v, n)?;
        let bc1 = (1.0 - h.beta1.powi(h.step as i32)) as f32;
        let bc2 = (1.0 - h.beta2.powi(h.step as i32)) as f32;
        let (lr, b1, b2, eps, wd, s) = (h.lr as f32, h.beta1 as f32, h.beta2 as f32, h.eps as f32, h.weight_decay as f32, h.grad_scale as f32);
        let (n64, decoupled) = (n as i64, h.decoupled as i32);
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(p).arg(g).arg(m).arg(v).arg(&n64);
        l.arg(&lr).arg(&b1).arg(&b2).arg(&eps).arg(&wd).arg(&bc1).arg(&bc2).arg(&s).arg(&decoupled);
        // SAFETY: lengths checked above.
        launched(OP, unsafe { l.launch(elementwise_config(n)) })
    }

    /// One SGD update of p (and its momentum buffer, when given) from g.
    pub fn sgd_step(&self, p: &mut CudaSlice<f32>, g: &CudaSlice<f32>, buf: Option<&mut CudaSlice<f32>>, h: &SgdStep) -> Result<()> {
        const OP: &str = "sgd_step_f32";
        let n = p.len();
        check_len(OP, "g", g, n)?;
        let (lr, mu, wd, s) = (h.lr as f32, h.momentum as f32, h.weight_decay as f32, h.grad_scale as f32);
        let (n64, nesterov, first, null) = (n as i64, h.nesterov as i32, h.first as i32, 0u64);
        let f = self.function(OP)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(p).arg(g);
        push_opt(&mut l, OP, "buf", buf, n, &null)?;
        l.arg(&n64).arg(&lr).arg(&mu).arg(&wd).arg(&s).arg(&nesterov).arg(&first);
        // SAFETY: lengths checked above.
        launched(OP, unsafe { l.launch(elementwise_config(n)) })
    }
}
