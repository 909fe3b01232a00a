//! `train.tf32`: cuBLAS's GEMMs (the convolutions) in TF32 tensor-op math, against the CPU, on
//! the driver stand-in, which rounds every GEMM operand to TF32 in that mode (10 mantissa bits,
//! to nearest, ties away from zero) as a tensor core takes it. In its own binary: the math mode is
//! the process's for the GPU, and the other GPU tests compare FP32 GEMMs at 1e-4.
//!
//! The bars are what TF32 rounding costs, measured here on the stand-in, with room: a
//! convolution's output 2.6e-4 to 3.3e-4 from the CPU's (relative to the output's largest
//! magnitude; bar 2e-3), a training step's loss 1e-7 to 1.2e-6 relative (bar 1e-4) and its
//! gradient norm 5e-5 to 2e-4 (bar 2e-3). FP32 mode stays within 1e-4 of the CPU (measured
//! 2e-7 to 7e-7), and TF32 must differ from it (the rounding is on).

use fnokern::backend::{self, Conv2dParams};
use fnokern::plan::SteadyState;
use fnokern::{DType, Device, Tensor};

mod common;

/// max |a - b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f64::max);
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

/// Three steady-state steps of the tiny config on `dev`: each step's loss and gradient norm.
fn steps(dev: &Device, tf32: bool) -> Vec<(f64, f64)> {
    let mut cfg = common::tiny(std::path::Path::new("unused"));
    cfg.model.depth = 3;
    cfg.train.tf32 = tf32;
    cfg.train.device = if dev.kind().is_gpu() { "cuda".into() } else { "cpu".into() };
    let mut s = SteadyState::new(&cfg, dev).unwrap();
    (0..3)
        .map(|_| {
            let r = s.trainer.step(s.batch.clone(), true).unwrap();
            (r.loss.unwrap(), r.clip.unwrap().norm_before)
        })
        .collect()
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn tf32_gemms_stay_within_their_rounding_of_the_cpu() {
    let Some(gpu) = common::standin::cuda_device("tf32") else { return };
    if common::standin::standin().is_none() {
        eprintln!("tf32: on a real GPU the bars are a card's, not the emulation's; run anyway");
    }
    let cpu = Device::cpu();
    let g = fnokern::backend::gpu::Gpu::shared(0).unwrap();
    // A 3x3 convolution deep enough (K = 16 x 9) for the rounding to add up, its two gradients.
    let p = Conv2dParams::new(1, 1);
    let x = Tensor::randn([2, 16, 12, 10], 1.0, 1, DType::F32, &cpu).unwrap();
    let w = Tensor::randn([24, 16, 3, 3], 0.2, 2, DType::F32, &cpu).unwrap();
    let dy = Tensor::randn([2, 24, 12, 10], 1.0, 3, DType::F32, &cpu).unwrap();
    let ops = |dev: &Device| {
        let (x, w, dy) = (x.to_device(dev).unwrap(), w.to_device(dev).unwrap(), dy.to_device(dev).unwrap());
        [
            backend::conv2d(&x, &w, None, p).unwrap(),
            backend::conv2d_bwd_input(&dy, &w, x.shape(), p).unwrap(),
            backend::conv2d_bwd_weight(&x, &dy, w.shape(), p).unwrap(),
        ]
    };
    let want = ops(&cpu);
    g.set_tf32(false);
    let fp32 = ops(&gpu);
    g.set_tf32(true);
    let tf32 = ops(&gpu);
    g.set_tf32(false);
    for (i, name) in ["conv2d", "conv2d_bwd_input", "conv2d_bwd_weight"].iter().enumerate() {
        let (e32, etf) = (rel(&fp32[i], &want[i]), rel(&tf32[i], &want[i]));
        eprintln!("{name}: FP32 {e32:.2e}, TF32 {etf:.2e} of the CPU (relative to the largest magnitude)");
        assert!(e32 < 1e-4, "{name}: FP32 GEMMs {e32:.2e} from the CPU");
        assert!(etf < 2e-3, "{name}: TF32 GEMMs {etf:.2e} from the CPU");
        assert!(rel(&tf32[i], &fp32[i]) > 1e-5, "{name}: TF32 gave the FP32 result (is the rounding on?)");
    }

    // Whole training steps: the loss and the gradient norm.
    let want = steps(&cpu, false);
    let got = steps(&gpu, true);
    let fp32 = steps(&gpu, false);
    for (k, ((w, t), f)) in want.iter().zip(&got).zip(&fp32).enumerate() {
        let (dl, dn) = ((t.0 - w.0).abs() / w.0.abs(), (t.1 - w.1).abs() / w.1.abs());
        eprintln!("step {k}: loss {:.6e} (TF32 {:+.1e} relative), gradient norm {:.4e} (TF32 {:+.1e})", w.0, dl, w.1, dn);
        assert!(dl < 1e-4 && dn < 2e-3, "step {k}: TF32 loss {} norm {} against the CPU's {} and {}", t.0, t.1, w.0, w.1);
        assert!((f.0 - w.0).abs() / w.0.abs() < 1e-4, "step {k}: FP32 loss {} against the CPU's {}", f.0, w.0);
    }
    assert!(got.iter().zip(&fp32).any(|(t, f)| t != f), "TF32 steps repeat the FP32 ones exactly");
}
