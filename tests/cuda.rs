//! Every hand-written CUDA kernel against the CPU backend (the specification), forward and
//! backward, on odd shapes: |got - ref| <= atol + rtol |ref|, printing the first mismatches.
//! Without a GPU, a driver or embedded kernels each test prints that it skipped and passes.
//! The tolerances are for fp32 arithmetic against the CPU's f64 accumulation.

use fnokern::backend::cuda::spectral::SpectralDims;
use fnokern::backend::cuda::Gpu;
use fnokern::backend::{self, AdamStep, NormKind, Reduce, Unary};
use fnokern::config::Precision;
use fnokern::{DType, Device, ModeConvention, SpectralModes, Tensor};

fn gpu(test: &str) -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("{test}: skipped: {e}");
            None
        }
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), 1.0, seed, DType::F32, &Device::cpu()).unwrap()
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
fn layerscale_forward_and_backward_match_the_cpu() {
    let Some(gpu) = gpu("layerscale") else { return };
    let (b, c, s) = (3, 5, 7 * 9);
    let (x, br, dy) = (randn(&[b, c, 7, 9], 4), randn(&[b, c, 7, 9], 5), randn(&[b, c, 7, 9], 6));
    let l = randn(&[c], 7);
    let (xd, brd, dyd, ld) = (gpu.upload(&host(&x)).unwrap(), gpu.upload(&host(&br)).unwrap(), gpu.upload(&host(&dy)).unwrap(), gpu.upload(&host(&l)).unwrap());
    let mut y = gpu.zeros::<f32>(b * c * s).unwrap();
    gpu.layerscale_fwd(&xd, &brd, &ld, &mut y, (b, c, s)).unwrap();
    close("layerscale_fwd", &gpu.download(&y).unwrap(), &backend::layerscale(&x, &br, &l).unwrap(), 1e-6, 1e-6);
    let mut dbr = gpu.zeros::<f32>(b * c * s).unwrap();
    let mut dl = gpu.zeros::<f32>(c).unwrap();
    gpu.layerscale_bwd(&dyd, &brd, &ld, &mut dbr, &mut dl, (b, c, s)).unwrap();
    close("layerscale_bwd dbr", &gpu.download(&dbr).unwrap(), &backend::channel_scale(&dy, &l).unwrap(), 1e-6, 1e-6);
    close("layerscale_bwd dl", &gpu.download(&dl).unwrap(), &backend::channel_dot(&dy, Some(&br)).unwrap(), 1e-4, 1e-5);
}

#[test]
fn norms_match_the_cpu_for_f32_f16_and_bf16_inputs() {
    let Some(gpu) = gpu("norm") else { return };
    let (b, c, hh, ww) = (3, 5, 7, 3);
    let s = hh * ww;
    // A non-zero mean and a spread, so centring matters.
    let x = backend::affine(&randn(&[b, c, hh, ww], 8), 2.0, 0.5).unwrap();
    let dy = randn(&[b, c, hh, ww], 9);
    let gamma = randn(&[c], 10);
    let beta = randn(&[c], 11);
    for kind in [NormKind::LayerNorm, NormKind::RmsNorm, NormKind::InstanceNorm] {
        let groups = fnokern::backend::cuda::norm::groups(kind, (b, c, s));
        let cpu = backend::norm(kind, &x, Some(&gamma), Some(&beta), 1e-5).unwrap();
        let (gd, bd) = (gpu.upload(&host(&gamma)).unwrap(), gpu.upload(&host(&beta)).unwrap());
        // f32
        let (xd, dyd) = (gpu.upload(&host(&x)).unwrap(), gpu.upload(&host(&dy)).unwrap());
        let (mut y, mut mean, mut rstd) = (gpu.zeros::<f32>(b * c * s).unwrap(), gpu.zeros::<f32>(groups).unwrap(), gpu.zeros::<f32>(groups).unwrap());
        gpu.norm_fwd(kind, &xd, Some(&gd), Some(&bd), 1e-5, &mut y, &mut mean, &mut rstd, (b, c, s)).unwrap();
        close(&format!("{kind:?} fwd y"), &gpu.download(&y).unwrap(), &cpu.y, 1e-5, 1e-5);
        close(&format!("{kind:?} fwd mean"), &gpu.download(&mean).unwrap(), &cpu.mean, 1e-5, 1e-5);
        close(&format!("{kind:?} fwd rstd"), &gpu.download(&rstd).unwrap(), &cpu.rstd, 1e-5, 1e-5);
        let (dx_c, dg_c, db_c) = backend::norm_bwd(kind, &x, &dy, Some(&gamma), &cpu.mean, &cpu.rstd, true, true).unwrap();
        let (mut dx, mut dg, mut db) = (gpu.zeros::<f32>(b * c * s).unwrap(), gpu.zeros::<f32>(c).unwrap(), gpu.zeros::<f32>(c).unwrap());
        gpu.norm_bwd(kind, &xd, &dyd, Some(&gd), &mean, &rstd, &mut dx, Some(&mut dg), Some(&mut db), (b, c, s)).unwrap();
        close(&format!("{kind:?} bwd dx"), &gpu.download(&dx).unwrap(), &dx_c, 1e-4, 1e-4);
        close(&format!("{kind:?} bwd dgamma"), &gpu.download(&dg).unwrap(), &dg_c.unwrap(), 1e-4, 1e-4);
        close(&format!("{kind:?} bwd dbeta"), &gpu.download(&db).unwrap(), &db_c.unwrap(), 1e-4, 1e-4);

        // f16 and bf16 storage: the CPU reference normalises the same rounded values; the output
        // is rounded once more, so the tolerance is that format's half-ulp at |y| ~ 4.
        let round = |u: Unary| backend::unary(u, &x).unwrap();
        for (u, tol) in [(Unary::RoundF16, 4.0 * 2f64.powi(-11)), (Unary::RoundBf16, 4.0 * 2f64.powi(-8))] {
            let xr = round(u);
            let want = backend::norm(kind, &xr, Some(&gamma), Some(&beta), 1e-5).unwrap();
            let got: Vec<f32> = if u == Unary::RoundF16 {
                let xd = gpu.upload(&host(&xr).into_iter().map(half::f16::from_f32).collect::<Vec<_>>()).unwrap();
                let mut y = gpu.zeros::<half::f16>(b * c * s).unwrap();
                gpu.norm_fwd(kind, &xd, Some(&gd), Some(&bd), 1e-5, &mut y, &mut mean, &mut rstd, (b, c, s)).unwrap();
                gpu.download(&y).unwrap().into_iter().map(f32::from).collect()
            } else {
                let xd = gpu.upload(&host(&xr).into_iter().map(half::bf16::from_f32).collect::<Vec<_>>()).unwrap();
                let mut y = gpu.zeros::<half::bf16>(b * c * s).unwrap();
                gpu.norm_fwd(kind, &xd, Some(&gd), Some(&bd), 1e-5, &mut y, &mut mean, &mut rstd, (b, c, s)).unwrap();
                gpu.download(&y).unwrap().into_iter().map(f32::from).collect()
            };
            close(&format!("{kind:?} fwd {u:?} y"), &got, &want.y, tol, 0.0);
            close(&format!("{kind:?} fwd {u:?} rstd (fp32)"), &gpu.download(&rstd).unwrap(), &want.rstd, 1e-5, 1e-5);
        }
    }
}

#[test]
fn agc_and_unit_norms_match_the_cpu() {
    let Some(gpu) = gpu("agc") else { return };
    // A conv-transpose-like weight [Ci=3, Co=5, 2, 3]: units along axis 1.
    let shape = [3usize, 5, 2, 3];
    let (pre, units, post) = (3, 5, 6);
    let w = randn(&shape, 12);
    let g = backend::affine(&randn(&shape, 13), 3.0, 0.0).unwrap();
    let want_w = backend::unit_sumsq(&w, 1).unwrap();
    let want_g = backend::unit_sumsq(&g, 1).unwrap();
    let (wd, mut gd) = (gpu.upload(&host(&w)).unwrap(), gpu.upload(&host(&g)).unwrap());
    let mut norms = gpu.zeros::<f32>(units).unwrap();
    gpu.unit_sumsq(&wd, &mut norms, (pre, units, post)).unwrap();
    close("unit_sumsq", &gpu.download(&norms).unwrap(), &want_w, 1e-5, 1e-5);

    // AGC with lambda 0.1: the CPU reference factor per unit, then scale_units.
    let (lambda, eps) = (0.1f64, 1e-3f64);
    let (wn, gn) = (want_w.to_f64_vec().unwrap(), want_g.to_f64_vec().unwrap());
    let factors: Vec<f64> = wn
        .iter()
        .zip(&gn)
        .map(|(&w2, &g2)| {
            let limit = lambda * w2.sqrt().max(eps);
            if g2.sqrt() > limit { limit / g2.sqrt() } else { 1.0 }
        })
        .collect();
    assert!(factors.iter().any(|&f| f < 1.0), "the test must clip some unit");
    let mut want = g.clone();
    let ft = Tensor::from_f64_vec(factors.clone(), [units], DType::F32, &Device::cpu()).unwrap();
    backend::scale_units(&mut want, 1, &ft).unwrap();
    let mut got_f = gpu.zeros::<f32>(units).unwrap();
    gpu.agc_unit(&wd, &mut gd, Some(&mut got_f), (pre, units, post), lambda as f32, eps as f32).unwrap();
    close("agc_unit g", &gpu.download(&gd).unwrap(), &want, 1e-5, 1e-5);
    close("agc_unit factors", &gpu.download(&got_f).unwrap(), &ft, 1e-6, 1e-5);

    let mut x = gpu.upload(&host(&g)).unwrap();
    let fd = gpu.upload(&host(&ft)).unwrap();
    gpu.scale_units(&mut x, &fd, (pre, units, post)).unwrap();
    close("scale_units", &gpu.download(&x).unwrap(), &want, 1e-6, 1e-6);
}

#[test]
fn adam_matches_the_cpu() {
    let Some(gpu) = gpu("adam") else { return };
    let n = 1000 + 37;
    for decoupled in [false, true] {
        let (p, g) = (randn(&[n], 14), randn(&[n], 15));
        let (m, v) = (backend::affine(&randn(&[n], 16), 0.1, 0.0).unwrap(), backend::unary(Unary::Square, &randn(&[n], 17)).unwrap());
        let h = AdamStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled, step: 3, grad_scale: 0.5 };
        let (mut pd, gd, mut md, mut vd) = (gpu.upload(&host(&p)).unwrap(), gpu.upload(&host(&g)).unwrap(), gpu.upload(&host(&m)).unwrap(), gpu.upload(&host(&v)).unwrap());
        gpu.adam_step(&mut pd, &gd, &mut md, &mut vd, &h).unwrap();
        let (mut pc, mut mc, mut vc) = (p.clone(), m.clone(), v.clone());
        backend::adam_step(&mut pc, &g, &mut mc, &mut vc, &h).unwrap();
        close("adam p", &gpu.download(&pd).unwrap(), &pc, 1e-6, 1e-5);
        close("adam m", &gpu.download(&md).unwrap(), &mc, 1e-6, 1e-5);
        close("adam v", &gpu.download(&vd).unwrap(), &vc, 1e-6, 1e-5);
    }
}

#[test]
fn gelu_rounding_and_reductions_match_the_cpu() {
    let Some(gpu) = gpu("elementwise") else { return };
    let n = 4099;
    let (x, dy) = (backend::affine(&randn(&[n], 18), 3.0, 0.0).unwrap(), randn(&[n], 19));
    let (xd, dyd) = (gpu.upload(&host(&x)).unwrap(), gpu.upload(&host(&dy)).unwrap());
    let mut y = gpu.zeros::<f32>(n).unwrap();
    gpu.gelu_fwd(&xd, &mut y).unwrap();
    close("gelu_fwd", &gpu.download(&y).unwrap(), &backend::unary(Unary::Gelu, &x).unwrap(), 1e-6, 1e-5);
    gpu.gelu_bwd(&xd, &dyd, &mut y).unwrap();
    close("gelu_bwd", &gpu.download(&y).unwrap(), &backend::unary_bwd(Unary::Gelu, &x, &dy).unwrap(), 1e-6, 1e-5);
    // Rounding is exact: both sides round f32 to nearest even. Large values reach f16's inf.
    let big = backend::affine(&x, 3e4, 0.0).unwrap();
    let bigd = gpu.upload(&host(&big)).unwrap();
    for (p, u) in [(Precision::Fp16, Unary::RoundF16), (Precision::Bf16, Unary::RoundBf16)] {
        gpu.round_to(&bigd, p, &mut y).unwrap();
        let want = backend::unary(u, &big).unwrap();
        let got = gpu.download(&y).unwrap();
        assert_eq!(got, host(&want), "{p} rounding");
    }
    let big = host(&big);
    assert!(gpu.download(&y).is_ok() && big.iter().any(|v| v.abs() > 65520.0));
    for op in [Reduce::Sum, Reduce::SumSq] {
        let got = gpu.reduce(op, &xd).unwrap();
        let want = backend::reduce(op, &x).unwrap().scalar_value().unwrap();
        assert!((got as f64 - want).abs() <= 1e-3 + 1e-5 * want.abs(), "{op:?}: got {got} want {want}");
        // Bitwise repeatable.
        assert_eq!(got.to_bits(), gpu.reduce(op, &xd).unwrap().to_bits());
    }
}

#[test]
fn without_a_gpu_the_errors_say_what_is_missing() {
    match Gpu::open(0) {
        Ok(_) => eprintln!("a GPU is present: nothing to check here"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("libcuda") || msg.contains("no CUDA kernels") || msg.contains("driver sees") || msg.contains("fatbin"),
                "{msg}"
            );
        }
    }
    assert!(fnokern::backend::cuda::Gpu::open(usize::MAX).is_err());
}
