//! Forward semantics of the ops against direct definitions (naive loops written from the
//! formulas), the spectral conventions, and the errors bad input gets. Each test that computes
//! runs on every device (`test_device!`): on the CPU in f64 to 1e-12, on a GPU (or the driver
//! stand-in) in f32 to 2e-5; storage casts and the mode tables are CPU-only.

use std::f64::consts::PI;

use fnokern::autograd::Tape;
use fnokern::backend::{self, Conv2dParams};
use fnokern::{ops, DType, Device, Error, ModeConvention, SpectralModes, Tensor};

mod common;
use common::dtype_and_tol;

/// Seeded N(0, 1) values in `dev`'s compute dtype.
fn t64(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
    Tensor::randn(shape.to_vec(), 1.0, seed, dtype_and_tol(dev).0, dev).unwrap()
}

fn close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "entry {i}: {x} vs {y}");
    }
}

/// X[kx, ky] = sum x[n, m] e^{-2 pi i (kx n / H + ky m / W)} for ky < W/2 + 1.
fn naive_rfft2(x: &[f64], h: usize, w: usize) -> Vec<f64> {
    let wh = w / 2 + 1;
    let mut out = vec![0.0; h * wh * 2];
    for kx in 0..h {
        for ky in 0..wh {
            let (mut re, mut im) = (0.0, 0.0);
            for n in 0..h {
                for m in 0..w {
                    let th = -2.0 * PI * ((kx * n) as f64 / h as f64 + (ky * m) as f64 / w as f64);
                    re += x[n * w + m] * th.cos();
                    im += x[n * w + m] * th.sin();
                }
            }
            out[2 * (kx * wh + ky)] = re;
            out[2 * (kx * wh + ky) + 1] = im;
        }
    }
    out
}

test_device!(
    fn rfft2_matches_the_dft(dev) {
        let tol = dtype_and_tol(dev).1;
        for (h, w) in [(3, 5), (4, 6), (5, 1), (1, 4)] {
            let x = t64(&[h, w], 1, dev);
            let got = backend::rfft2(&x).unwrap();
            assert_eq!(got.dims(), [h, w / 2 + 1, 2]);
            close(&got.to_f64_vec().unwrap(), &naive_rfft2(&x.to_f64_vec().unwrap(), h, w), tol);
        }
    }
);

test_device!(
    fn irfft2_inverts_rfft2(dev) {
        let tol = dtype_and_tol(dev).1;
        for (h, w) in [(3, 5), (4, 6), (7, 8), (2, 3)] {
            let x = t64(&[2, h, w], 2, dev);
            let back = backend::irfft2(&backend::rfft2(&x).unwrap(), w).unwrap();
            close(&back.to_f64_vec().unwrap(), &x.to_f64_vec().unwrap(), tol);
        }
    }
);

test_device!(
    /// irfft2 is x[n, m] = 1/(HW) sum_{kx, ky} c_ky Re(Z[kx, ky] e^{+2 pi i (...)}), with c = 1 on the
    /// DC column (and the Nyquist column of an even width), 2 elsewhere: for a non-Hermitian DC or
    /// Nyquist column it keeps the Hermitian part, as JAX does by symmetrising the column.
    fn irfft2_takes_the_hermitian_part_of_dc_and_nyquist_columns(dev) {
        let tol = dtype_and_tol(dev).1;
        for (h, w) in [(5, 6), (4, 7), (4, 4)] {
            let wh = w / 2 + 1;
            let z = t64(&[h, wh, 2], 3, dev);
            let zv = z.to_f64_vec().unwrap();
            let got = backend::irfft2(&z, w).unwrap().to_f64_vec().unwrap();
            let mut want = vec![0.0; h * w];
            for n in 0..h {
                for m in 0..w {
                    let mut acc = 0.0;
                    for kx in 0..h {
                        for ky in 0..wh {
                            let c = if ky == 0 || (w % 2 == 0 && ky == w / 2) { 1.0 } else { 2.0 };
                            let th = 2.0 * PI * ((kx * n) as f64 / h as f64 + (ky * m) as f64 / w as f64);
                            let (re, im) = (zv[2 * (kx * wh + ky)], zv[2 * (kx * wh + ky) + 1]);
                            acc += c * (re * th.cos() - im * th.sin());
                        }
                    }
                    want[n * w + m] = acc / (h * w) as f64;
                }
            }
            close(&got, &want, tol);
            // Symmetrising the DC and Nyquist columns first changes nothing.
            let mut sym = zv.clone();
            let cols: Vec<usize> = if w % 2 == 0 { vec![0, wh - 1] } else { vec![0] };
            for &ky in &cols {
                for kx in 0..h {
                    let mx = (h - kx) % h;
                    let (a, b) = (2 * (kx * wh + ky), 2 * (mx * wh + ky));
                    sym[a] = 0.5 * (zv[a] + zv[b]);
                    sym[a + 1] = 0.5 * (zv[a + 1] - zv[b + 1]);
                }
            }
            let zs = Tensor::from_f64_vec(sym, [h, wh, 2], dtype_and_tol(dev).0, dev).unwrap();
            close(&backend::irfft2(&zs, w).unwrap().to_f64_vec().unwrap(), &got, tol);
        }
    }
);

#[test]
fn kept_modes_are_clamped_to_the_map() {
    let c = SpectralModes::new(12, ModeConvention::Corners);
    let p = SpectralModes::new(12, ModeConvention::Positive);
    let corners64: Vec<usize> = (0..12).chain(52..64).collect();
    assert_eq!(c.kept_rows(64), corners64);
    assert_eq!(p.kept_rows(64), (0..12).collect::<Vec<_>>());
    assert_eq!(c.kept_rows(4), vec![0, 1, 2, 3]);
    assert_eq!(c.kept_rows(1), vec![0]);
    assert_eq!(SpectralModes::new(3, ModeConvention::Corners).kept_rows(5), vec![0, 1, 2, 3, 4]);
    assert_eq!(SpectralModes::new(2, ModeConvention::Corners).kept_rows(7), vec![0, 1, 5, 6]);
    assert_eq!(p.kept_rows(4), vec![0, 1, 2, 3]);
    assert_eq!(c.kept_cols(64), 12);
    assert_eq!(c.kept_cols(4), 3);
    assert_eq!(c.kept_cols(1), 1);
    // Weights are stored only for usable modes: [C_in, C_out, rows, cols, 2].
    assert_eq!(c.weight_shape(3, 5, 4, 4).dims(), [3, 5, 4, 3, 2]);
    assert_eq!(c.weight_shape(32, 32, 64, 64).dims(), [32, 32, 24, 12, 2]);
}

test_device!(
    /// With every mode kept and W[i, o] the identity, the spectral convolution is the identity.
    fn spectral_conv_with_all_modes_and_identity_weights_is_the_identity(dev) {
        let tol = dtype_and_tol(dev).1;
        for (h, w) in [(5, 6), (4, 7), (8, 8)] {
            let c = 3;
            let modes = SpectralModes::new(16, ModeConvention::Corners);
            let ws = modes.weight_shape(c, c, h, w);
            let d = ws.dims().to_vec();
            let mut wv = vec![0.0; ws.numel()];
            for i in 0..c {
                for r in 0..d[2] {
                    for k in 0..d[3] {
                        wv[2 * (((i * c + i) * d[2] + r) * d[3] + k)] = 1.0;
                    }
                }
            }
            let wt = Tensor::from_f64_vec(wv, ws, dtype_and_tol(dev).0, dev).unwrap();
            let x = t64(&[2, c, h, w], 4, dev);
            let mut t = Tape::new();
            let (xv, wvar) = (t.constant(x.clone()), t.constant(wt));
            let y = ops::spectral_conv(&mut t, &xv, &wvar, modes).unwrap();
            close(&y.value().to_f64_vec().unwrap(), &x.to_f64_vec().unwrap(), tol);
        }
    }
);

test_device!(
    /// Positive-only modes keep exactly rows 0..m: a map with energy only in a negative-kx row is
    /// filtered out entirely, while corners keeps it.
    fn positive_convention_drops_negative_rows(dev) {
        let tol = dtype_and_tol(dev).1;
        let (h, w) = (8, 8);
        // x[n, m] = cos(2 pi (-1) n / H) has energy at kx = 1 and kx = H - 1 only, both real.
        // Use a complex exponential's real part in a single channel; after mixing with W = 1 on the
        // positive rows only, kx = H-1 is dropped, so the result is half the input.
        let xv: Vec<f64> = (0..h * w).map(|i| (2.0 * PI * (i / w) as f64 / h as f64).cos()).collect();
        let x = Tensor::from_f64_vec(xv.clone(), [1, 1, h, w], dtype_and_tol(dev).0, dev).unwrap();
        for (conv, factor) in [(ModeConvention::Positive, 0.5), (ModeConvention::Corners, 1.0)] {
            let modes = SpectralModes::new(2, conv);
            let ws = modes.weight_shape(1, 1, h, w);
            let mut wv = vec![0.0; ws.numel()];
            wv.iter_mut().step_by(2).for_each(|v| *v = 1.0);
            let wt = Tensor::from_f64_vec(wv, ws, dtype_and_tol(dev).0, dev).unwrap();
            let mut t = Tape::new();
            let (a, b) = (t.constant(x.clone()), t.constant(wt));
            let y = ops::spectral_conv(&mut t, &a, &b, modes).unwrap().value().to_f64_vec().unwrap();
            let want: Vec<f64> = xv.iter().map(|v| v * factor).collect();
            close(&y, &want, tol);
        }
    }
);

/// PyTorch's conv2d written out as loops.
fn naive_conv2d(x: &[f64], xd: [usize; 4], w: &[f64], wd: [usize; 4], b: &[f64], s: usize, p: usize) -> Vec<f64> {
    let [bn, ci, h, wi] = xd;
    let [co, _, kh, kw] = wd;
    let ho = (h + 2 * p - kh) / s + 1;
    let wo = (wi + 2 * p - kw) / s + 1;
    let mut y = vec![0.0; bn * co * ho * wo];
    for n in 0..bn {
        for o in 0..co {
            for i in 0..ho {
                for j in 0..wo {
                    let mut acc = b[o];
                    for c in 0..ci {
                        for a in 0..kh {
                            for e in 0..kw {
                                let (r, q) = ((i * s + a) as isize - p as isize, (j * s + e) as isize - p as isize);
                                if r >= 0 && q >= 0 && (r as usize) < h && (q as usize) < wi {
                                    acc += x[((n * ci + c) * h + r as usize) * wi + q as usize] * w[((o * ci + c) * kh + a) * kw + e];
                                }
                            }
                        }
                    }
                    y[((n * co + o) * ho + i) * wo + j] = acc;
                }
            }
        }
    }
    y
}

test_device!(
    fn conv2d_matches_the_definition(dev) {
        let tol = dtype_and_tol(dev).1;
        for (xd, wd, s, p) in
            [([2, 3, 5, 7], [4, 3, 3, 3], 1, 1), ([2, 3, 6, 5], [5, 3, 2, 2], 2, 0), ([1, 4, 3, 3], [2, 4, 1, 1], 1, 0), ([1, 2, 7, 6], [3, 2, 3, 3], 2, 1)]
        {
            let (x, w, b) = (t64(&xd, 1, dev), t64(&wd, 2, dev), t64(&[wd[0]], 3, dev));
            let y = backend::conv2d(&x, &w, Some(&b), Conv2dParams::new(s, p)).unwrap();
            let want = naive_conv2d(&x.to_f64_vec().unwrap(), xd, &w.to_f64_vec().unwrap(), wd, &b.to_f64_vec().unwrap(), s, p);
            close(&y.to_f64_vec().unwrap(), &want, tol);
        }
    }
);

test_device!(
    /// conv_transpose2d as PyTorch defines it: every input pixel scatters w[c, o] into the output.
    fn conv_transpose2d_matches_the_definition(dev) {
        let tol = dtype_and_tol(dev).1;
        let (xd, wd, s) = ([2, 3, 3, 4], [3, 5, 2, 2], 2);
        let (x, w, b) = (t64(&xd, 1, dev), t64(&wd, 2, dev), t64(&[5], 3, dev));
        let y = backend::conv_transpose2d(&x, &w, Some(&b), Conv2dParams::new(s, 0)).unwrap();
        assert_eq!(y.dims(), [2, 5, 6, 8]);
        let (xv, wv, bv) = (x.to_f64_vec().unwrap(), w.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
        let mut want = vec![0.0; 2 * 5 * 6 * 8];
        for n in 0..2 {
            for o in 0..5 {
                for v in want[(n * 5 + o) * 48..(n * 5 + o + 1) * 48].iter_mut() {
                    *v = bv[o];
                }
                for c in 0..3 {
                    for i in 0..3 {
                        for j in 0..4 {
                            for a in 0..2 {
                                for e in 0..2 {
                                    want[((n * 5 + o) * 6 + i * s + a) * 8 + j * s + e] += xv[((n * 3 + c) * 3 + i) * 4 + j] * wv[((c * 5 + o) * 2 + a) * 2 + e];
                                }
                            }
                        }
                    }
                }
            }
        }
        close(&y.to_f64_vec().unwrap(), &want, tol);
    }
);

test_device!(
    fn gelu_is_the_erf_form(dev) {
        let tol = dtype_and_tol(dev).1;
        let x = Tensor::from_f64_vec(vec![-1.0, 0.0, 1.0, 3.0], [4], dtype_and_tol(dev).0, dev).unwrap();
        let y = backend::unary(backend::Unary::Gelu, &x).unwrap().to_f64_vec().unwrap();
        // x Phi(x) with Phi(1) = 0.841344746068543 and Phi(3) = 0.998650101968370 (normal CDF tables).
        let want = [-(1.0 - 0.841344746068543), 0.0, 0.841344746068543, 3.0 * 0.998650101968370];
        close(&y, &want, tol);
    }
);

test_device!(
    fn fftshift_matches_numpy_on_odd_sizes(dev) {
        let x = Tensor::from_f64_vec((0..5).map(f64::from).collect::<Vec<_>>(), [1, 5], dtype_and_tol(dev).0, dev).unwrap();
        let mut t = Tape::new();
        let xv = t.constant(x);
        // numpy.fft.fftshift(arange(5)) = [3, 4, 0, 1, 2]; ifftshift = [2, 3, 4, 0, 1].
        let s = ops::fftshift(&mut t, &xv, false).unwrap();
        assert_eq!(s.value().to_f64_vec().unwrap(), [3.0, 4.0, 0.0, 1.0, 2.0]);
        let i = ops::ifftshift(&mut t, &xv, false).unwrap();
        assert_eq!(i.value().to_f64_vec().unwrap(), [2.0, 3.0, 4.0, 0.0, 1.0]);
        let back = ops::ifftshift(&mut t, &s, false).unwrap();
        assert_eq!(back.value().to_f64_vec().unwrap(), [0.0, 1.0, 2.0, 3.0, 4.0]);
    }
);

test_device!(
    fn norms_normalise_their_groups(dev) {
        let tol = dtype_and_tol(dev).1;
        let x = t64(&[2, 6, 3, 5], 7, dev);
        for kind in [fnokern::NormKind::LayerNorm, fnokern::NormKind::InstanceNorm, fnokern::NormKind::RmsNorm] {
            let y = backend::norm(kind, &x, None, None, 0.0).unwrap().y.to_f64_vec().unwrap();
            // Group (b=1, s=4) over channels, or (b=1, c=2) over positions.
            let idx: Vec<usize> = if kind.over_channels() { (0..6).map(|c| (6 + c) * 15 + 4).collect() } else { (0..15).map(|s| (6 + 2) * 15 + s).collect() };
            let n = idx.len() as f64;
            let mean = idx.iter().map(|&i| y[i]).sum::<f64>() / n;
            let ms = idx.iter().map(|&i| y[i] * y[i]).sum::<f64>() / n;
            if kind.centres() {
                assert!(mean.abs() < tol, "{kind:?} mean {mean}");
                assert!((ms - 1.0).abs() < tol, "{kind:?} variance {ms}");
            } else {
                assert!((ms - 1.0).abs() < tol, "{kind:?} mean square {ms}");
            }
        }
    }
);

test_device!(
    fn bad_shapes_are_errors_that_name_the_op_and_both_shapes(dev) {
        let x = Tensor::zeros([2, 3, 5, 5], DType::F32, dev).unwrap();
        let w = Tensor::zeros([4, 2, 3, 3], DType::F32, dev).unwrap();
        let err = backend::conv2d(&x, &w, None, Conv2dParams::new(1, 1)).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { op: "conv2d", .. }));
        let msg = err.to_string();
        assert!(msg.contains("conv2d") && msg.contains("[2, 3, 5, 5]") && msg.contains("[4, 2, 3, 3]"), "{msg}");

        let a = Tensor::zeros([2, 3], DType::F32, dev).unwrap();
        let b = Tensor::zeros([3, 2], DType::F32, dev).unwrap();
        let msg = backend::binary(backend::Binary::Add, &a, &b).unwrap_err().to_string();
        assert_eq!(msg, "add: shape mismatch: [2, 3] vs [3, 2]");

        let modes = SpectralModes::new(4, ModeConvention::Corners);
        let xh = Tensor::zeros([1, 3, 8, 5, 2], DType::F32, dev).unwrap();
        let bad_w = Tensor::zeros([3, 2, 4, 4, 2], DType::F32, dev).unwrap();
        let msg = backend::spectral_mix(&xh, &bad_w, modes).unwrap_err().to_string();
        assert!(msg.contains("spectral_mix") && msg.contains("kept rows=8"), "{msg}");

        let big_kernel = Tensor::zeros([1, 3, 7, 7], DType::F32, dev).unwrap();
        let msg = backend::conv2d(&x, &big_kernel, None, Conv2dParams::new(1, 0)).unwrap_err().to_string();
        assert!(msg.contains("does not fit"), "{msg}");
        let good_w = Tensor::zeros([4, 3, 3, 3], DType::F32, dev).unwrap();
        let msg = backend::conv2d(&x, &good_w, None, Conv2dParams::new(0, 1)).unwrap_err().to_string();
        assert!(msg.contains("stride"), "{msg}");

        assert!(Tensor::from_vec(vec![1.0f32; 5], [2, 3], dev).is_err());
        assert!(a.reshape([7]).is_err());
        let msg = backend::irfft2(&Tensor::zeros([4, 3, 2], DType::F32, dev).unwrap(), 7).unwrap_err().to_string();
        assert!(msg.contains("cannot give width 7"), "{msg}");
    }
);

#[test]
fn f16_storage_is_refused_by_kernels_and_devices_must_match() {
    let dev = Device::cpu();
    let h = Tensor::zeros([2, 2], DType::F16, &dev).unwrap();
    let err = backend::unary(backend::Unary::Gelu, &h).unwrap_err();
    assert!(matches!(err, Error::UnsupportedDType { dtype: DType::F16, .. }), "{err}");
    // Storage types round-trip through casts.
    let x = Tensor::from_vec(vec![1.5f32, -2.25], [2], &dev).unwrap();
    for dt in [DType::F16, DType::BF16] {
        let back = x.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(back.to_f64_vec().unwrap(), [1.5, -2.25], "{dt:?}");
    }
    let other = Device::cpu();
    let y = Tensor::zeros([2], DType::F32, &other).unwrap();
    let err = backend::binary(backend::Binary::Add, &x, &y).unwrap_err();
    assert!(matches!(err, Error::DeviceMismatch { .. }), "{err}");
}

test_device!(
    fn gradient_accumulation_reuses_a_unique_buffer(dev) {
        let a = Tensor::full(1.0, [64], DType::F32, dev).unwrap();
        let b = Tensor::full(2.0, [64], DType::F32, dev).unwrap();
        let before = dev.memory().allocations;
        let c = backend::add_into(a, b.clone()).unwrap();
        assert_eq!(dev.memory().allocations, before, "a unique accumulator is written in place");
        assert_eq!(c.to_f64_vec().unwrap(), vec![3.0; 64]);
        let shared = c.clone();
        let d = backend::add_into(c, b.clone()).unwrap();
        assert_eq!(dev.memory().allocations, before + 1, "a shared one is not");
        assert_eq!(shared.to_f64_vec().unwrap(), vec![3.0; 64]);
        assert_eq!(d.to_f64_vec().unwrap(), vec![5.0; 64]);
    }
);

test_device!(
    /// Every op given tensors of the wrong rank (a scalar, a vector) returns an error, never panics.
    fn wrong_ranks_are_errors_not_panics(dev) {
        use fnokern::ops as o;
        let shapes: [&[usize]; 4] = [&[], &[3], &[2, 3], &[0, 2, 2]];
        for sa in shapes {
            for sb in shapes {
                let (a, b) = (Tensor::zeros(sa.to_vec(), DType::F32, dev), Tensor::zeros(sb.to_vec(), DType::F32, dev));
                let (a, b) = match (a, b) {
                    (Ok(a), Ok(b)) => (a, b),
                    (a, b) => {
                        // A GPU holds no empty tensor: refused when made, with the reason.
                        assert!(dev.kind().is_gpu() && (sa.contains(&0) || sb.contains(&0)), "{sa:?} {sb:?}");
                        let err = a.err().or(b.err()).unwrap().to_string();
                        assert!(err.contains("cannot hold an empty tensor"), "{err}");
                        continue;
                    }
                };
                let modes = SpectralModes::new(2, ModeConvention::Corners);
                let run = std::panic::catch_unwind(|| {
                    let mut t = Tape::new();
                    let (x, y) = (t.leaf(a.clone(), true), t.leaf(b.clone(), true));
                    let p = Conv2dParams::new(1, 1);
                    let _ = o::conv2d(&mut t, &x, &y, None, p);
                    let _ = o::conv_transpose2d(&mut t, &x, &y, None, Conv2dParams::new(2, 0));
                    let _ = o::spectral_conv(&mut t, &x, &y, modes);
                    let _ = o::spectral_mix(&mut t, &x, &y, modes);
                    let _ = o::rfft2(&mut t, &x);
                    let _ = o::irfft2(&mut t, &x, 4);
                    let _ = o::channel_scale(&mut t, &x, &y);
                    let _ = o::layerscale(&mut t, &x, &x, &y);
                    let _ = o::concat_channels(&mut t, &[&x, &y]);
                    let _ = o::layer_norm(&mut t, &x, Some(&y), None, 1e-5);
                    let _ = o::instance_norm(&mut t, &x, None, Some(&y), 1e-5);
                    let _ = o::mul_probe(&mut t, &x, &b);
                    let _ = o::fft2(&mut t, &x, o::FftNorm::Ortho);
                    let _ = o::fftshift(&mut t, &x, true);
                    let _ = o::fftshift(&mut t, &x, false);
                    let _ = o::complex_abs(&mut t, &x);
                    let _ = o::channels_to_complex(&mut t, &x);
                    let _ = o::complex_to_channels(&mut t, &x);
                    let _ = o::div_scalar(&mut t, &x, &y);
                    let _ = o::mul_scalar(&mut t, &x, &y);
                    let _ = o::mae(&mut t, &x, &y);
                    let _ = o::rel_l2(&mut t, &x, &y);
                    let _ = o::mean(&mut t, &x);
                    let _ = o::global_norm(&mut t, &[]);
                });
                assert!(run.is_ok(), "an op panicked on shapes {sa:?} and {sb:?}");
            }
        }
    }
);

test_device!(
    fn magnitude_gradient_is_zero_at_zero(dev) {
        let tol = dtype_and_tol(dev).1;
        let z = Tensor::from_f64_vec(vec![0.0, 0.0, 3.0, -4.0], [2, 2], dtype_and_tol(dev).0, dev).unwrap();
        let mut t = Tape::new();
        let zv = t.leaf(z, true);
        let m = ops::complex_abs(&mut t, &zv).unwrap();
        assert_eq!(m.value().to_f64_vec().unwrap(), [0.0, 5.0]);
        let s = ops::sum(&mut t, &m).unwrap();
        let g = t.backward(&s).unwrap().wrt(&zv).unwrap().to_f64_vec().unwrap();
        assert_eq!(g[..2], [0.0, 0.0], "no NaN from 0 / |0|");
        close(&g, &[0.0, 0.0, 0.6, -0.8], tol);
    }
);

test_device!(
    /// In-place scaling (clipping and unscaling gradients) writes into a tensor nobody else holds
    /// and equals y = k x; a shared tensor is copied first, so its other holder keeps its values.
    fn scale_in_place_writes_into_its_own_buffer(dev) {
        let tol = dtype_and_tol(dev).1;
        let x = t64(&[3, 5], 8, dev);
        let want: Vec<f64> = x.to_f64_vec().unwrap().iter().map(|v| -0.25 * v).collect();
        let mut y = backend::affine(&x, 1.0, 0.0).unwrap();
        let before = dev.memory().allocations;
        backend::scale_in_place(&mut y, -0.25).unwrap();
        assert_eq!(dev.memory().allocations, before, "a unique tensor is scaled in place");
        close(&y.to_f64_vec().unwrap(), &want, tol);
        let mut shared = x.clone();
        backend::scale_in_place(&mut shared, -0.25).unwrap();
        assert_eq!(dev.memory().allocations, before + 1, "a shared one is copied");
        close(&shared.to_f64_vec().unwrap(), &want, tol);
        assert_ne!(x.to_f64_vec().unwrap(), shared.to_f64_vec().unwrap(), "the other holder kept its values");
    }
);

/// The overlap term: 0 when neighbouring patches agree where both are lit, the probe-weighted
/// squared disagreement over the detached energy otherwise, for both axes; bad shapes refused.
#[test]
fn the_overlap_term_measures_disagreement_between_neighbours() {
    use fnokern::loss::{overlap_disagreement, PairAxis, Pairs};
    let (n, s, half) = (8usize, 3usize, 2usize);
    let dev = Device::cpu();
    // An object over a 20 x 20 plane; A_k's patch starts at (2k, k), B_k's `s` further along the axis.
    let object = |r: usize, c: usize| [((r as f64) * 0.7).sin() + 0.1 * c as f64, ((c as f64) * 0.4).cos() - 0.05 * r as f64];
    let probe: Vec<f64> = (0..n * n).flat_map(|q| [1.0 + ((q / n) as f64 - 3.5).abs() * 0.2, 0.3 * ((q % n) as f64 - 3.5) / 3.5]).collect();
    let probe = Tensor::from_f64_vec(probe, [n, n, 2], DType::F64, &dev).unwrap();
    for axis in [PairAxis::Rows, PairAxis::Cols] {
        let corner = |k: usize| {
            let (r0, c0) = (2 * (k % half), k % half);
            let (dr, dc) = match axis {
                PairAxis::Rows => (s, 0),
                PairAxis::Cols => (0, s),
            };
            if k < half {
                (r0, c0)
            } else {
                (r0 + dr, c0 + dc)
            }
        };
        let patches = |offset: f64| {
            let mut v = vec![0.0; 2 * half * 2 * n * n];
            for k in 0..2 * half {
                let (r0, c0) = corner(k);
                // B patches carry a constant phase `offset`, which the physics loss cannot see.
                let rot = if k >= half { offset } else { 0.0 };
                for r in 0..n {
                    for c in 0..n {
                        let z = object(r0 + r, c0 + c);
                        let (re, im) = (z[0] * rot.cos() - z[1] * rot.sin(), z[0] * rot.sin() + z[1] * rot.cos());
                        v[((k * 2) * n + r) * n + c] = re;
                        v[((k * 2 + 1) * n + r) * n + c] = im;
                    }
                }
            }
            v
        };
        let term = |v: Vec<f64>| {
            let mut t = Tape::new();
            let x = t.leaf(Tensor::from_f64_vec(v, [2 * half, 2, n, n], DType::F64, &dev).unwrap(), true);
            overlap_disagreement(&mut t, &x, Pairs { axis, shift: s }, &probe).unwrap().value().scalar_value().unwrap()
        };
        assert!(term(patches(0.0)).abs() < 1e-24, "{axis:?}: consistent patches disagree");
        // A phase offset c between the halves: |z - z e^{ic}|^2 = 2 (1 - cos c) |z|^2 everywhere,
        // so the term is 2 (1 - cos c) / 2 = 1 - cos c whatever the weights.
        let c = 0.6f64;
        assert!((term(patches(c)) - (1.0 - c.cos())).abs() < 1e-12, "{axis:?}: {}", term(patches(c)));
    }
    let mut t = Tape::new();
    let odd = t.leaf(Tensor::zeros([3, 2, n, n], DType::F64, &dev).unwrap(), true);
    assert!(overlap_disagreement(&mut t, &odd, Pairs { axis: PairAxis::Cols, shift: s }, &probe).is_err());
    let even = t.leaf(Tensor::zeros([2, 2, n, n], DType::F64, &dev).unwrap(), true);
    assert!(overlap_disagreement(&mut t, &even, Pairs { axis: PairAxis::Cols, shift: n }, &probe).is_err());
}
