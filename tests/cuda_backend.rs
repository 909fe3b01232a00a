//! The CUDA backend behind `Device::cuda`: every op of the backend surface, run through the same
//! dispatch functions on the CPU (the specification) and on the GPU with the same inputs, on odd
//! shapes, forward and backward; then one whole training step of a small generator, a short
//! training run with exact resume, and the memory ledger against the meta plan.
//!
//! One test body serves both devices: each case is a closure from a device to named outputs.
//! |got - ref| <= atol + rtol |ref|, printing the first mismatches. Without a GPU (or driver,
//! kernels, cuBLAS, cuFFT) every test prints that it skipped and passes.
//! The tolerances are for f32 arithmetic on the GPU against the CPU's f32 storage with f64
//! accumulation: 1e-5 for element-wise maps, 1e-4 for sums over up to a few hundred terms
//! (convolutions, FFTs, norms), looser where a whole step compounds them (stated there).

use std::path::Path;

mod common;
use common::{assert_close as close, randn, tempdir, tiny, UNARY};
use fnokern::backend::{self, AdamStep, Binary, NormKind, Reduce, SgdStep, Unary};
use fnokern::config::{Config, LossConfig};
use fnokern::loss;
use fnokern::model::{Generator, Grid};
use fnokern::optim::Optimizer;
use fnokern::train::{self, RunOptions};
use fnokern::{Conv2dParams, DType, Device, DeviceKind, ModeConvention, SpectralModes, Tape, Tensor};

fn cuda(test: &str) -> Option<Device> {
    common::standin::cuda_device(test)
}

/// Uniform in [0.5, 2): inputs for sqrt and ln.
fn positive(dev: &Device, shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape.to_vec(), 0.5, 2.0, seed, DType::F32, dev).unwrap()
}

type Outputs = Vec<(String, Tensor)>;

/// Runs `case` on the CPU and on the GPU and compares every named output; checks that the GPU's
/// outputs really live on the GPU. Without a GPU the case still runs on the CPU, so that the
/// case itself is exercised on every machine.
fn on_both(test: &str, atol: f64, rtol: f64, case: impl Fn(&Device) -> Outputs) {
    let want = case(&Device::cpu());
    assert!(!want.is_empty());
    let Some(gpu) = cuda(test) else { return };
    // On the stand-in, with its race check: no two blocks of a launch may write the same bytes.
    let standin = match common::standin::cuda() {
        common::standin::Cuda::Standin(s) => Some(s),
        _ => None,
    };
    standin.inspect(|s| s.racecheck(true));
    let got = case(&gpu);
    standin.inspect(|s| s.racecheck(false));
    assert_eq!(want.len(), got.len());
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        assert_eq!(g.device().kind(), DeviceKind::Cuda(0), "{name} was not computed on the GPU");
        close(&format!("{test}: {name}"), g, w, atol, rtol);
    }
    eprintln!("{test}: {} outputs match", got.len());
}

fn out(name: impl Into<String>, t: Tensor) -> (String, Tensor) {
    (name.into(), t)
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn element_wise_ops_and_reductions_match_the_cpu() {
    on_both("element-wise", 1e-5, 1e-5, |dev| {
        let shape = [3, 5, 7, 9];
        let (a, b) = (randn(dev, &shape, 1), randn(dev, &shape, 2));
        let pos = positive(dev, &shape, 3);
        let mut o = Outputs::new();
        for op in UNARY {
            let x = if matches!(op, Unary::Sqrt | Unary::Log) { &pos } else { &a };
            o.push(out(format!("{op:?}"), backend::unary(op, x).unwrap()));
            o.push(out(format!("{op:?}'"), backend::unary_bwd(op, x, &b).unwrap()));
        }
        for op in [Binary::Add, Binary::Sub, Binary::Mul] {
            o.push(out(format!("{op:?}"), backend::binary(op, &a, &b).unwrap()));
        }
        // The sum and its GELU in one launch.
        let (sum, act) = backend::add_gelu(&a, &b).unwrap();
        o.push(out("add_gelu sum", sum));
        o.push(out("add_gelu GELU", act));
        // add_into writes into a uniquely held operand.
        o.push(out("add_into", backend::add_into(randn(dev, &shape, 1), randn(dev, &shape, 4)).unwrap()));
        o.push(out("affine", backend::affine(&a, -1.5, 0.25).unwrap()));
        let s = Tensor::full(1.75, [1], DType::F32, dev).unwrap();
        o.push(out("scale_by", backend::scale_by(&a, &s, false).unwrap()));
        o.push(out("divide_by", backend::scale_by(&a, &s, true).unwrap()));
        o.push(out("broadcast", backend::broadcast_scalar(&s, &a).unwrap()));
        o
    });
    // Sums over 945 terms: the GPU's f32 tree against the CPU's f64.
    on_both("reductions", 1e-4, 1e-5, |dev| {
        let (a, b) = (randn(dev, &[3, 5, 7, 9], 1), randn(dev, &[3, 5, 7, 9], 2));
        vec![
            out("sum", backend::reduce(Reduce::Sum, &a).unwrap()),
            out("sumsq", backend::reduce(Reduce::SumSq, &a).unwrap()),
            out("dot", backend::dot(&a, &b).unwrap()),
            // More elements than 256 blocks of 256 threads: the grid-stride loop.
            out("sum of 70001", backend::reduce(Reduce::Sum, &randn(dev, &[70_001], 5)).unwrap()),
        ]
    });
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn channel_ops_match_the_cpu() {
    on_both("channels", 1e-4, 1e-5, |dev| {
        let x = randn(dev, &[3, 5, 7, 9], 1);
        let br = randn(dev, &[3, 5, 7, 9], 2);
        let l = randn(dev, &[5], 3);
        let other = randn(dev, &[3, 2, 7, 9], 4);
        let cat = backend::concat_channels(&[&x, &other, &br]).unwrap();
        // Two parts take the one-launch kernels (concat2_f32, split2_f32), three the per-part copies.
        let cat2 = backend::concat_channels(&[&other, &x]).unwrap();
        let split2 = backend::split_channels(&cat2, &[2, 5]).unwrap();
        let split3 = backend::split_channels(&cat, &[5, 2, 5]).unwrap();
        vec![
            out("concat of two", cat2),
            out("split in two, first", split2[0].clone()),
            out("split in two, second", split2[1].clone()),
            out("split in three, second", split3[1].clone()),
            out("split in three, third", split3[2].clone()),
            out("channel_scale", backend::channel_scale(&x, &l).unwrap()),
            out("channel_dot", backend::channel_dot(&x, Some(&br)).unwrap()),
            out("channel_sum", backend::channel_dot(&x, None).unwrap()),
            out("layerscale", backend::layerscale(&x, &br, &l).unwrap()),
            out("layerscale dbranch", backend::layerscale_bwd(&x, &br, &l).unwrap().0),
            out("layerscale dl", backend::layerscale_bwd(&x, &br, &l).unwrap().1),
            out("slice", backend::slice_channels(&cat, 4, 5).unwrap()),
            out("concat", cat),
            out("to_complex", backend::channels_to_complex(&randn(dev, &[3, 6, 7, 9], 5)).unwrap()),
            out("to_channels", backend::complex_to_channels(&randn(dev, &[3, 3, 7, 9, 2], 6)).unwrap()),
        ]
    });
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn convolutions_match_the_cpu_in_every_geometry() {
    // (kernel, stride, padding): the U-Net's 3x3 convs, pointwise, the stride-2 down convs, and
    // odd cases; each by both GPU algorithms (`train.gpu_conv`): the implicit GEMMs, and im2col +
    // cuBLAS with the default columns budget and with a budget of one float, which runs every
    // convolution one sample per chunk (the weight gradient accumulating over chunks).
    let gpu = fnokern::backend::gpu::Gpu::shared(0).ok().filter(|_| cuda("conv").is_some());
    let algorithms = [("implicit", false, backend::conv::COLS_BUDGET), ("columns", true, backend::conv::COLS_BUDGET), ("columns", true, 1)];
    for ((k, stride, pad), (algorithm, columns, budget)) in
        [(3, 1, 1), (1, 1, 0), (3, 2, 1), (2, 2, 0), (1, 2, 0), (5, 1, 2)].into_iter().flat_map(|g| algorithms.map(|a| (g, a)))
    {
        backend::conv::set_cols_budget(budget);
        gpu.as_ref().inspect(|g| g.set_conv_columns(columns));
        on_both(&format!("conv k{k} s{stride} p{pad}, {algorithm}, columns budget {budget}"), 1e-4, 1e-4, |dev| {
            let p = Conv2dParams::new(stride, pad);
            let x = randn(dev, &[3, 5, 11, 9], 1);
            let w = randn(dev, &[7, 5, k, k], 2);
            let b = randn(dev, &[7], 3);
            let y = backend::conv2d(&x, &w, Some(&b), p).unwrap();
            let dy = randn(dev, y.dims(), 4);
            let wt = randn(dev, &[5, 7, k, k], 5);
            let bt = randn(dev, &[7], 6);
            // The output and its GELU in one launch (implicit GEMMs), or in turn (columns).
            let (z, act) = backend::conv2d_gelu(&x, &w, Some(&b), p).unwrap();
            vec![
                out("conv2d_gelu z", z),
                out("conv2d_gelu GELU", act),
                out("dx", backend::conv2d_bwd_input(&dy, &w, x.shape(), p).unwrap()),
                // Added into the gradient gathered so far (by the implicit GEMM as it writes).
                out("acc + dx", backend::conv2d_bwd_input_added(Some(randn(dev, x.dims(), 7)), &dy, &w, x.shape(), p).unwrap()),
                out("dw", backend::conv2d_bwd_weight(&x, &dy, w.shape(), p).unwrap()),
                out("dw with db", backend::conv2d_bwd_params(&x, &dy, w.shape(), p, true).unwrap().0),
                out("db", backend::conv2d_bwd_params(&x, &dy, w.shape(), p, true).unwrap().1.unwrap()),
                out("transposed", backend::conv_transpose2d(&x, &wt, Some(&bt), p).unwrap()),
                out("y", y),
            ]
        });
    }
    backend::conv::set_cols_budget(backend::conv::COLS_BUDGET);
    gpu.as_ref().inspect(|g| g.set_conv_columns(false));
    // A weight gradient over more than 4,096 terms (samples x positions) is summed in parts,
    // added in order by a second launch; 65 output channels and 66 weights per channel take two
    // output tiles a side, the last one partial. Sums of 4,440 products of magnitude ~1 (about 70
    // in size, with cancellation): f32's rounding of such a sum is ~1e-4, hence atol 1e-3.
    on_both("conv weight gradient in parts", 1e-3, 1e-4, |dev| {
        let p = Conv2dParams::new(1, 1);
        let x = randn(dev, &[3, 11, 40, 37], 1);
        let w = randn(dev, &[65, 11, 3, 2], 2);
        let y = backend::conv2d(&x, &w, None, p).unwrap();
        let dy = randn(dev, y.dims(), 3);
        let (dw, db) = backend::conv2d_bwd_params(&x, &dy, w.shape(), p, true).unwrap();
        vec![
            out("dw", backend::conv2d_bwd_weight(&x, &dy, w.shape(), p).unwrap()),
            out("dw with db", dw),
            out("db", db.unwrap()),
            out("y", y),
            out("dx", backend::conv2d_bwd_input(&dy, &w, x.shape(), p).unwrap()),
        ]
    });
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn ffts_and_complex_ops_match_the_cpu() {
    // Odd and even widths (with and without a Nyquist column), odd heights. The spectra fed to the
    // inverse transforms are random, so not Hermitian: this checks the DC/Nyquist convention.
    for (h, w) in [(9, 10), (8, 7), (6, 6), (5, 3)] {
        on_both(&format!("fft {h}x{w}"), 1e-4, 1e-4, |dev| {
            let x = randn(dev, &[3, 2, h, w], 1);
            let z = randn(dev, &[3, 2, h, w / 2 + 1, 2], 2);
            vec![
                out("rfft2", backend::rfft2(&x).unwrap()),
                out("irfft2", backend::irfft2(&z, w).unwrap()),
                out("rfft2_bwd", backend::rfft2_bwd(&z, w).unwrap()),
                out("irfft2_bwd", backend::irfft2_bwd(&x).unwrap()),
            ]
        });
    }
    on_both("complex", 1e-4, 1e-4, |dev| {
        let z = randn(dev, &[3, 2, 9, 10, 2], 1);
        let p = randn(dev, &[9, 10, 2], 2);
        let dy = randn(dev, &[3, 2, 9, 10], 3);
        let real = randn(dev, &[3, 2, 9, 10], 4);
        vec![
            out("fft2", backend::fft2(&z, false, 1.0).unwrap()),
            out("ifft2", backend::fft2(&z, true, 1.0 / 90.0).unwrap()),
            out("z p", backend::complex_mul(&z, &p, false).unwrap()),
            out("z conj p", backend::complex_mul(&z, &p, true).unwrap()),
            out("roll complex", backend::roll2d(&z, 4, 7, true).unwrap()),
            out("roll real", backend::roll2d(&real, 8, 3, false).unwrap()),
            out("abs", backend::complex_abs(&z).unwrap()),
            out("abs'", backend::complex_abs_bwd(&z, &dy).unwrap()),
            out("angle", backend::complex_angle(&z).unwrap()),
            out("angle'", backend::complex_angle_bwd(&z, &dy).unwrap()),
        ]
    });
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn spectral_mix_and_norms_match_the_cpu_through_the_dispatch() {
    on_both("spectral", 1e-4, 1e-4, |dev| {
        let modes = SpectralModes::new(4, ModeConvention::Corners);
        let (b, ci, co, h, w) = (3, 5, 7, 9, 10);
        let xh = randn(dev, &[b, ci, h, w / 2 + 1, 2], 1);
        let wt = randn(dev, modes.weight_shape(ci, co, h, w).dims(), 2);
        let dyh = randn(dev, &[b, co, h, w / 2 + 1, 2], 3);
        vec![
            out("mix", backend::spectral_mix(&xh, &wt, modes).unwrap()),
            out("dx", backend::spectral_mix_bwd_input(&dyh, &wt, modes).unwrap()),
            out("dw", backend::spectral_mix_bwd_weight(&xh, &dyh, wt.shape(), modes).unwrap()),
        ]
    });
    // The mix's launches that also make their results ready for the inverse transforms after
    // them (irfft2, rfft2's adjoint), against the CPU's mix then transform: odd and even widths,
    // a kept Nyquist column (width 6, 4 modes), kept rows whose Hermitian partners are kept too
    // and one whose partner is not (row H - 4, partner 4); 19 samples once (groups of 16 and 3).
    for (h, w, b) in [(9, 6, 19), (8, 7, 3), (6, 10, 3)] {
        on_both(&format!("spectral with the glue in the mix, {h}x{w}, {b} samples"), 1e-4, 1e-4, |dev| {
            let modes = SpectralModes::new(4, ModeConvention::Corners);
            let (ci, co) = (5, 7);
            let xh = randn(dev, &[b, ci, h, w / 2 + 1, 2], 1);
            let wt = randn(dev, modes.weight_shape(ci, co, h, w).dims(), 2);
            let dyh = randn(dev, &[b, co, h, w / 2 + 1, 2], 3);
            let (y, ready) = backend::spectral_mix_ready(&xh, &wt, modes, w).unwrap();
            assert_eq!(ready.is_some(), dev.kind() != DeviceKind::Cpu, "a ready spectrum only on a GPU");
            let image = backend::irfft2_ready(&y, w, ready).unwrap();
            let (dx, ready) = backend::spectral_mix_bwd_input_ready(&dyh, &wt, modes, w, None).unwrap();
            let adjoint = backend::rfft2_bwd_ready(&dx, w, ready).unwrap();
            // A ready spectrum made from another tensor is not used.
            let (_, other) = backend::spectral_mix_ready(&xh, &wt, modes, w).unwrap();
            let plain = backend::irfft2_ready(&y, w, other).unwrap();
            // dY straight from irfft2's adjoint without its column scale (on a GPU), which both
            // backward products apply as they read; the CPU's is scaled.
            let dy_image = randn(dev, &[b, co, h, w], 4);
            let (dz, unscaled) = backend::irfft2_bwd_unscaled(&dy_image).unwrap();
            assert_eq!(unscaled.is_some(), dev.kind() != DeviceKind::Cpu, "an unscaled spectrum only on a GPU");
            let (dx_u, _) = backend::spectral_mix_bwd_input_ready(&dz, &wt, modes, w, unscaled.as_ref()).unwrap();
            let dw_u = backend::spectral_mix_bwd_weight_unscaled(&xh, &dz, unscaled.as_ref(), wt.shape(), modes).unwrap();
            // Handed with another gradient, it is an error, not a wrong scale.
            if let Some(u) = &unscaled {
                let err = backend::spectral_mix_bwd_weight_unscaled(&xh, &dyh, Some(u), wt.shape(), modes).unwrap_err().to_string();
                assert!(err.contains("not the output gradient's"), "{err}");
            }
            vec![
                out("mix", y),
                out("irfft2 of the mix", image),
                out("dx", dx),
                out("rfft2_bwd of dx", adjoint),
                out("irfft2, another's ready", plain),
                out("dx of an unscaled dY", dx_u),
                out("dw of an unscaled dY", dw_u),
            ]
        });
    }
    on_both("norms", 1e-4, 1e-4, |dev| {
        let x = randn(dev, &[3, 5, 7, 9], 1);
        let dy = randn(dev, &[3, 5, 7, 9], 2);
        let (gamma, beta) = (randn(dev, &[5], 3), randn(dev, &[5], 4));
        let mut o = Outputs::new();
        for kind in [NormKind::LayerNorm, NormKind::RmsNorm, NormKind::InstanceNorm] {
            let n = backend::norm(kind, &x, Some(&gamma), Some(&beta), 1e-5).unwrap();
            let (dx, dg, db) = backend::norm_bwd(kind, &x, &dy, Some(&gamma), &n.mean, &n.rstd, true, true).unwrap();
            o.push(out(format!("{kind:?} y"), n.y));
            o.push(out(format!("{kind:?} mean"), n.mean));
            o.push(out(format!("{kind:?} rstd"), n.rstd));
            o.push(out(format!("{kind:?} dx"), dx));
            o.push(out(format!("{kind:?} dgamma"), dg.unwrap()));
            o.push(out(format!("{kind:?} dbeta"), db.unwrap()));
        }
        o
    });
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn optimiser_updates_and_clipping_match_the_cpu() {
    on_both("optimisers", 1e-5, 1e-5, |dev| {
        let g = randn(dev, &[7, 5, 3, 3], 2);
        let mut o = Outputs::new();
        for (name, decoupled) in [("adam", false), ("adamw", true)] {
            let mut p = randn(dev, &[7, 5, 3, 3], 1);
            let mut m = randn(dev, &[7, 5, 3, 3], 3);
            let mut v = backend::unary(Unary::Square, &randn(dev, &[7, 5, 3, 3], 4)).unwrap();
            let h = AdamStep { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, decoupled, step: 3, grad_scale: 0.5 };
            backend::adam_step(&mut [backend::AdamTensors { p: &mut p, g: &g, m: &mut m, v: &mut v }], &h).unwrap();
            o.extend([out(format!("{name} p"), p), out(format!("{name} m"), m), out(format!("{name} v"), v)]);
        }
        for (name, momentum, nesterov, first) in [("sgd", 0.0, false, false), ("momentum first", 0.9, false, true), ("nesterov", 0.9, true, false)] {
            let mut p = randn(dev, &[7, 5, 3, 3], 1);
            let mut buf = randn(dev, &[7, 5, 3, 3], 5);
            let h = SgdStep { lr: 1e-2, momentum, nesterov, weight_decay: 0.01, first, grad_scale: 2.0 };
            backend::sgd_step(&mut p, &g, (momentum > 0.0).then_some(&mut buf), &h).unwrap();
            o.extend([out(format!("{name} p"), p), out(format!("{name} buf"), buf)]);
        }
        // AGC clips some units of a weight-like tensor, per unit along axes 0 and 1 and per tensor.
        let w = backend::affine(&randn(dev, &[7, 5, 3, 3], 6), 0.05, 0.0).unwrap();
        for axis in [Some(0), Some(1), None] {
            let mut gc = g.clone();
            backend::agc(&w, &mut gc, axis, 0.1, 1e-3).unwrap();
            o.push(out(format!("agc {axis:?}"), gc));
        }
        let mut x = randn(dev, &[7, 5, 3, 3], 6);
        o.push(out("sumsq each", backend::reduce_each(Reduce::SumSq, &[&x, &g, &w]).unwrap()));
        backend::clamp(&mut x, 0.5).unwrap();
        o.push(out("clamp", x));
        o
    });
}

/// The config of the whole-step test: the tiny generator with LayerScale, LayerNorm, AGC-free
/// Adam, and the physics loss.
fn step_config() -> Config {
    let mut c = tiny(Path::new("unused"));
    c.model.depth = 3;
    c
}

/// One training step on `dev`: the loss and every parameter's gradient, and every parameter's
/// Adam update (after minus before).
fn one_step(cfg: &Config, dev: &Device) -> (Outputs, Outputs) {
    let n = cfg.data.n;
    let probe = loss::scaled_probe(&randn(dev, &[n, n, 2], 14), &LossConfig::default()).unwrap();
    step_with(cfg, dev, Grid::square(n), &mut |t, x, pred| {
        let (yi, yp) = (t.constant(randn(dev, &[2, 1, n, n], 12)), t.constant(randn(dev, &[2, 1, n, n], 13)));
        let targets = loss::Targets { diffraction: x, y_i: &yi, y_phi: &yp };
        loss::objective(t, &cfg.loss, pred, &targets, &probe).unwrap()
    })
}

/// [`one_step`] on H x W maps (16 x 24 -> 8 x 12 -> 4 x 6, widths 4 -> 8 -> 8) with a relative
/// L2 loss against a random target: the physics loss is for square patches, the rest of the step
/// is the same code. On square maps a kernel or a launcher that swaps H and W (or C_in and C_out)
/// still computes the right numbers; here it does not.
fn rectangular_step(cfg: &Config, dev: &Device) -> (Outputs, Outputs) {
    let grid = Grid { rows: 16, cols: 24 };
    step_with(cfg, dev, grid, &mut |t, _, pred| {
        let target = t.constant(randn(dev, &[2, 2, grid.rows, grid.cols], 15));
        fnokern::ops::mean_rel_l2(t, pred, &target).unwrap()
    })
}

/// The step of [`one_step`] with the loss `objective(tape, input, prediction)`.
fn step_with(cfg: &Config, dev: &Device, grid: Grid, objective: &mut dyn FnMut(&mut Tape, &fnokern::Var, &fnokern::Var) -> fnokern::Var) -> (Outputs, Outputs) {
    let mut g = Generator::new_grid(&cfg.model, grid, 1, dev, DType::F32).unwrap();
    let mut opt = Optimizer::new(&cfg.train, &g.params);
    let diffraction = backend::unary(Unary::Abs, &randn(dev, &[2, 1, grid.rows, grid.cols], 11)).unwrap();
    let mut t = Tape::with_params(&g.params);
    let x = t.constant(diffraction);
    let pred = g.forward(&mut t, &x).unwrap();
    let loss = objective(&mut t, &x, &pred);
    let mut o = vec![out("loss", loss.value().clone())];
    let grads = t.backward(&loss).unwrap().into_params();
    for ((_, name, _), grad) in g.params.iter().zip(&grads) {
        o.push(out(format!("d{name}"), grad.clone().expect("every parameter gets a gradient")));
    }
    let before = g.params.clone();
    opt.step(&mut g.params, &grads, cfg.train.lr).unwrap();
    let updates = g.params.iter().zip(before.values()).map(|((_, name, p), p0)| out(name.to_string(), backend::binary(Binary::Sub, p, p0).unwrap())).collect();
    (o, updates)
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn one_training_step_of_a_small_generator_matches_the_cpu() {
    // Forward, physics loss, backward and an Adam update through every op of the generator.
    step_matches_the_cpu("whole step", one_step);
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn a_training_step_on_rectangular_maps_matches_the_cpu() {
    step_matches_the_cpu("rectangular step", rectangular_step);
}

/// `step` on the CPU and the GPU: loss, gradients and Adam updates.
fn step_matches_the_cpu(test: &str, step: fn(&Config, &Device) -> (Outputs, Outputs)) {
    // Gradients pass through ~40 ops, so they get 1e-3 relative (plus 1e-5 absolute for those
    // near zero). Adam's first update is lr g / (|g| + eps), about lr sign(g): where a gradient is
    // within f32 noise of zero its sign, and so its update, may differ between devices, so the
    // updates are compared only where the CPU's gradient is clear of that noise.
    let cfg = step_config();
    let (want, want_up) = step(&cfg, &Device::cpu());
    let Some(gpu) = cuda(test) else { return };
    let (got, got_up) = step(&cfg, &gpu);
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        assert_eq!(g.device().kind(), DeviceKind::Cuda(0), "{name} was not computed on the GPU");
        close(&format!("{test}: {name}"), g, w, 1e-5, 1e-3);
    }
    let lr = cfg.train.lr;
    for (((name, w), (_, g)), (_, grad)) in want_up.iter().zip(&got_up).zip(&want[1..]) {
        let (w, g, grad) = (w.to_f64_vec().unwrap(), g.to_f64_vec().unwrap(), grad.to_f64_vec().unwrap());
        let scale = grad.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let bad: Vec<String> = (0..w.len())
            .filter(|&i| grad[i].abs() > 1e-4 * scale && (w[i] - g[i]).abs() > 1e-3 * lr)
            .take(5)
            .map(|i| format!("[{i}] got {} want {} (gradient {})", g[i], w[i], grad[i]))
            .collect();
        assert!(bad.is_empty(), "{test}: update of {name}: {}", bad.join(", "));
    }
    eprintln!("{test}: loss, {} gradients and their updates match", want.len() - 1);
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn no_two_blocks_of_a_launch_write_the_same_bytes() {
    // The stand-in runs a launch's blocks one after another, so two blocks that update one value
    // without an atomic still sum right there, while a GPU, running them at once, loses a write.
    // Its race check (this thread's launches) fails such a launch. No kernel uses atomics, so
    // every kernel of a training step, the multi-tensor Adam, clipping's reductions and the
    // FNO-2D's Darcy step must pass (and every op case of this file: `on_both` turns it on).
    let common::standin::Cuda::Standin(standin) = common::standin::cuda() else {
        eprintln!("race check: skipped: the check is the stand-in's");
        return;
    };
    let gpu = cuda("race check").expect("the stand-in opens");
    standin.racecheck(true);
    let (grads, _) = one_step(&step_config(), &gpu);
    let (rect, _) = rectangular_step(&step_config(), &gpu);
    assert!(rect[0].1.to_f64_vec().unwrap()[0].is_finite());
    let tensors: Vec<&Tensor> = grads.iter().map(|(_, t)| t).collect();
    let sums = backend::reduce_each(Reduce::SumSq, &tensors);
    let darcy = darcy_step(&gpu);
    standin.racecheck(false);
    assert!(darcy[0].1.to_f64_vec().unwrap()[0].is_finite());
    let sums = sums.expect("clipping's sums of squares run").to_f64_vec().unwrap();
    assert!(sums.iter().all(|s| s.is_finite()) && grads[0].1.to_f64_vec().unwrap()[0].is_finite());
    eprintln!("race check: a training step's {} gradients and their sums of squares, no byte written twice", grads.len() - 1);
}

fn run_opts(dir: &Path) -> RunOptions {
    RunOptions::new(dir.to_path_buf())
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn training_on_the_gpu_finishes_resumes_exactly_and_follows_the_cpu() {
    let Some(_gpu) = cuda("gpu training") else { return };
    let root = tempdir("cuda-train");
    let mut cfg = tiny(&root.join("cache"));
    let cpu = train::train(&cfg, &run_opts(&root.join("cpu")), &mut |_| {}).unwrap();
    cfg.train.device = "cuda".into();
    let straight = train::train(&cfg, &run_opts(&root.join("straight")), &mut |_| {}).unwrap();
    assert!(straight.finished && !straight.crashed, "{straight:?}");
    // Every GPU kernel is deterministic (fixed reduction orders, no atomics), so a resumed run
    // repeats the straight one bit for bit, as on the CPU.
    let split = root.join("split");
    train::train(&cfg, &RunOptions { stop_after_epochs: Some(2), ..run_opts(&split) }, &mut |_| {}).unwrap();
    let resumed = train::train(&cfg, &RunOptions { resume: true, ..run_opts(&split) }, &mut |_| {}).unwrap();
    assert_eq!(straight.final_val_loss.map(f64::to_bits), resumed.final_val_loss.map(f64::to_bits));
    assert_eq!(std::fs::read_to_string(root.join("straight/metrics.jsonl")).unwrap(), std::fs::read_to_string(split.join("metrics.jsonl")).unwrap());
    // 24 Adam steps let f32 rounding differences grow; the losses still agree to a few percent.
    let (c, g) = (cpu.final_val_loss.unwrap(), straight.final_val_loss.unwrap());
    assert!((c - g).abs() <= 0.05 * c, "final validation loss: cpu {c}, gpu {g}");
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn the_gpu_ledger_equals_the_meta_plan_and_the_pool_holds_at_least_that() {
    let Some(gpu) = cuda("gpu memory") else { return };
    let mut cfg = step_config();
    cfg.train.batch_size = 4;
    let meta = fnokern::plan::step_memory(&cfg, &Device::meta()).unwrap();
    let got = fnokern::plan::step_memory(&cfg, &gpu).unwrap();
    // The same ops allocate the same tensors: the ledgers agree to the byte.
    assert_eq!(got.peak, meta.peak);
    assert_eq!(got.resident, meta.resident);
    let pool = gpu.gpu_pool_peak().unwrap().expect("a GPU device has a pool");
    eprintln!("gpu memory: ledger peak {} B, pool peak {pool} B", got.peak);
    assert!(pool >= got.peak, "the pool ({pool} B) must hold at least the ledger's tensors ({} B)", got.peak);
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn gpu_tensors_copy_both_ways_and_refuse_host_slices() {
    let Some(gpu) = cuda("gpu tensors") else { return };
    let cpu = Device::cpu();
    let x = randn(&cpu, &[3, 4], 1);
    let g = x.to_device(&gpu).unwrap();
    assert_eq!(g.device().kind(), DeviceKind::Cuda(0));
    assert_eq!(g.to_f64_vec().unwrap(), x.to_f64_vec().unwrap());
    assert_eq!(g.to_device(&cpu).unwrap().to_f64_vec().unwrap(), x.to_f64_vec().unwrap());
    let err = g.as_slice::<f32>().unwrap_err().to_string();
    assert!(err.contains("cuda:0") && err.contains("to_device"), "{err}");
    let err = Tensor::zeros([2], DType::F64, &gpu).unwrap_err().to_string();
    assert!(err.contains("f32"), "{err}");
    // The ledger counts GPU tensors like CPU ones: g (12 floats) is alive.
    assert_eq!(gpu.memory().current, 48);
    let t = Tensor::zeros([1000], DType::F32, &gpu).unwrap();
    assert_eq!(gpu.memory().current, 4048);
    drop(t);
    drop(g);
    assert_eq!(gpu.memory().current, 0);
}

/// Work on a second stream (a prefetching loader's uploads, a communication stream) is ordered
/// with the compute stream only by an event. On the stand-in, work queued on a created stream
/// runs only when something waits for it, so a read without the event sees the buffer's fresh
/// NaN bytes, as a GPU may; with the event it sees the data. A library call on a created stream
/// is refused with a reason (the stand-in runs library calls when they are made).
#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn a_second_stream_is_ordered_only_by_events() {
    let Some(_dev) = cuda("second stream") else { return };
    let on_standin = matches!(common::standin::cuda(), common::standin::Cuda::Standin(_));
    let gpu = backend::gpu::Gpu::shared(0).unwrap();
    let side = gpu.ctx.new_stream().unwrap();
    let host: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let read = |slice: &cudarc::driver::CudaSlice<f32>| gpu.download(&gpu.stream.clone_dtod(slice).unwrap()).unwrap();

    // An upload on the side stream, read by the compute stream without an event.
    let up = side.clone_htod(&host).unwrap();
    if on_standin {
        assert!(read(&up).iter().all(|v| v.is_nan()), "the upload was seen before anything waited for it");
    }
    // With the event, the compute stream reads the data.
    gpu.stream.wait(&side.record_event(None).unwrap()).unwrap();
    assert_eq!(read(&up), host);

    // A kernel on the side stream (fill_scalar_f32: y = g[0] everywhere), then the same.
    let g = side.clone_htod(&[7.0f32]).unwrap();
    let mut y = side.clone_htod(&host).unwrap();
    let f = gpu.function("fill_scalar_f32").unwrap();
    let n = y.len() as i64;
    use cudarc::driver::PushKernelArg;
    let mut launch = side.launch_builder(&f);
    launch.arg(&g).arg(&mut y).arg(&n);
    // SAFETY: fill_scalar_f32(const float* g, float* y, int64_t n), y holds n floats.
    unsafe { launch.launch(cudarc::driver::LaunchConfig::for_num_elems(n as u32)) }.unwrap();
    if on_standin {
        assert!(read(&y).iter().all(|v| v.is_nan()), "the side stream's kernel ran before anything waited for it");
    }
    side.synchronize().unwrap();
    assert!(read(&y).iter().all(|&v| v == 7.0));
    drop((up, g, y));
    side.synchronize().unwrap();

    // The libraries run when called: the stand-in refuses them a created stream.
    if on_standin {
        let blas = cudarc::cublas::CudaBlas::new(side.clone()).map(|_| ()).unwrap_err();
        assert!(format!("{blas:?}").contains("CUBLAS_STATUS"), "{blas:?}");
    }
}

/// The Darcy workload's step on `dev`: the FNO-2D (with an output normaliser), the relative L2
/// and H1 losses, and every parameter's gradient of their sum.
fn darcy_step(dev: &Device) -> Outputs {
    let mut cfg = fnokern::config::presets::get("darcy").unwrap();
    cfg.darcy.resolution = 17;
    cfg.darcy.subsample = 1;
    cfg.model.width = 6;
    cfg.model.modes = 4;
    cfg.model.depth = 2;
    cfg.model.projection = 8;
    cfg.validate().unwrap();
    let s = cfg.input_size();
    let mut g = Generator::new(&cfg.model, s, 3, dev, DType::F32).unwrap();
    let mean: Vec<f32> = (0..s * s).map(|p| 0.01 * (p % 7) as f32).collect();
    g.set_output_normalizer(fnokern::data::darcy::Normalizer { mean, std: vec![0.5; s * s], eps: 1e-5 }).unwrap();
    let mut t = Tape::with_params(&g.params);
    let x = t.constant(randn(dev, &[3, 3, s, s], 21));
    let u = t.constant(randn(dev, &[3, 1, s, s], 22));
    let pred = g.forward(&mut t, &x).unwrap();
    let l2 = loss::field_objective(&mut t, fnokern::config::LossKind::RelL2, &pred, &u).unwrap();
    let h1 = loss::field_objective(&mut t, fnokern::config::LossKind::H1, &pred, &u).unwrap();
    let total = fnokern::ops::add(&mut t, &l2, &h1).unwrap();
    let mut o = vec![out("rel_l2", l2.value().clone()), out("h1", h1.value().clone()), out("prediction", pred.value().clone())];
    let grads = t.backward(&total).unwrap().into_params();
    for ((_, name, _), grad) in g.params.iter().zip(&grads) {
        o.push(out(format!("d{name}"), grad.clone().expect("every parameter gets a gradient")));
    }
    o
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn a_darcy_step_matches_the_cpu() {
    let want = darcy_step(&Device::cpu());
    let Some(gpu) = cuda("darcy step") else { return };
    for ((name, w), (_, g)) in want.iter().zip(&darcy_step(&gpu)) {
        assert_eq!(g.device().kind(), DeviceKind::Cuda(0), "{name} was not computed on the GPU");
        close(&format!("darcy step: {name}"), g, w, 1e-5, 1e-3);
    }
}
