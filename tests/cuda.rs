//! Every hand-written CUDA kernel, through its launcher, against the CPU backend (the
//! specification), forward and backward, on odd shapes: |got - ref| <= atol + rtol |ref|,
//! printing the first mismatches. On a GPU where the driver sees one, else on the driver stand-in
//! (tests/common/standin.rs: the same kernels on the host, behind the real launchers); only a build
//! without embedded kernels skips.
//!
//! Reductions run over groups wider than a warp (70 channels, planes of 300) so that every warp of
//! block_sum takes part. Tolerances: fp32 arithmetic against the CPU's f64 accumulation (1e-5
//! element-wise, 1e-4 for sums); outputs rounded to f16 or bf16 are within half a unit in the last
//! place of the CPU's unrounded value plus that fp32 noise, so they get one ulp relative.

use std::sync::OnceLock;

use fnokern::backend::cuda::spectral::SpectralDims;
use fnokern::backend::cuda::Gpu;
use fnokern::backend::{self, AdamStep, NormKind, Reduce, SgdStep, Unary};
use fnokern::{DType, Device, ModeConvention, SpectralModes, Tensor};

mod common;

fn gpu(test: &str) -> Option<Gpu> {
    common::standin::cuda_device(test)?;
    Some(Gpu::open(0).unwrap_or_else(|e| panic!("{test}: {e}")))
}

/// One CPU device for every reference tensor (operands of one op must share a device).
fn cpu() -> &'static Device {
    static CPU: OnceLock<Device> = OnceLock::new();
    CPU.get_or_init(Device::cpu)
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), 1.0, seed, DType::F32, cpu()).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_f64_vec().unwrap().into_iter().map(|v| v as f32).collect()
}

fn close(what: &str, got: &[f32], want: &Tensor, atol: f64, rtol: f64) {
    let want = want.to_f64_vec().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<String> = got
        .iter()
        .zip(&want)
        .enumerate()
        // A NaN on either side is a mismatch.
        .filter(|(_, (&g, &w))| {
            let err = (g as f64 - w).abs();
            err.is_nan() || err > atol + rtol * w.abs()
        })
        .take(5)
        .map(|(i, (g, w))| format!("[{i}] got {g} want {w}"))
        .collect();
    assert!(bad.is_empty(), "{what}: {} mismatches, first: {}", bad.len(), bad.join(", "));
}

#[test]
fn spectral_mix_forward_and_both_backward_products_match_the_cpu() {
    let Some(gpu) = gpu("spectral_mix") else { return };
    // Odd sizes: 3 samples, 5 -> 7 channels, a 9 x 10 map (half spectrum 6 columns), 4 modes.
    let (b, ci, co, h, w, m) = (3, 5, 7, 9, 10, 4);
    for conv in [ModeConvention::Corners, ModeConvention::Positive] {
        let modes = SpectralModes::new(m, conv);
        let rows = modes.kept_rows(h);
        let wh = w / 2 + 1;
        let my = modes.kept_cols(w);
        let xh = randn(&[b, ci, h, wh, 2], 1);
        let wt = randn(modes.weight_shape(ci, co, h, w).dims(), 2);
        let dyh = randn(&[b, co, h, wh, 2], 3);
        let d = SpectralDims { b, ci, co, h, wh, my };
        let (xd, wd, dyd) = (gpu.upload(&host(&xh)).unwrap(), gpu.upload(&host(&wt)).unwrap(), gpu.upload(&host(&dyh)).unwrap());

        let mut y = gpu.zeros::<f32>(b * co * h * wh * 2).unwrap();
        gpu.spectral_mix_fwd(&xd, &wd, &rows, &mut y, d).unwrap();
        close("spectral_mix_fwd", &gpu.download(&y).unwrap(), &backend::spectral_mix(&xh, &wt, modes).unwrap(), 1e-5, 1e-5);

        let mut dx = gpu.zeros::<f32>(b * ci * h * wh * 2).unwrap();
        gpu.spectral_mix_bwd_input(&dyd, &wd, &rows, &mut dx, d).unwrap();
        close("spectral_mix_bwd_input", &gpu.download(&dx).unwrap(), &backend::spectral_mix_bwd_input(&dyh, &wt, modes).unwrap(), 1e-5, 1e-5);

        let mut dw = gpu.zeros::<f32>(wt.numel()).unwrap();
        gpu.spectral_mix_bwd_weight(&xd, &dyd, &rows, &mut dw, d).unwrap();
        let want = backend::spectral_mix_bwd_weight(&xh, &dyh, wt.shape(), modes).unwrap();
        close("spectral_mix_bwd_weight", &gpu.download(&dw).unwrap(), &want, 1e-5, 1e-5);

        // A wrong length is a clear error, not a launch.
        let err = gpu.spectral_mix_fwd(&dyd, &wd, &rows, &mut y, d).unwrap_err().to_string();
        assert!(err.contains("spectral_mix_fwd_f32") && err.contains("x holds"), "{err}");
    }
}

#[test]
fn layerscale_forward_and_fused_backward_match_the_cpu() {
    let Some(gpu) = gpu("layerscale") else { return };
    // Planes of 300: more than a block, so every thread of every warp reduces.
    let (b, c, s) = (3, 5, 300);
    let (x, br, dy) = (randn(&[b, c, s], 4), randn(&[b, c, s], 5), randn(&[b, c, s], 6));
    let l = randn(&[c], 7);
    let (xd, brd, dyd, ld) = (gpu.upload(&host(&x)).unwrap(), gpu.upload(&host(&br)).unwrap(), gpu.upload(&host(&dy)).unwrap(), gpu.upload(&host(&l)).unwrap());
    let mut y = gpu.zeros::<f32>(b * c * s).unwrap();
    gpu.layerscale_fwd(&xd, &brd, &ld, &mut y, (b, c, s)).unwrap();
    close("layerscale_fwd", &gpu.download(&y).unwrap(), &backend::layerscale(&x, &br, &l).unwrap(), 1e-6, 1e-6);
    let mut dbr = gpu.zeros::<f32>(b * c * s).unwrap();
    let mut dl = gpu.zeros::<f32>(c).unwrap();
    gpu.layerscale_bwd(&dyd, &brd, &ld, &mut dbr, &mut dl, (b, c, s)).unwrap();
    let (want_dbr, want_dl) = backend::layerscale_bwd(&dy, &br, &l).unwrap();
    close("layerscale_bwd dbr", &gpu.download(&dbr).unwrap(), &want_dbr, 1e-6, 1e-6);
    close("layerscale_bwd dl", &gpu.download(&dl).unwrap(), &want_dl, 1e-4, 1e-5);
}

/// The element type of a norm test: its name, its rounding of f32, and one ulp relative.
trait Elem: fnokern::backend::cuda::norm::NormElem + cudarc::driver::ValidAsZeroBits + Copy + Default + Clone {
    const RTOL: f64;
    fn enc(v: f32) -> Self;
    fn dec(self) -> f32;
}
impl Elem for f32 {
    const RTOL: f64 = 1e-5;
    fn enc(v: f32) -> Self {
        v
    }
    fn dec(self) -> f32 {
        self
    }
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

/// One norm kind in one element type against the CPU's norm of the same rounded inputs: y and dx
/// in T, the statistics and the affine gradients in f32.
fn check_norm<T: Elem>(gpu: &Gpu, kind: NormKind, (b, c, s): (usize, usize, usize)) {
    let what = format!("{kind:?} {} over [{b}, {c}, {s}]", std::any::type_name::<T>());
    let rounded = |t: Tensor| -> (Vec<T>, Tensor) {
        let e: Vec<T> = host(&t).into_iter().map(T::enc).collect();
        let back = Tensor::from_vec(e.iter().map(|&a| a.dec()).collect(), t.dims().to_vec(), cpu()).unwrap();
        (e, back)
    };
    // A non-zero mean and a spread, so centring matters.
    let ((xe, x), (dye, dy)) = (rounded(backend::affine(&randn(&[b, c, s], 8), 2.0, 0.5).unwrap()), rounded(randn(&[b, c, s], 9)));
    let (gamma, beta) = (randn(&[c], 10), randn(&[c], 11));
    let groups = fnokern::backend::cuda::norm::groups(kind, (b, c, s));
    let want = backend::norm(kind, &x, Some(&gamma), Some(&beta), 1e-5).unwrap();
    let (gd, bd) = (gpu.upload(&host(&gamma)).unwrap(), gpu.upload(&host(&beta)).unwrap());
    let (xd, dyd) = (gpu.upload(&xe).unwrap(), gpu.upload(&dye).unwrap());
    let (mut y, mut mean, mut rstd) = (gpu.zeros::<T>(b * c * s).unwrap(), gpu.zeros::<f32>(groups).unwrap(), gpu.zeros::<f32>(groups).unwrap());
    gpu.norm_fwd(kind, &xd, Some(&gd), Some(&bd), 1e-5, &mut y, &mut mean, &mut rstd, (b, c, s)).unwrap();
    let dec = |v: Vec<T>| v.into_iter().map(T::dec).collect::<Vec<f32>>();
    close(&format!("{what}: y"), &dec(gpu.download(&y).unwrap()), &want.y, 1e-5, T::RTOL);
    close(&format!("{what}: mean"), &gpu.download(&mean).unwrap(), &want.mean, 1e-5, 1e-5);
    close(&format!("{what}: rstd"), &gpu.download(&rstd).unwrap(), &want.rstd, 1e-5, 1e-5);
    let (dx_c, dg_c, db_c) = backend::norm_bwd(kind, &x, &dy, Some(&gamma), &want.mean, &want.rstd, true, true).unwrap();
    let (mut dx, mut dg, mut db) = (gpu.zeros::<T>(b * c * s).unwrap(), gpu.zeros::<f32>(c).unwrap(), gpu.zeros::<f32>(c).unwrap());
    gpu.norm_bwd(kind, &xd, &dyd, Some(&gd), &mean, &rstd, &mut dx, Some(&mut dg), Some(&mut db), (b, c, s)).unwrap();
    // dx's reference uses the CPU's statistics, which differ from the kernel's in the last bits.
    close(&format!("{what}: dx"), &dec(gpu.download(&dx).unwrap()), &dx_c, 1e-4, T::RTOL.max(1e-4));
    close(&format!("{what}: dgamma"), &gpu.download(&dg).unwrap(), &dg_c.unwrap(), 1e-4, 1e-4);
    close(&format!("{what}: dbeta"), &gpu.download(&db).unwrap(), &db_c.unwrap(), 1e-4, 1e-4);
}

#[test]
fn norms_match_the_cpu_for_f32_f16_and_bf16_inputs() {
    let Some(gpu) = gpu("norm") else { return };
    // Groups of 70 channels (three warps, one partly filled) and of 300 positions (more than a
    // block, so threads loop).
    for (kind, shape) in [(NormKind::LayerNorm, (2, 70, 3)), (NormKind::RmsNorm, (2, 70, 3)), (NormKind::InstanceNorm, (2, 3, 300))] {
        check_norm::<f32>(&gpu, kind, shape);
        check_norm::<half::f16>(&gpu, kind, shape);
        check_norm::<half::bf16>(&gpu, kind, shape);
    }
}

#[test]
fn agc_per_unit_and_per_tensor_matches_the_cpu_in_one_launch() {
    let Some(gpu) = gpu("agc") else { return };
    // A conv-transpose-like weight [C_in 3, C_out 5, 300]: units along axis 1, 900 elements each.
    let shape = [3usize, 5, 300];
    let w = randn(&shape, 12);
    // Unit 1's gradient is zero: it must stay zero, with factor 1.
    let mut gv = host(&backend::affine(&randn(&shape, 13), 3.0, 0.0).unwrap());
    for a in 0..3 {
        gv[(a * 5 + 1) * 300..(a * 5 + 2) * 300].fill(0.0);
    }
    let g = Tensor::from_vec(gv.clone(), shape.to_vec(), cpu()).unwrap();
    let (lambda, eps) = (0.1f64, 1e-3f64);
    let wd = gpu.upload(&host(&w)).unwrap();
    for (axis, units) in [(Some(1), (3, 5, 300)), (None, (1, 1, 4500))] {
        let mut want = g.clone();
        backend::agc(&w, &mut want, axis, lambda, eps).unwrap();
        let mut gd = gpu.upload(&gv).unwrap();
        let mut factors = gpu.zeros::<f32>(units.1).unwrap();
        gpu.agc_unit(&wd, &mut gd, Some(&mut factors), units, lambda as f32, eps as f32).unwrap();
        let got = gpu.download(&gd).unwrap();
        close(&format!("agc {axis:?}"), &got, &want, 1e-5, 1e-5);
        let f = gpu.download(&factors).unwrap();
        assert!(f.iter().any(|&f| f < 1.0), "the test must clip: factors {f:?}");
        if axis.is_some() {
            assert_eq!(f[1], 1.0, "a zero gradient keeps factor 1");
            assert!(got[300..600].iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn optimisers_match_the_cpu_at_the_first_and_a_later_step() {
    let Some(gpu) = gpu("optimisers") else { return };
    let n = 1000 + 37;
    let (p, g) = (randn(&[n], 14), randn(&[n], 15));
    for (decoupled, step) in [(false, 1u64), (true, 1), (false, 7), (true, 7)] {
        let (m, v) = (backend::affine(&randn(&[n], 16), 0.1, 0.0).unwrap(), backend::unary(Unary::Square, &randn(&[n], 17)).unwrap());
        let h = AdamStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled, step, grad_scale: 0.5 };
        let (mut pd, gd, mut md, mut vd) =
            (gpu.upload(&host(&p)).unwrap(), gpu.upload(&host(&g)).unwrap(), gpu.upload(&host(&m)).unwrap(), gpu.upload(&host(&v)).unwrap());
        gpu.adam_step(&mut pd, &gd, &mut md, &mut vd, &h).unwrap();
        let (mut pc, mut mc, mut vc) = (p.clone(), m.clone(), v.clone());
        backend::adam_step(&mut pc, &g, &mut mc, &mut vc, &h).unwrap();
        let what = format!("adam (decoupled {decoupled}, step {step})");
        close(&format!("{what} p"), &gpu.download(&pd).unwrap(), &pc, 1e-6, 1e-5);
        close(&format!("{what} m"), &gpu.download(&md).unwrap(), &mc, 1e-6, 1e-5);
        close(&format!("{what} v"), &gpu.download(&vd).unwrap(), &vc, 1e-6, 1e-5);
    }
    for (momentum, nesterov, first) in [(0.0, false, false), (0.9, false, true), (0.9, true, false)] {
        let h = SgdStep { lr: 1e-2, momentum, nesterov, weight_decay: 0.01, first, grad_scale: 2.0 };
        let buf0 = randn(&[n], 18);
        let (mut pc, mut bc) = (p.clone(), buf0.clone());
        backend::sgd_step(&mut pc, &g, (momentum > 0.0).then_some(&mut bc), &h).unwrap();
        let (mut pd, gd, mut bd) = (gpu.upload(&host(&p)).unwrap(), gpu.upload(&host(&g)).unwrap(), gpu.upload(&host(&buf0)).unwrap());
        gpu.sgd_step(&mut pd, &gd, (momentum > 0.0).then_some(&mut bd), &h).unwrap();
        close(&format!("sgd p (momentum {momentum}, nesterov {nesterov})"), &gpu.download(&pd).unwrap(), &pc, 1e-6, 1e-5);
        if momentum > 0.0 {
            close("sgd buf", &gpu.download(&bd).unwrap(), &bc, 1e-6, 1e-5);
        }
    }
}

#[test]
fn unary_ops_rounding_and_reductions_match_the_cpu() {
    let Some(gpu) = gpu("elementwise") else { return };
    let n = 4099;
    let (x, dy) = (backend::affine(&randn(&[n], 18), 3.0, 0.0).unwrap(), randn(&[n], 19));
    let (xd, dyd) = (gpu.upload(&host(&x)).unwrap(), gpu.upload(&host(&dy)).unwrap());
    let mut y = gpu.zeros::<f32>(n).unwrap();
    gpu.unary(Unary::Gelu, &xd, &mut y).unwrap();
    close("gelu", &gpu.download(&y).unwrap(), &backend::unary(Unary::Gelu, &x).unwrap(), 1e-6, 1e-5);
    gpu.unary_bwd(Unary::Gelu, &xd, &dyd, &mut y).unwrap();
    close("gelu'", &gpu.download(&y).unwrap(), &backend::unary_bwd(Unary::Gelu, &x, &dy).unwrap(), 1e-6, 1e-5);
    // Rounding is exact on both sides (f32 to the nearest f16 / bf16, ties to even): normal
    // numbers, f16 subnormals and overflow, ties, infinities and NaN.
    let mut xs = host(&x).into_iter().map(|a| a * 3e4).collect::<Vec<f32>>();
    xs.extend([0.0, -0.0, 1e-6, -3e-8, 65504.0, 65520.0, 1e6, f32::INFINITY, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0, f32::NAN]);
    let big = Tensor::from_vec(xs.clone(), [xs.len()], cpu()).unwrap();
    let bigd = gpu.upload(&xs).unwrap();
    let mut r = gpu.zeros::<f32>(xs.len()).unwrap();
    for u in [Unary::RoundF16, Unary::RoundBf16] {
        gpu.unary(u, &bigd, &mut r).unwrap();
        let (got, want) = (gpu.download(&r).unwrap(), host(&backend::unary(u, &big).unwrap()));
        let differ = got.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan())).count();
        assert_eq!(differ, 0, "{u:?}: {differ} of {} differ", got.len());
    }
    assert!(xs.iter().any(|v| v.abs() > 65520.0 && v.is_finite()), "the test must reach f16's overflow");
    for op in [Reduce::Sum, Reduce::SumSq] {
        let got = gpu.reduce(op, &xd).unwrap();
        let want = backend::reduce(op, &x).unwrap().scalar_value().unwrap();
        assert!((got as f64 - want).abs() <= 1e-3 + 1e-5 * want.abs(), "{op:?}: got {got} want {want}");
        // Bitwise repeatable.
        assert_eq!(got.to_bits(), gpu.reduce(op, &xd).unwrap().to_bits());
    }
}

#[test]
fn reduce_each_gives_each_tensors_reduction_bit_for_bit() {
    let Some(gpu) = gpu("reduce_each") else { return };
    // Sizes that use 1, 2, 17 and all 256 first-pass blocks.
    let xs: Vec<Tensor> = [7usize, 300, 4099, 70_001].iter().enumerate().map(|(i, &n)| randn(&[n], 20 + i as u64)).collect();
    let bufs: Vec<_> = xs.iter().map(|x| gpu.upload(&host(x)).unwrap()).collect();
    let refs: Vec<_> = bufs.iter().collect();
    for op in [Reduce::Sum, Reduce::SumSq] {
        let mut out = gpu.zeros::<f32>(xs.len()).unwrap();
        gpu.reduce_each(op, &refs, &mut out).unwrap();
        let each = gpu.download(&out).unwrap();
        for (t, buf) in bufs.iter().enumerate() {
            assert_eq!(each[t].to_bits(), gpu.reduce(op, buf).unwrap().to_bits(), "{op:?}: tensor {t}");
        }
        let want = backend::reduce_each(op, &xs.iter().collect::<Vec<_>>()).unwrap();
        close(&format!("reduce_each {op:?}"), &each, &want, 1e-3, 1e-5);
    }
}

#[test]
fn a_missing_gpu_is_a_clear_error() {
    let Some(_gpu) = gpu("missing gpu") else { return };
    let err = Gpu::open(usize::MAX).err().expect("no such GPU").to_string();
    assert!(err.contains("driver sees"), "{err}");
}
