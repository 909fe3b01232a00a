//! The hand-written CUDA kernels on the cases that stress them, through the same dispatch the
//! trainer uses, against the CPU backend (the specification): |got - ref| <= atol + rtol |ref|,
//! printing the first mismatches. On a GPU where the driver sees one, else on the driver stand-in
//! (tests/common/standin.rs: the same kernels on the host, behind the real launchers); only a
//! build without embedded kernels skips. The f16/bf16 norms of kernels/dev/ have no tensor path
//! yet and run through their own entry (`backend::norm::cuda::dev`).
//!
//! Reductions run over groups wider than a warp (70 channels, planes of 300) so that every warp of
//! block_sum takes part. Tolerances: fp32 arithmetic against the CPU's f64 accumulation (1e-5
//! element-wise, 1e-4 for sums); outputs rounded to f16 or bf16 are within half a unit in the last
//! place of the CPU's unrounded value plus that fp32 noise, so they get one ulp relative.

use std::sync::OnceLock;

use fnokern::backend::gpu::Gpu;
use fnokern::backend::norm::cuda::dev::{self, LowElem};
use fnokern::backend::norm::NormGeom;
use fnokern::backend::{self, AdamStep, NormKind, Reduce, SgdStep, Unary};
use fnokern::{Device, ModeConvention, SpectralModes, Tensor};

mod common;
use common::{assert_close, randn};

/// One CPU device for every reference tensor (operands of one op must share a device).
fn cpu() -> &'static Device {
    static CPU: OnceLock<Device> = OnceLock::new();
    CPU.get_or_init(Device::cpu)
}

fn rn(shape: &[usize], seed: u64) -> Tensor {
    randn(cpu(), shape, seed)
}

/// The GPU and a function that copies CPU tensors onto it.
fn gpu(test: &str) -> Option<Device> {
    common::standin::cuda_device(test)
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_f64_vec().unwrap().into_iter().map(|v| v as f32).collect()
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn spectral_mix_forward_and_both_backward_products_match_the_cpu() {
    let Some(g) = gpu("spectral_mix") else { return };
    // Odd sizes: 17 samples (the forward and dX sum 16 samples a thread: a full group and a
    // group of one), 5 -> 7 channels, a 9 x 10 map (half spectrum 6 columns), 4 modes.
    let (b, ci, co, h, w, m) = (17, 5, 7, 9, 10, 4);
    for conv in [ModeConvention::Corners, ModeConvention::Positive] {
        let modes = SpectralModes::new(m, conv);
        let wh = w / 2 + 1;
        let xh = rn(&[b, ci, h, wh, 2], 1);
        let wt = rn(modes.weight_shape(ci, co, h, w).dims(), 2);
        let dyh = rn(&[b, co, h, wh, 2], 3);
        let (xd, wd, dyd) = (xh.to_device(&g).unwrap(), wt.to_device(&g).unwrap(), dyh.to_device(&g).unwrap());
        assert_close("spectral_mix", &backend::spectral_mix(&xd, &wd, modes).unwrap(), &backend::spectral_mix(&xh, &wt, modes).unwrap(), 1e-5, 1e-5);
        assert_close(
            "spectral_mix_bwd_input",
            &backend::spectral_mix_bwd_input(&dyd, &wd, modes).unwrap(),
            &backend::spectral_mix_bwd_input(&dyh, &wt, modes).unwrap(),
            1e-5,
            1e-5,
        );
        assert_close(
            "spectral_mix_bwd_weight",
            &backend::spectral_mix_bwd_weight(&xd, &dyd, wt.shape(), modes).unwrap(),
            &backend::spectral_mix_bwd_weight(&xh, &dyh, wt.shape(), modes).unwrap(),
            1e-5,
            1e-5,
        );
        // A wrong shape is a clear error, not a launch.
        let err = backend::spectral_mix(&dyd, &wd, modes).unwrap_err().to_string();
        assert!(err.contains("spectral_mix") && err.contains("kept rows"), "{err}");
    }
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn layerscale_forward_and_fused_backward_match_the_cpu() {
    let Some(g) = gpu("layerscale") else { return };
    // Planes of 300: more than a block, so every thread of every warp reduces.
    let (b, c, s) = (3, 5, 300);
    let (x, br, dy, l) = (rn(&[b, c, s], 4), rn(&[b, c, s], 5), rn(&[b, c, s], 6), rn(&[c], 7));
    let [xd, brd, dyd, ld] = [&x, &br, &dy, &l].map(|t| t.to_device(&g).unwrap());
    assert_close("layerscale", &backend::layerscale(&xd, &brd, &ld).unwrap(), &backend::layerscale(&x, &br, &l).unwrap(), 1e-6, 1e-6);
    let (got_dbr, got_dl) = backend::layerscale_bwd(&dyd, &brd, &ld).unwrap();
    let (want_dbr, want_dl) = backend::layerscale_bwd(&dy, &br, &l).unwrap();
    assert_close("layerscale_bwd dbr", &got_dbr, &want_dbr, 1e-6, 1e-6);
    assert_close("layerscale_bwd dl", &got_dl, &want_dl, 1e-4, 1e-5);
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn norms_match_the_cpu_over_groups_wider_than_a_warp() {
    let Some(g) = gpu("norm") else { return };
    // Groups of 70 channels (three warps, one partly filled) and of 300 positions (more than a
    // block, so threads loop).
    for (kind, shape) in [(NormKind::LayerNorm, [2, 70, 3]), (NormKind::RmsNorm, [2, 70, 3]), (NormKind::InstanceNorm, [2, 3, 300])] {
        let c = shape[1];
        // A non-zero mean and a spread, so centring matters.
        let x = backend::affine(&rn(&shape, 8), 2.0, 0.5).unwrap();
        let (dy, gamma, beta) = (rn(&shape, 9), rn(&[c], 10), rn(&[c], 11));
        let [xd, dyd, gd, bd] = [&x, &dy, &gamma, &beta].map(|t| t.to_device(&g).unwrap());
        let (want, got) = (backend::norm(kind, &x, Some(&gamma), Some(&beta), 1e-5).unwrap(), backend::norm(kind, &xd, Some(&gd), Some(&bd), 1e-5).unwrap());
        assert_close(&format!("{kind:?} y"), &got.y, &want.y, 1e-5, 1e-5);
        assert_close(&format!("{kind:?} mean"), &got.mean, &want.mean, 1e-5, 1e-5);
        assert_close(&format!("{kind:?} rstd"), &got.rstd, &want.rstd, 1e-5, 1e-5);
        let w = backend::norm_bwd(kind, &x, &dy, Some(&gamma), &want.mean, &want.rstd, true, true).unwrap();
        let o = backend::norm_bwd(kind, &xd, &dyd, Some(&gd), &got.mean, &got.rstd, true, true).unwrap();
        assert_close(&format!("{kind:?} dx"), &o.0, &w.0, 1e-4, 1e-4);
        assert_close(&format!("{kind:?} dgamma"), o.1.as_ref().unwrap(), w.1.as_ref().unwrap(), 1e-4, 1e-4);
        assert_close(&format!("{kind:?} dbeta"), o.2.as_ref().unwrap(), w.2.as_ref().unwrap(), 1e-4, 1e-4);
    }
}

/// A 2-byte element type of the dev norms: its rounding of f32, and one ulp relative.
trait Elem: LowElem + Default {
    const RTOL: f64;
    fn enc(v: f32) -> Self;
    fn dec(self) -> f32;
}
impl Elem for half::f16 {
    const RTOL: f64 = 1.0 / 1024.0;
    fn enc(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn dec(self) -> f32 {
        self.to_f32()
    }
}
impl Elem for half::bf16 {
    const RTOL: f64 = 1.0 / 128.0;
    fn enc(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn dec(self) -> f32 {
        self.to_f32()
    }
}

/// One norm kind in one 2-byte type against the CPU's norm of the same rounded inputs.
fn check_lowp<T: Elem>(gpu: &Gpu, kind: NormKind, (b, c, s): (usize, usize, usize)) {
    let what = format!("{kind:?} {} over [{b}, {c}, {s}]", std::any::type_name::<T>());
    let rounded = |t: Tensor| -> (Vec<T>, Tensor) {
        let e: Vec<T> = host(&t).into_iter().map(T::enc).collect();
        let back = Tensor::from_vec(e.iter().map(|&a| a.dec()).collect(), t.dims().to_vec(), cpu()).unwrap();
        (e, back)
    };
    let ((xe, x), (dye, dy)) = (rounded(backend::affine(&rn(&[b, c, s], 8), 2.0, 0.5).unwrap()), rounded(rn(&[b, c, s], 9)));
    let (gamma, beta) = (rn(&[c], 10), rn(&[c], 11));
    let g = NormGeom::new("norm (dev)", kind, (b, c, s), 1e-5).unwrap();
    let want = backend::norm(kind, &x, Some(&gamma), Some(&beta), 1e-5).unwrap();
    let (gd, bd) = (gpu.upload(&host(&gamma)).unwrap(), gpu.upload(&host(&beta)).unwrap());
    let (xd, dyd) = (gpu.upload(&xe).unwrap(), gpu.upload(&dye).unwrap());
    let (mut y, mut mean, mut rstd) = (gpu.zeros::<T>(b * c * s).unwrap(), gpu.zeros::<f32>(g.groups()).unwrap(), gpu.zeros::<f32>(g.groups()).unwrap());
    dev::norm_fwd(gpu, g, &xd, Some(&gd), Some(&bd), &mut y, &mut mean, &mut rstd).unwrap();
    let as_tensor = |v: Vec<f32>, dims: &[usize]| Tensor::from_vec(v, dims.to_vec(), cpu()).unwrap();
    let dec = |v: Vec<T>| v.into_iter().map(T::dec).collect::<Vec<f32>>();
    assert_close(&format!("{what}: y"), &as_tensor(dec(gpu.download(&y).unwrap()), x.dims()), &want.y, 1e-5, T::RTOL);
    assert_close(&format!("{what}: rstd"), &as_tensor(gpu.download(&rstd).unwrap(), want.rstd.dims()), &want.rstd, 1e-5, 1e-5);
    let (dx_c, dg_c, db_c) = backend::norm_bwd(kind, &x, &dy, Some(&gamma), &want.mean, &want.rstd, true, true).unwrap();
    let (mut dx, mut dg, mut db) = (gpu.zeros::<T>(b * c * s).unwrap(), gpu.zeros::<f32>(c).unwrap(), gpu.zeros::<f32>(c).unwrap());
    dev::norm_bwd(gpu, g, &xd, &dyd, Some(&gd), &mean, &rstd, &mut dx, &mut dg, &mut db).unwrap();
    // dx's reference uses the CPU's statistics, which differ from the kernel's in the last bits.
    assert_close(&format!("{what}: dx"), &as_tensor(dec(gpu.download(&dx).unwrap()), x.dims()), &dx_c, 1e-4, T::RTOL.max(1e-4));
    assert_close(&format!("{what}: dgamma"), &as_tensor(gpu.download(&dg).unwrap(), &[c]), &dg_c.unwrap(), 1e-4, 1e-4);
    assert_close(&format!("{what}: dbeta"), &as_tensor(gpu.download(&db).unwrap(), &[c]), &db_c.unwrap(), 1e-4, 1e-4);
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn the_dev_f16_and_bf16_norms_match_the_cpu() {
    let Some(_) = gpu("norm (dev)") else { return };
    let g = Gpu::shared(0).unwrap();
    for (kind, shape) in [(NormKind::LayerNorm, (2, 70, 3)), (NormKind::RmsNorm, (2, 70, 3)), (NormKind::InstanceNorm, (2, 3, 300))] {
        check_lowp::<half::f16>(&g, kind, shape);
        check_lowp::<half::bf16>(&g, kind, shape);
    }
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn agc_per_unit_and_per_tensor_matches_the_cpu_in_one_launch() {
    let Some(g) = gpu("agc") else { return };
    // A conv-transpose-like weight [C_in 3, C_out 5, 300]: units along axis 1, 900 elements each.
    let shape = [3usize, 5, 300];
    let w = rn(&shape, 12);
    // Unit 1's gradient is zero: it must stay zero.
    let mut gv = host(&backend::affine(&rn(&shape, 13), 3.0, 0.0).unwrap());
    for a in 0..3 {
        gv[(a * 5 + 1) * 300..(a * 5 + 2) * 300].fill(0.0);
    }
    let gr = Tensor::from_vec(gv.clone(), shape.to_vec(), cpu()).unwrap();
    let wd = w.to_device(&g).unwrap();
    for axis in [Some(1), None] {
        let (mut want, mut got) = (gr.clone(), gr.to_device(&g).unwrap());
        backend::agc(&w, &mut want, axis, 0.1, 1e-3).unwrap();
        backend::agc(&wd, &mut got, axis, 0.1, 1e-3).unwrap();
        assert_close(&format!("agc {axis:?}"), &got, &want, 1e-5, 1e-5);
        assert_ne!(host(&want), gv, "the test must clip");
        let gh = host(&got);
        assert!(gh[300..600].iter().all(|&v| v == 0.0), "a zero gradient stays zero");
    }
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn optimisers_match_the_cpu_at_the_first_and_a_later_step() {
    let Some(g) = gpu("optimisers") else { return };
    let n = 1000 + 37;
    let (p, gr) = (rn(&[n], 14), rn(&[n], 15));
    let on = |t: &Tensor| t.to_device(&g).unwrap();
    // Adam updates several tensors in one launch: sizes below, at and above a block, one element.
    let shapes: [&[usize]; 4] = [&[n], &[5, 7], &[256], &[1]];
    for (decoupled, step) in [(false, 1u64), (true, 1), (false, 7), (true, 7)] {
        let h = AdamStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled, step, grad_scale: 0.5 };
        let mut cpu_t: Vec<[Tensor; 4]> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let k = 20 * i as u64;
                [rn(s, 14 + k), rn(s, 15 + k), backend::affine(&rn(s, 16 + k), 0.1, 0.0).unwrap(), backend::unary(Unary::Square, &rn(s, 17 + k)).unwrap()]
            })
            .collect();
        let mut gpu_t: Vec<[Tensor; 4]> = cpu_t.iter().map(|ts| ts.clone().map(|t| on(&t))).collect();
        for ts in [&mut cpu_t, &mut gpu_t] {
            let mut items: Vec<backend::AdamTensors> = ts.iter_mut().map(|[p, g, m, v]| backend::AdamTensors { p, g: &*g, m, v }).collect();
            backend::adam_step(&mut items, &h).unwrap();
        }
        for (i, (c, d)) in cpu_t.iter().zip(&gpu_t).enumerate() {
            let what = format!("adam (decoupled {decoupled}, step {step}), tensor {i}");
            assert_close(&format!("{what} p"), &d[0], &c[0], 1e-6, 1e-5);
            assert_close(&format!("{what} m"), &d[2], &c[2], 1e-6, 1e-5);
            assert_close(&format!("{what} v"), &d[3], &c[3], 1e-6, 1e-5);
        }
    }
    for (momentum, nesterov, first) in [(0.0, false, false), (0.9, false, true), (0.9, true, false)] {
        let h = SgdStep { lr: 1e-2, momentum, nesterov, weight_decay: 0.01, first, grad_scale: 2.0 };
        let buf0 = rn(&[n], 18);
        let (mut pc, mut bc) = (p.clone(), buf0.clone());
        backend::sgd_step(&mut pc, &gr, (momentum > 0.0).then_some(&mut bc), &h).unwrap();
        let (mut pd, mut bd) = (on(&p), on(&buf0));
        backend::sgd_step(&mut pd, &on(&gr), (momentum > 0.0).then_some(&mut bd), &h).unwrap();
        assert_close(&format!("sgd p (momentum {momentum}, nesterov {nesterov})"), &pd, &pc, 1e-6, 1e-5);
        assert_close("sgd buf", &bd, &bc, 1e-6, 1e-5);
    }
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn rounding_is_exact_and_reductions_repeat_bit_for_bit() {
    let Some(g) = gpu("elementwise") else { return };
    // Rounding is exact on both sides (f32 to the nearest f16 / bf16, ties to even): normal
    // numbers, f16 subnormals and overflow, ties, infinities and NaN.
    let mut xs = host(&rn(&[4099], 18)).into_iter().map(|a| a * 9e4).collect::<Vec<f32>>();
    xs.extend([0.0, -0.0, 1e-6, -3e-8, 65504.0, 65520.0, 1e6, f32::INFINITY, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0, f32::NAN]);
    assert!(xs.iter().any(|v| v.abs() > 65520.0 && v.is_finite()), "the test must reach f16's overflow");
    let big = Tensor::from_vec(xs.clone(), [xs.len()], cpu()).unwrap();
    let bigd = big.to_device(&g).unwrap();
    for u in [Unary::RoundF16, Unary::RoundBf16] {
        let (got, want) = (host(&backend::unary(u, &bigd).unwrap()), host(&backend::unary(u, &big).unwrap()));
        let differ = got.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan())).count();
        assert_eq!(differ, 0, "{u:?}: {differ} of {} differ", got.len());
    }
    // Sizes that use 1, 2, 17 and all 256 first-pass blocks; reduce_each gives each tensor's
    // reduction bit for bit, and repeats.
    let ts: Vec<Tensor> = [7usize, 300, 4099, 70_001].iter().enumerate().map(|(i, &n)| rn(&[n], 20 + i as u64)).collect();
    let td: Vec<Tensor> = ts.iter().map(|t| t.to_device(&g).unwrap()).collect();
    for op in [Reduce::Sum, Reduce::SumSq] {
        let each = host(&backend::reduce_each(op, &td.iter().collect::<Vec<_>>()).unwrap());
        for (t, x) in td.iter().enumerate() {
            let one = backend::reduce(op, x).unwrap().scalar_value().unwrap() as f32;
            assert_eq!(each[t].to_bits(), one.to_bits(), "{op:?}: tensor {t}");
            assert_eq!(one.to_bits(), (backend::reduce(op, x).unwrap().scalar_value().unwrap() as f32).to_bits(), "{op:?} repeats");
        }
        let want = backend::reduce_each(op, &ts.iter().collect::<Vec<_>>()).unwrap();
        assert_close(&format!("reduce_each {op:?}"), &Tensor::from_vec(each, [ts.len()], cpu()).unwrap(), &want, 1e-3, 1e-5);
    }
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn a_missing_gpu_is_a_clear_error() {
    let Some(_) = gpu("missing gpu") else { return };
    let err = Device::cuda(usize::MAX).expect_err("no such GPU").to_string();
    assert!(err.contains("driver sees"), "{err}");
}
