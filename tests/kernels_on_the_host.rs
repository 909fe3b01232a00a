//! The CUDA kernels' index arithmetic and formulas, checked on machines without a GPU: the host's
//! C++ compiler builds kernels/*.cu as plain functions (tests/host/fno_host_shim.h stands in for
//! CUDA: one thread per block, block_sum the identity), and each kernel is run block by block on
//! host buffers and compared with the CPU backend, the specification. What this cannot check is
//! anything GPU-specific: warp shuffles and barriers (block_sum), the launch geometry, the
//! launchers' argument order, cuBLAS and cuFFT; tests/cuda*.rs check those on a GPU.
//!
//! Without a C++ compiler (`CXX`, else `c++`) each test prints that it skipped and passes.

use std::path::PathBuf;
use std::sync::OnceLock;

use fnokern::backend::{self, Binary, NormKind, Reduce, SgdStep, Unary};
use fnokern::{Conv2dParams, DType, Device, ModeConvention, SpectralModes, Tensor};
use libloading::Library;

mod common;
use common::UNARY;

/// The kernels built once per test process as a shared library, or why not.
fn library() -> &'static Result<Library, String> {
    static LIB: OnceLock<Result<Library, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::temp_dir().join(format!("fnokern-host-kernels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("kernels"))
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        sources.sort();
        let unit = dir.join("all_kernels.cpp");
        let text: String = sources.iter().map(|s| format!("#include \"{}\"\n", s.display())).collect();
        std::fs::write(&unit, text).map_err(|e| e.to_string())?;
        let lib = dir.join("libfno_host_kernels.so");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = std::process::Command::new(&cxx)
            .args(["-std=c++17", "-O1", "-shared", "-fPIC", "-I"])
            .arg(root.join("tests/host"))
            .arg("-I")
            .arg(root.join("kernels"))
            .arg(&unit)
            .arg("-o")
            .arg(&lib)
            .output()
            .map_err(|e| format!("no C++ compiler `{cxx}`: {e}"))?;
        // A compiler that runs but rejects the kernels is a failure, not a skip.
        assert!(out.status.success(), "{cxx} could not build the kernels:\n{}", String::from_utf8_lossy(&out.stderr));
        // SAFETY: the library was just built from the kernels; loading it runs no initialiser of
        // ours beyond thread-local defaults.
        unsafe { Library::new(&lib) }.map_err(|e| e.to_string())
    })
}

fn kernels(test: &str) -> Option<&'static Library> {
    match library() {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("{test}: skipped: {e}");
            None
        }
    }
}

/// A kernel's function pointer by name, typed by the caller to its C signature.
macro_rules! kernel {
    ($lib:expr, $name:literal, fn($($t:ty),*)) => {{
        // SAFETY: the type spelled here is the kernel's C signature in kernels/*.cu.
        let f: libloading::Symbol<unsafe extern "C" fn($($t),*)> = unsafe { $lib.get(concat!($name, "\0").as_bytes()) }.expect($name);
        *f
    }};
}

/// Runs `call` once per block of a `grid`-block launch.
fn blocks(lib: &Library, grid: usize, mut call: impl FnMut()) {
    let set = kernel!(lib, "fno_host_block", fn(u32, u32));
    for b in 0..grid {
        // SAFETY: sets this thread's emulated blockIdx / gridDim.
        unsafe { set(b as u32, grid as u32) };
        call();
    }
}

fn once(lib: &Library, call: impl FnMut()) {
    blocks(lib, 1, call)
}

/// One CPU device for every tensor of the process (operands must share a device).
fn cpu() -> &'static Device {
    static CPU: OnceLock<Device> = OnceLock::new();
    CPU.get_or_init(Device::cpu)
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), 1.0, seed, DType::F32, cpu()).unwrap()
}

fn v(t: &Tensor) -> Vec<f32> {
    t.to_f64_vec().unwrap().into_iter().map(|x| x as f32).collect()
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<String> = got
        .iter()
        .zip(want)
        .enumerate()
        // A NaN on either side is a mismatch.
        .filter(|(_, (g, w))| {
            let err = (*g - *w).abs();
            err.is_nan() || err > tol * (1.0 + w.abs())
        })
        .map(|(i, (g, w))| format!("[{i}] got {g} want {w}"))
        .collect();
    assert!(bad.is_empty(), "{what}: {} of {} mismatch, first: {}", bad.len(), got.len(), bad[..bad.len().min(5)].join(", "));
}


#[test]
fn element_wise_kernels_match_the_cpu() {
    let Some(lib) = kernels("element-wise") else { return };
    let (x, dy, b) = (randn(&[3, 5, 7], 1), randn(&[3, 5, 7], 2), randn(&[3, 5, 7], 3));
    let pos = Tensor::rand_uniform([3, 5, 7], 0.5, 2.0, 4, DType::F32, cpu()).unwrap();
    let n = x.numel();
    let unary = kernel!(lib, "unary_f32", fn(*const f32, *mut f32, i64, i32));
    let unary_bwd = kernel!(lib, "unary_bwd_f32", fn(*const f32, *const f32, *mut f32, i64, i32));
    for (code, op) in UNARY.into_iter().enumerate() {
        let input = if matches!(op, Unary::Sqrt | Unary::Log) { &pos } else { &x };
        let xs = v(input);
        let mut y = vec![0f32; n];
        let mut dx = vec![0f32; n];
        // SAFETY: every buffer holds n floats.
        once(lib, || unsafe { unary(xs.as_ptr(), y.as_mut_ptr(), n as i64, code as i32) });
        once(lib, || unsafe { unary_bwd(xs.as_ptr(), v(&dy).as_ptr(), dx.as_mut_ptr(), n as i64, code as i32) });
        close(&format!("{op:?}"), &y, &v(&backend::unary(op, input).unwrap()), 1e-6);
        close(&format!("{op:?}'"), &dx, &v(&backend::unary_bwd(op, input, &dy).unwrap()), 1e-6);
    }
    let binary = kernel!(lib, "binary_f32", fn(*const f32, *const f32, *mut f32, i64, i32));
    for (code, op) in [Binary::Add, Binary::Sub, Binary::Mul].into_iter().enumerate() {
        let mut y = vec![0f32; n];
        once(lib, || unsafe { binary(v(&x).as_ptr(), v(&b).as_ptr(), y.as_mut_ptr(), n as i64, code as i32) });
        close(&format!("{op:?}"), &y, &v(&backend::binary(op, &x, &b).unwrap()), 1e-6);
    }
    let s = [1.75f32];
    let scale_by = kernel!(lib, "scale_by_f32", fn(*const f32, *const f32, *mut f32, i64, i32));
    for divide in [false, true] {
        let mut y = vec![0f32; n];
        once(lib, || unsafe { scale_by(v(&x).as_ptr(), s.as_ptr(), y.as_mut_ptr(), n as i64, divide as i32) });
        let st = Tensor::full(1.75, [1], DType::F32, cpu()).unwrap();
        close("scale_by", &y, &v(&backend::scale_by(&x, &st, divide).unwrap()), 1e-6);
    }
    let (mut acc, mut c) = (v(&x), v(&x));
    let add_assign = kernel!(lib, "add_assign_f32", fn(*mut f32, *const f32, i64));
    let clamp = kernel!(lib, "clamp_f32", fn(*mut f32, i64, f32));
    once(lib, || unsafe { add_assign(acc.as_mut_ptr(), v(&b).as_ptr(), n as i64) });
    once(lib, || unsafe { clamp(c.as_mut_ptr(), n as i64, 0.5) });
    close("add_assign", &acc, &v(&backend::binary(Binary::Add, &x, &b).unwrap()), 1e-6);
    let mut want = x.clone();
    backend::clamp(&mut want, 0.5).unwrap();
    close("clamp", &c, &v(&want), 0.0);
}

#[test]
fn reductions_and_channel_kernels_match_the_cpu() {
    let Some(lib) = kernels("channels") else { return };
    let (bn, c, s) = (3usize, 5usize, 63usize);
    let (x, y, l) = (randn(&[bn, c, s], 1), randn(&[bn, c, s], 2), randn(&[c], 3));
    let n = bn * c * s;
    // The two-pass reduction with 256 partials, for each op.
    let partial_k = kernel!(lib, "reduce_partial_f32", fn(*const f32, *const f32, *mut f32, i64, i32));
    let final_k = kernel!(lib, "reduce_final_f32", fn(*const f32, *mut f32, i32));
    for (code, want) in [
        (0, backend::reduce(Reduce::Sum, &x).unwrap()),
        (1, backend::reduce(Reduce::SumSq, &x).unwrap()),
        (2, backend::dot(&x, &y).unwrap()),
    ] {
        let mut partial = vec![0f32; 256];
        let mut out = [0f32];
        let (xs, ys) = (v(&x), v(&y));
        blocks(lib, 256, || unsafe { partial_k(xs.as_ptr(), ys.as_ptr(), partial.as_mut_ptr(), n as i64, code) });
        once(lib, || unsafe { final_k(partial.as_ptr(), out.as_mut_ptr(), 256) });
        close(&format!("reduce op {code}"), &out, &v(&want), 1e-5);
    }
    let bias = kernel!(lib, "channel_bias_f32", fn(*mut f32, *const f32, i64, i32, i64));
    let mut yb = v(&x);
    once(lib, || unsafe { bias(yb.as_mut_ptr(), v(&l).as_ptr(), n as i64, c as i32, s as i64) });
    let conv_bias = backend::conv2d(&x.reshape([bn, c, s, 1]).unwrap(), &Tensor::from_vec(identity(c), [c, c, 1, 1], cpu()).unwrap(), Some(&l), Conv2dParams::new(1, 0)).unwrap();
    close("channel_bias", &yb, &v(&conv_bias), 1e-6);
    let scale = kernel!(lib, "channel_scale_f32", fn(*const f32, *const f32, *mut f32, i64, i32, i64));
    let mut ys = vec![0f32; n];
    once(lib, || unsafe { scale(v(&x).as_ptr(), v(&l).as_ptr(), ys.as_mut_ptr(), n as i64, c as i32, s as i64) });
    close("channel_scale", &ys, &v(&backend::channel_scale(&x, &l).unwrap()), 1e-6);
    let dot = kernel!(lib, "channel_dot_partials_f32", fn(*const f32, *const f32, *mut f32, i32, i64));
    let sum = kernel!(lib, "channel_sum_partials_f32", fn(*const f32, *mut f32, i32, i32));
    for with_b in [true, false] {
        let mut partial = vec![0f32; bn * c];
        let mut out = vec![0f32; c];
        let (xs, yv) = (v(&x), v(&y));
        let bp = if with_b { yv.as_ptr() } else { std::ptr::null() };
        blocks(lib, bn * c, || unsafe { dot(xs.as_ptr(), bp, partial.as_mut_ptr(), (bn * c) as i32, s as i64) });
        once(lib, || unsafe { sum(partial.as_ptr(), out.as_mut_ptr(), bn as i32, c as i32) });
        close("channel_dot", &out, &v(&backend::channel_dot(&x, with_b.then_some(&y)).unwrap()), 1e-5);
    }
    // Concat three parts, then slice the middle one back out.
    let copy = kernel!(lib, "copy_channels_f32", fn(*const f32, *mut f32, i32, i32, i32, i64, i32, i32));
    let other = randn(&[bn, 2, s], 4);
    let mut cat = vec![0f32; bn * (c + 2 + c) * s];
    for (part, off) in [(&x, 0), (&other, c), (&y, c + 2)] {
        let pc = part.dims()[1];
        once(lib, || unsafe { copy(v(part).as_ptr(), cat.as_mut_ptr(), bn as i32, pc as i32, (2 * c + 2) as i32, s as i64, off as i32, 0) });
    }
    let want_cat = backend::concat_channels(&[&x, &other, &y]).unwrap();
    close("concat", &cat, &v(&want_cat), 0.0);
    let mut mid = vec![0f32; bn * 2 * s];
    once(lib, || unsafe { copy(cat.as_ptr(), mid.as_mut_ptr(), bn as i32, (2 * c + 2) as i32, 2, s as i64, c as i32, 1) });
    close("slice", &mid, &v(&other), 0.0);
    // Pack [B, 2C, S] real/imaginary channels to complex and back.
    let pack = kernel!(lib, "pack_complex_f32", fn(*const f32, *mut f32, i32, i32, i64, i32));
    let chans = randn(&[bn, 6, s], 5);
    let mut z = vec![0f32; chans.numel()];
    once(lib, || unsafe { pack(v(&chans).as_ptr(), z.as_mut_ptr(), bn as i32, 3, s as i64, 0) });
    close("pack", &z, &v(&backend::channels_to_complex(&chans).unwrap()), 0.0);
    let mut back = vec![0f32; z.len()];
    once(lib, || unsafe { pack(z.as_ptr(), back.as_mut_ptr(), bn as i32, 3, s as i64, 1) });
    close("unpack", &back, &v(&chans), 0.0);
    // Circular shifts of real and complex maps.
    let roll = kernel!(lib, "roll2d_f32", fn(*const f32, *mut f32, i64, i32, i32, i32, i32, i32));
    for (complex, inner) in [(false, 1usize), (true, 2)] {
        let shape: Vec<usize> = if complex { vec![bn, 2, 9, 7, 2] } else { vec![bn, 2, 9, 7] };
        let t = randn(&shape, 6);
        let mut r = vec![0f32; t.numel()];
        once(lib, || unsafe { roll(v(&t).as_ptr(), r.as_mut_ptr(), (bn * 2) as i64, 9, 7, inner as i32, 4, 5) });
        close("roll2d", &r, &v(&backend::roll2d(&t, 4, 5, complex).unwrap()), 0.0);
    }
}

fn identity(c: usize) -> Vec<f32> {
    (0..c * c).map(|i| if i / c == i % c { 1.0 } else { 0.0 }).collect()
}

#[test]
fn complex_and_spectrum_kernels_match_the_cpu() {
    let Some(lib) = kernels("complex") else { return };
    let z = randn(&[3, 9, 10, 2], 1);
    let p = randn(&[9, 10, 2], 2);
    let dy = randn(&[3, 9, 10], 3);
    let n = 3 * 90;
    let mul = kernel!(lib, "complex_mul_f32", fn(*const f32, *const f32, *mut f32, i64, i64, i32));
    for conj in [false, true] {
        let mut y = vec![0f32; 2 * n];
        once(lib, || unsafe { mul(v(&z).as_ptr(), v(&p).as_ptr(), y.as_mut_ptr(), n as i64, 90, conj as i32) });
        close("complex_mul", &y, &v(&backend::complex_mul(&z, &p, conj).unwrap()), 1e-6);
    }
    let abs = kernel!(lib, "complex_abs_f32", fn(*const f32, *mut f32, i64));
    let angle = kernel!(lib, "complex_angle_f32", fn(*const f32, *mut f32, i64));
    let abs_bwd = kernel!(lib, "complex_abs_bwd_f32", fn(*const f32, *const f32, *mut f32, i64));
    let angle_bwd = kernel!(lib, "complex_angle_bwd_f32", fn(*const f32, *const f32, *mut f32, i64));
    let (zs, dys) = (v(&z), v(&dy));
    let (mut a, mut g, mut da, mut dg) = (vec![0f32; n], vec![0f32; n], vec![0f32; 2 * n], vec![0f32; 2 * n]);
    once(lib, || unsafe {
        abs(zs.as_ptr(), a.as_mut_ptr(), n as i64);
        angle(zs.as_ptr(), g.as_mut_ptr(), n as i64);
        abs_bwd(zs.as_ptr(), dys.as_ptr(), da.as_mut_ptr(), n as i64);
        angle_bwd(zs.as_ptr(), dys.as_ptr(), dg.as_mut_ptr(), n as i64);
    });
    close("abs", &a, &v(&backend::complex_abs(&z).unwrap()), 1e-6);
    close("angle", &g, &v(&backend::complex_angle(&z).unwrap()), 1e-6);
    close("abs'", &da, &v(&backend::complex_abs_bwd(&z, &dy).unwrap()), 1e-6);
    close("angle'", &dg, &v(&backend::complex_angle_bwd(&z, &dy).unwrap()), 1e-5);

    // The spectrum glue around cuFFT, for odd and even widths and heights.
    let col_scale = kernel!(lib, "spectrum_col_scale_f32", fn(*mut f32, i64, i32, i32, i32));
    let prep = kernel!(lib, "irfft_prep_f32", fn(*const f32, *mut f32, i64, i32, i32, i32, i32, f32));
    for (h, w) in [(9usize, 10usize), (8, 7), (6, 6)] {
        let wh = w / 2 + 1;
        let planes = 4;
        let x = randn(&[planes, h, w], 4);
        // rfft2 then the column scale is irfft2's adjoint.
        let mut spec = v(&backend::rfft2(&x).unwrap());
        once(lib, || unsafe { col_scale(spec.as_mut_ptr(), planes as i64, h as i32, wh as i32, w as i32) });
        close(&format!("{h}x{w} adjoint of irfft2"), &spec, &v(&backend::irfft2_bwd(&x).unwrap()), 1e-6);
        // The prepared spectrum's DC (and Nyquist) columns are Hermitian along kx, and its exact
        // inverse transform is the CPU's irfft2 (and, with `adjoint`, rfft2's adjoint). The CPU's
        // irfft2 of a spectrum that is already Hermitian there is that exact inverse.
        let zr = randn(&[planes, h, wh, 2], 5);
        let hw = (h * w) as f32;
        for (adjoint, norm) in [(0, 1.0 / hw), (1, 1.0)] {
            let mut out = vec![0f32; zr.numel()];
            once(lib, || unsafe { prep(v(&zr).as_ptr(), out.as_mut_ptr(), planes as i64, h as i32, wh as i32, w as i32, adjoint, norm) });
            let edges: Vec<usize> = if w % 2 == 0 { vec![0, wh - 1] } else { vec![0] };
            for pl in 0..planes {
                for &ky in &edges {
                    for kx in 0..h {
                        let at = |r: usize| 2 * ((pl * h + r) * wh + ky);
                        let (i, j) = (at(kx), at((h - kx) % h));
                        assert!((out[i] - out[j]).abs() < 1e-6 && (out[i + 1] + out[j + 1]).abs() < 1e-6, "{h}x{w}: column {ky} is not Hermitian");
                    }
                }
            }
            let prepared = Tensor::from_vec(out, [planes, h, wh, 2], cpu()).unwrap();
            let got: Vec<f32> = v(&backend::irfft2(&prepared, w).unwrap()).into_iter().map(|x| x * hw).collect();
            let want = if adjoint == 1 { backend::rfft2_bwd(&zr, w).unwrap() } else { backend::irfft2(&zr, w).unwrap() };
            close(&format!("{h}x{w} irfft prep (adjoint {adjoint})"), &got, &v(&want), 1e-5);
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ConvGeom {
    c: i32,
    h: i32,
    w: i32,
    kh: i32,
    kw: i32,
    ho: i32,
    wo: i32,
    stride: i32,
    pad: i32,
}

/// Row-major c [m, n] = a [m, k] b [k, n] (or with a transposed: a stored [k, m]).
fn matmul(a: &[f32], at: bool, b: &[f32], bt: bool, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|p| {
                    let av = if at { a[p * m + i] } else { a[i * k + p] };
                    let bv = if bt { b[j * k + p] } else { b[p * n + j] };
                    av * bv
                })
                .sum();
        }
    }
    c
}

#[test]
fn im2col_and_col2im_make_the_cpus_convolutions() {
    let Some(lib) = kernels("conv") else { return };
    let im2col = kernel!(lib, "im2col_f32", fn(*const f32, *mut f32, i32, ConvGeom));
    let col2im = kernel!(lib, "col2im_f32", fn(*const f32, *mut f32, i32, ConvGeom));
    for (kk, stride, pad) in [(3usize, 1usize, 1usize), (3, 2, 1), (2, 2, 0), (1, 2, 0), (5, 1, 2)] {
        let (bn, c, co, h, w) = (2usize, 3usize, 4usize, 11usize, 9usize);
        let p = Conv2dParams::new(stride, pad);
        let x = randn(&[bn, c, h, w], 1);
        let wt = randn(&[co, c, kk, kk], 2);
        let y = backend::conv2d(&x, &wt, None, p).unwrap();
        let (ho, wo) = (y.dims()[2], y.dims()[3]);
        let g = ConvGeom { c: c as i32, h: h as i32, w: w as i32, kh: kk as i32, kw: kk as i32, ho: ho as i32, wo: wo as i32, stride: stride as i32, pad: pad as i32 };
        let (k, hw) = (c * kk * kk, ho * wo);
        let mut cols = vec![0f32; bn * k * hw];
        once(lib, || unsafe { im2col(v(&x).as_ptr(), cols.as_mut_ptr(), bn as i32, g) });
        let ws = v(&wt);
        let what = format!("k{kk} s{stride} p{pad}");
        let fwd: Vec<f32> = (0..bn).flat_map(|s| matmul(&ws, false, &cols[s * k * hw..(s + 1) * k * hw], false, co, hw, k)).collect();
        close(&format!("{what} forward"), &fwd, &v(&y), 1e-5);
        let dy = randn(y.dims(), 3);
        let dys = v(&dy);
        let dcols: Vec<f32> = (0..bn).flat_map(|s| matmul(&ws, true, &dys[s * co * hw..(s + 1) * co * hw], false, k, hw, co)).collect();
        let mut dx = vec![0f32; x.numel()];
        once(lib, || unsafe { col2im(dcols.as_ptr(), dx.as_mut_ptr(), bn as i32, g) });
        close(&format!("{what} dx"), &dx, &v(&backend::conv2d_bwd_input(&dy, &wt, x.shape(), p).unwrap()), 1e-5);
        let mut dw = vec![0f32; co * k];
        for s in 0..bn {
            let part = matmul(&dys[s * co * hw..(s + 1) * co * hw], false, &cols[s * k * hw..(s + 1) * k * hw], true, co, k, hw);
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        close(&format!("{what} dw"), &dw, &v(&backend::conv2d_bwd_weight(&x, &dy, wt.shape(), p).unwrap()), 1e-5);
    }
}

#[test]
fn spectral_norm_layerscale_and_optimiser_kernels_match_the_cpu() {
    let Some(lib) = kernels("model kernels") else { return };
    // The spectral mode multiply and its two backward products (grid-stride).
    let (b, ci, co, h, w) = (3usize, 5usize, 7usize, 9usize, 10usize);
    let wh = w / 2 + 1;
    let modes = SpectralModes::new(4, ModeConvention::Corners);
    let rows: Vec<i32> = modes.kept_rows(h).into_iter().map(|r| r as i32).collect();
    let my = modes.kept_cols(w);
    let (xh, dyh) = (randn(&[b, ci, h, wh, 2], 1), randn(&[b, co, h, wh, 2], 2));
    let wt = randn(modes.weight_shape(ci, co, h, w).dims(), 3);
    type Mix = unsafe extern "C" fn(*const f32, *const f32, *const i32, *mut f32, i32, i32, i32, i32, i32, i32, i32);
    let dims = |f: Mix, a: &Tensor, bb: &Tensor, out: &mut Vec<f32>| {
        once(lib, || unsafe { f(v(a).as_ptr(), v(bb).as_ptr(), rows.as_ptr(), out.as_mut_ptr(), b as i32, ci as i32, co as i32, h as i32, wh as i32, rows.len() as i32, my as i32) })
    };
    let mut y = vec![0f32; b * co * h * wh * 2];
    dims(kernel!(lib, "spectral_mix_fwd_f32", fn(*const f32, *const f32, *const i32, *mut f32, i32, i32, i32, i32, i32, i32, i32)), &xh, &wt, &mut y);
    close("spectral mix", &y, &v(&backend::spectral_mix(&xh, &wt, modes).unwrap()), 1e-5);
    let mut dx = vec![0f32; xh.numel()];
    dims(kernel!(lib, "spectral_mix_bwd_input_f32", fn(*const f32, *const f32, *const i32, *mut f32, i32, i32, i32, i32, i32, i32, i32)), &dyh, &wt, &mut dx);
    close("spectral dx", &dx, &v(&backend::spectral_mix_bwd_input(&dyh, &wt, modes).unwrap()), 1e-5);
    let mut dw = vec![0f32; wt.numel()];
    dims(kernel!(lib, "spectral_mix_bwd_weight_f32", fn(*const f32, *const f32, *const i32, *mut f32, i32, i32, i32, i32, i32, i32, i32)), &xh, &dyh, &mut dw);
    close("spectral dw", &dw, &v(&backend::spectral_mix_bwd_weight(&xh, &dyh, wt.shape(), modes).unwrap()), 1e-5);

    // The three norms, forward, backward and the affine gradients (one block per group/channel).
    let (bn, c, s) = (3usize, 5usize, 21usize);
    let x = randn(&[bn, c, s], 4);
    let dy = randn(&[bn, c, s], 5);
    let (gamma, beta) = (randn(&[c], 6), randn(&[c], 7));
    let fwd = kernel!(lib, "norm_fwd_f32", fn(*const f32, *const f32, *const f32, *mut f32, *mut f32, *mut f32, i32, i32, i32, i32, f32));
    let bwd = kernel!(lib, "norm_bwd_f32", fn(*const f32, *const f32, *const f32, *const f32, *const f32, *mut f32, i32, i32, i32, i32));
    let affine = kernel!(lib, "norm_affine_bwd_f32", fn(*const f32, *const f32, *const f32, *const f32, *mut f32, *mut f32, i32, i32, i32, i32));
    for (code, kind) in [NormKind::LayerNorm, NormKind::RmsNorm, NormKind::InstanceNorm].into_iter().enumerate() {
        let groups = if kind.over_channels() { bn * s } else { bn * c };
        let want = backend::norm(kind, &x, Some(&gamma), Some(&beta), 1e-5).unwrap();
        let (xs, dys, gs, bs) = (v(&x), v(&dy), v(&gamma), v(&beta));
        let (mut yv, mut mean, mut rstd) = (vec![0f32; x.numel()], vec![0f32; groups], vec![0f32; groups]);
        let dims = (code as i32, bn as i32, c as i32, s as i32);
        blocks(lib, groups, || unsafe { fwd(xs.as_ptr(), gs.as_ptr(), bs.as_ptr(), yv.as_mut_ptr(), mean.as_mut_ptr(), rstd.as_mut_ptr(), dims.0, dims.1, dims.2, dims.3, 1e-5) });
        close(&format!("{kind:?} y"), &yv, &v(&want.y), 1e-5);
        close(&format!("{kind:?} mean"), &mean, &v(&want.mean), 1e-5);
        close(&format!("{kind:?} rstd"), &rstd, &v(&want.rstd), 1e-5);
        let (wdx, wdg, wdb) = backend::norm_bwd(kind, &x, &dy, Some(&gamma), &want.mean, &want.rstd, true, true).unwrap();
        let (mut dxv, mut dg, mut db) = (vec![0f32; x.numel()], vec![0f32; c], vec![0f32; c]);
        blocks(lib, groups, || unsafe { bwd(xs.as_ptr(), dys.as_ptr(), gs.as_ptr(), mean.as_ptr(), rstd.as_ptr(), dxv.as_mut_ptr(), dims.0, dims.1, dims.2, dims.3) });
        blocks(lib, c, || unsafe { affine(xs.as_ptr(), dys.as_ptr(), mean.as_ptr(), rstd.as_ptr(), dg.as_mut_ptr(), db.as_mut_ptr(), dims.0, dims.1, dims.2, dims.3) });
        close(&format!("{kind:?} dx"), &dxv, &v(&wdx), 1e-4);
        close(&format!("{kind:?} dgamma"), &dg, &v(&wdg.unwrap()), 1e-4);
        close(&format!("{kind:?} dbeta"), &db, &v(&wdb.unwrap()), 1e-4);
    }

    // LayerScale: y = x + l br; dbr = l dy; dl = sum dy br (per-plane partials, then summed).
    let (br, l) = (randn(&[bn, c, s], 8), randn(&[c], 9));
    let ls_fwd = kernel!(lib, "layerscale_fwd_f32", fn(*const f32, *const f32, *const f32, *mut f32, i32, i32, i32));
    let ls_bwd = kernel!(lib, "layerscale_bwd_f32", fn(*const f32, *const f32, *const f32, *mut f32, *mut f32, i32, i32, i32));
    let sum = kernel!(lib, "channel_sum_partials_f32", fn(*const f32, *mut f32, i32, i32));
    let (mut yl, mut dbr, mut partial, mut dl) = (vec![0f32; x.numel()], vec![0f32; x.numel()], vec![0f32; bn * c], vec![0f32; c]);
    let (xs, brs, ls, dys) = (v(&x), v(&br), v(&l), v(&dy));
    once(lib, || unsafe { ls_fwd(xs.as_ptr(), brs.as_ptr(), ls.as_ptr(), yl.as_mut_ptr(), bn as i32, c as i32, s as i32) });
    blocks(lib, bn * c, || unsafe { ls_bwd(dys.as_ptr(), brs.as_ptr(), ls.as_ptr(), dbr.as_mut_ptr(), partial.as_mut_ptr(), bn as i32, c as i32, s as i32) });
    once(lib, || unsafe { sum(partial.as_ptr(), dl.as_mut_ptr(), bn as i32, c as i32) });
    close("layerscale y", &yl, &v(&backend::layerscale(&x, &br, &l).unwrap()), 1e-6);
    close("layerscale dbr", &dbr, &v(&backend::channel_scale(&dy, &l).unwrap()), 1e-6);
    close("layerscale dl", &dl, &v(&backend::channel_dot(&dy, Some(&br)).unwrap()), 1e-5);

    // Unit norms and scaling along axis 1 of a [3, 5, 21] tensor.
    let sumsq = kernel!(lib, "unit_sumsq_f32", fn(*const f32, *mut f32, i32, i32, i32));
    let scale_units = kernel!(lib, "scale_units_f32", fn(*mut f32, *const f32, i32, i32, i32));
    let mut norms = vec![0f32; c];
    blocks(lib, c, || unsafe { sumsq(xs.as_ptr(), norms.as_mut_ptr(), bn as i32, c as i32, s as i32) });
    close("unit_sumsq", &norms, &v(&backend::unit_sumsq(&x, 1).unwrap()), 1e-5);
    let mut scaled = xs.clone();
    once(lib, || unsafe { scale_units(scaled.as_mut_ptr(), ls.as_ptr(), bn as i32, c as i32, s as i32) });
    close("scale_units", &scaled, &v(&backend::channel_scale(&x, &l).unwrap()), 1e-6);

    // SGD with and without momentum.
    let sgd = kernel!(lib, "sgd_step_f32", fn(*mut f32, *const f32, *mut f32, i64, f32, f32, f32, f32, i32, i32));
    let g = randn(&[bn, c, s], 10);
    for (momentum, nesterov, first) in [(0.0, false, false), (0.9, false, true), (0.9, true, false)] {
        let h = SgdStep { lr: 1e-2, momentum, nesterov, weight_decay: 0.01, first, grad_scale: 2.0 };
        let (mut p, mut buf) = (x.clone(), dy.clone());
        backend::sgd_step(&mut p, &g, (momentum > 0.0).then_some(&mut buf), &h).unwrap();
        let (mut pv, mut bv) = (xs.clone(), dys.clone());
        let bp = if momentum > 0.0 { bv.as_mut_ptr() } else { std::ptr::null_mut() };
        once(lib, || unsafe { sgd(pv.as_mut_ptr(), v(&g).as_ptr(), bp, pv.len() as i64, 1e-2, momentum as f32, 0.01, 2.0, nesterov as i32, first as i32) });
        close("sgd p", &pv, &v(&p), 1e-6);
        if momentum > 0.0 {
            close("sgd buf", &bv, &v(&buf), 1e-6);
        }
    }
}
