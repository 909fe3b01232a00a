//! The CUDA kernels' index arithmetic and formulas, checked on machines without a GPU: the host's
//! C++ compiler builds kernels/*.cu as plain functions, tests/host/fno_host_shim.h stands in for
//! CUDA (a host thread per GPU thread, blocks of the launchers' 256 threads, barriers and warp
//! shuffles emulated, warps taking turns between barriers so that a missing one shows every time),
//! and each kernel runs on host buffers and is compared with the CPU backend, the specification.
//! What this cannot check: the launchers' argument order and their launch geometry, the GPU's own
//! arithmetic (FMA contraction, fast math functions), cuBLAS and cuFFT; tests/cuda*.rs check
//! those on a GPU.
//!
//! Without a C++ compiler (`CXX`, else `c++`) each test prints that it skipped and passes.

use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::OnceLock;

use fnokern::backend::cuda::BLOCK;
use fnokern::backend::{self, AdamStep, Binary, NormKind, Reduce, SgdStep, Unary};
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
            .args(["-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "-I"])
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
    ($lib:expr, $name:literal, fn($($t:ty),* $(,)?)) => {{
        // SAFETY: the type spelled here is the kernel's C signature in kernels/*.cu.
        let f: libloading::Symbol<unsafe extern "C" fn($($t),*)> = unsafe { $lib.get(concat!($name, "\0").as_bytes()) }.expect($name);
        *f
    }};
}

/// A kernel's function pointer, called with its arguments as a tuple.
trait Kernel<Args: Copy>: Copy {
    /// # Safety
    /// The arguments are what the kernel's C signature and its buffers' sizes require.
    unsafe fn call(self, args: Args);
}

macro_rules! kernel_arity {
    ($($t:ident $a:ident),*) => {
        impl<$($t: Copy),*> Kernel<($($t,)*)> for unsafe extern "C" fn($($t),*) {
            unsafe fn call(self, ($($a,)*): ($($t,)*)) {
                // SAFETY: the caller's contract.
                unsafe { self($($a),*) }
            }
        }
    };
}
kernel_arity!(A a, B b, C c);
kernel_arity!(A a, B b, C c, D d);
kernel_arity!(A a, B b, C c, D d, E e);
kernel_arity!(A a, B b, C c, D d, E e, F f);
kernel_arity!(A a, B b, C c, D d, E e, F f, G g);
kernel_arity!(A a, B b, C c, D d, E e, F f, G g, H h);
kernel_arity!(A a, B b, C c, D d, E e, F f, G g, H h, I i);
kernel_arity!(A a, B b, C c, D d, E e, F f, G g, H h, I i, J j);
kernel_arity!(A a, B b, C c, D d, E e, F f, G g, H h, I i, J j, K k);
kernel_arity!(A a, B b, C c, D d, E e, F f, G g, H h, I i, J j, K k, L l);
kernel_arity!(A a, B b, C c, D d, E e, F f, G g, H h, I i, J j, K k, L l, M m);
kernel_arity!(A a, B b, C c, D d, E e, F f, G g, H h, I i, J j, K k, L l, M m, N n);

/// Launches `kernel(args)` as `grid` blocks of the launchers' [`BLOCK`] threads, every emulated GPU
/// thread a host thread (tests/host/fno_host_shim.h). The arguments are evaluated once, by the
/// caller, as on a GPU; buffers they point into must outlive the call, which returns when every
/// thread has.
///
/// # Safety
/// `args` are what the kernel's C signature and its buffers' sizes require.
unsafe fn blocks<A: Copy, K: Kernel<A>>(lib: &Library, grid: usize, kernel: K, args: A) {
    extern "C" fn thread<A: Copy, K: Kernel<A>>(ctx: *const c_void) {
        // SAFETY: ctx is the (kernel, args) pair below, alive until the launch returns; the
        // threads only copy it.
        let (kernel, args) = unsafe { *(ctx as *const (K, A)) };
        // SAFETY: the contract of `blocks`. Whatever the threads then write is the kernel's
        // business, as on a GPU: a race there is a bug these tests are meant to find.
        unsafe { kernel.call(args) }
    }
    let launch = kernel!(lib, "fno_host_launch", fn(u32, u32, extern "C" fn(*const c_void), *const c_void));
    let ctx = (kernel, args);
    // SAFETY: the shim runs `thread` on its own threads and joins them all before returning.
    unsafe { launch(u32::try_from(grid).expect("grid"), BLOCK, thread::<A, K>, &ctx as *const (K, A) as *const c_void) };
}

/// A one-block launch (the grid-stride kernels' threads cover any length).
unsafe fn once<A: Copy, K: Kernel<A>>(lib: &Library, kernel: K, args: A) {
    // SAFETY: the caller's contract.
    unsafe { blocks(lib, 1, kernel, args) }
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
        unsafe { once(lib, unary, (xs.as_ptr(), y.as_mut_ptr(), n as i64, code as i32)) };
        unsafe { once(lib, unary_bwd, (xs.as_ptr(), v(&dy).as_ptr(), dx.as_mut_ptr(), n as i64, code as i32)) };
        close(&format!("{op:?}"), &y, &v(&backend::unary(op, input).unwrap()), 1e-6);
        close(&format!("{op:?}'"), &dx, &v(&backend::unary_bwd(op, input, &dy).unwrap()), 1e-6);
    }
    let binary = kernel!(lib, "binary_f32", fn(*const f32, *const f32, *mut f32, i64, i32));
    for (code, op) in [Binary::Add, Binary::Sub, Binary::Mul].into_iter().enumerate() {
        let mut y = vec![0f32; n];
        unsafe { once(lib, binary, (v(&x).as_ptr(), v(&b).as_ptr(), y.as_mut_ptr(), n as i64, code as i32)) };
        close(&format!("{op:?}"), &y, &v(&backend::binary(op, &x, &b).unwrap()), 1e-6);
    }
    let s = [1.75f32];
    let scale_by = kernel!(lib, "scale_by_f32", fn(*const f32, *const f32, *mut f32, i64, i32));
    for divide in [false, true] {
        let mut y = vec![0f32; n];
        unsafe { once(lib, scale_by, (v(&x).as_ptr(), s.as_ptr(), y.as_mut_ptr(), n as i64, divide as i32)) };
        let st = Tensor::full(1.75, [1], DType::F32, cpu()).unwrap();
        close("scale_by", &y, &v(&backend::scale_by(&x, &st, divide).unwrap()), 1e-6);
    }
    let (mut acc, mut c) = (v(&x), v(&x));
    let add_assign = kernel!(lib, "add_assign_f32", fn(*mut f32, *const f32, i64));
    let clamp = kernel!(lib, "clamp_f32", fn(*mut f32, i64, f32));
    unsafe { once(lib, add_assign, (acc.as_mut_ptr(), v(&b).as_ptr(), n as i64)) };
    unsafe { once(lib, clamp, (c.as_mut_ptr(), n as i64, 0.5)) };
    close("add_assign", &acc, &v(&backend::binary(Binary::Add, &x, &b).unwrap()), 1e-6);
    let mut want = x.clone();
    backend::clamp(&mut want, 0.5).unwrap();
    close("clamp", &c, &v(&want), 0.0);

    // The dedicated GELU, add, affine, scale and fill kernels.
    let (xs, dys, bs) = (v(&x), v(&dy), v(&b));
    let gelu = kernel!(lib, "gelu_fwd_f32", fn(*const f32, *mut f32, i64));
    let gelu_bwd = kernel!(lib, "gelu_bwd_f32", fn(*const f32, *const f32, *mut f32, i64));
    let (mut y, mut dx) = (vec![0f32; n], vec![0f32; n]);
    unsafe { once(lib, gelu, (xs.as_ptr(), y.as_mut_ptr(), n as i64)) };
    unsafe { once(lib, gelu_bwd, (xs.as_ptr(), dys.as_ptr(), dx.as_mut_ptr(), n as i64)) };
    close("gelu", &y, &v(&backend::unary(Unary::Gelu, &x).unwrap()), 1e-6);
    close("gelu'", &dx, &v(&backend::unary_bwd(Unary::Gelu, &x, &dy).unwrap()), 1e-6);
    let add = kernel!(lib, "add_f32", fn(*const f32, *const f32, *mut f32, i64));
    unsafe { once(lib, add, (xs.as_ptr(), bs.as_ptr(), y.as_mut_ptr(), n as i64)) };
    close("add", &y, &v(&backend::binary(Binary::Add, &x, &b).unwrap()), 0.0);
    let affine = kernel!(lib, "affine_f32", fn(*const f32, *mut f32, i64, f32, f32));
    unsafe { once(lib, affine, (xs.as_ptr(), y.as_mut_ptr(), n as i64, -0.75, 0.25)) };
    close("affine", &y, &v(&backend::affine(&x, -0.75, 0.25).unwrap()), 1e-6);
    let scale_inplace = kernel!(lib, "scale_inplace_f32", fn(*mut f32, i64, f32));
    let mut scaled = xs.clone();
    unsafe { once(lib, scale_inplace, (scaled.as_mut_ptr(), n as i64, 3.0)) };
    close("scale_inplace", &scaled, &xs.iter().map(|a| a * 3.0).collect::<Vec<_>>(), 0.0);
    let fill = kernel!(lib, "fill_scalar_f32", fn(*const f32, *mut f32, i64));
    unsafe { once(lib, fill, (s.as_ptr(), y.as_mut_ptr(), n as i64)) };
    close("fill_scalar", &y, &vec![1.75; n], 0.0);
}

#[test]
fn rounding_and_cast_kernels_match_the_half_crate() {
    let Some(lib) = kernels("rounding") else { return };
    // Normal numbers, f16 subnormals and overflow, ties and NaN.
    let mut xs = v(&randn(&[1000], 7)).into_iter().map(|a| a * 100.0).collect::<Vec<f32>>();
    xs.extend([0.0, -0.0, 1e-6, -3e-8, 65504.0, 65520.0, 1e6, f32::INFINITY, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0, f32::NAN]);
    let n = xs.len();
    let f16s: Vec<half::f16> = xs.iter().map(|&a| half::f16::from_f32(a)).collect();
    let bf16s: Vec<half::bf16> = xs.iter().map(|&a| half::bf16::from_f32(a)).collect();
    let same = |what: &str, got: &[f32], want: &[f32]| {
        let bad = got.iter().zip(want).filter(|(g, w)| !(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()))).count();
        assert_eq!(bad, 0, "{what}: {bad} of {} differ", got.len());
    };
    let round_f16 = kernel!(lib, "round_f16_f32", fn(*const f32, *mut f32, i64));
    let round_bf16 = kernel!(lib, "round_bf16_f32", fn(*const f32, *mut f32, i64));
    let mut y = vec![0f32; n];
    unsafe { once(lib, round_f16, (xs.as_ptr(), y.as_mut_ptr(), n as i64)) };
    same("round to f16", &y, &f16s.iter().map(|h| h.to_f32()).collect::<Vec<_>>());
    unsafe { once(lib, round_bf16, (xs.as_ptr(), y.as_mut_ptr(), n as i64)) };
    same("round to bf16", &y, &bf16s.iter().map(|h| h.to_f32()).collect::<Vec<_>>());
    // Casts move the 16-bit patterns; NaN payloads aside they are the half crate's.
    let to_f16 = kernel!(lib, "cast_f32_f16", fn(*const f32, *mut u16, i64));
    let from_f16 = kernel!(lib, "cast_f16_f32", fn(*const u16, *mut f32, i64));
    let to_bf16 = kernel!(lib, "cast_f32_bf16", fn(*const f32, *mut u16, i64));
    let from_bf16 = kernel!(lib, "cast_bf16_f32", fn(*const u16, *mut f32, i64));
    let mut bits = vec![0u16; n];
    unsafe { once(lib, to_f16, (xs.as_ptr(), bits.as_mut_ptr(), n as i64)) };
    same("cast to f16", &bits.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect::<Vec<_>>(), &f16s.iter().map(|h| h.to_f32()).collect::<Vec<_>>());
    unsafe { once(lib, from_f16, (bits.as_ptr(), y.as_mut_ptr(), n as i64)) };
    same("cast from f16", &y, &f16s.iter().map(|h| h.to_f32()).collect::<Vec<_>>());
    unsafe { once(lib, to_bf16, (xs.as_ptr(), bits.as_mut_ptr(), n as i64)) };
    same("cast to bf16", &bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect::<Vec<_>>(), &bf16s.iter().map(|h| h.to_f32()).collect::<Vec<_>>());
    unsafe { once(lib, from_bf16, (bits.as_ptr(), y.as_mut_ptr(), n as i64)) };
    same("cast from bf16", &y, &bf16s.iter().map(|h| h.to_f32()).collect::<Vec<_>>());
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
    for (code, want) in [(0, backend::reduce(Reduce::Sum, &x).unwrap()), (1, backend::reduce(Reduce::SumSq, &x).unwrap()), (2, backend::dot(&x, &y).unwrap())] {
        let mut partial = vec![0f32; 256];
        let mut out = [0f32];
        let (xs, ys) = (v(&x), v(&y));
        unsafe { blocks(lib, 256, partial_k, (xs.as_ptr(), ys.as_ptr(), partial.as_mut_ptr(), n as i64, code)) };
        unsafe { once(lib, final_k, (partial.as_ptr(), out.as_mut_ptr(), 256)) };
        close(&format!("reduce op {code}"), &out, &v(&want), 1e-5);
    }
    let bias = kernel!(lib, "channel_bias_f32", fn(*mut f32, *const f32, i64, i32, i64));
    let mut yb = v(&x);
    unsafe { once(lib, bias, (yb.as_mut_ptr(), v(&l).as_ptr(), n as i64, c as i32, s as i64)) };
    let conv_bias =
        backend::conv2d(&x.reshape([bn, c, s, 1]).unwrap(), &Tensor::from_vec(identity(c), [c, c, 1, 1], cpu()).unwrap(), Some(&l), Conv2dParams::new(1, 0))
            .unwrap();
    close("channel_bias", &yb, &v(&conv_bias), 1e-6);
    let scale = kernel!(lib, "channel_scale_f32", fn(*const f32, *const f32, *mut f32, i64, i32, i64));
    let mut ys = vec![0f32; n];
    unsafe { once(lib, scale, (v(&x).as_ptr(), v(&l).as_ptr(), ys.as_mut_ptr(), n as i64, c as i32, s as i64)) };
    close("channel_scale", &ys, &v(&backend::channel_scale(&x, &l).unwrap()), 1e-6);
    let dot = kernel!(lib, "channel_dot_partials_f32", fn(*const f32, *const f32, *mut f32, i32, i64));
    let sum = kernel!(lib, "channel_sum_partials_f32", fn(*const f32, *mut f32, i32, i32));
    for with_b in [true, false] {
        let mut partial = vec![0f32; bn * c];
        let mut out = vec![0f32; c];
        let (xs, yv) = (v(&x), v(&y));
        let bp = if with_b { yv.as_ptr() } else { std::ptr::null() };
        unsafe { blocks(lib, bn * c, dot, (xs.as_ptr(), bp, partial.as_mut_ptr(), (bn * c) as i32, s as i64)) };
        unsafe { once(lib, sum, (partial.as_ptr(), out.as_mut_ptr(), bn as i32, c as i32)) };
        close("channel_dot", &out, &v(&backend::channel_dot(&x, with_b.then_some(&y)).unwrap()), 1e-5);
    }
    // Concat three parts, then slice the middle one back out.
    let copy = kernel!(lib, "copy_channels_f32", fn(*const f32, *mut f32, i32, i32, i32, i64, i32, i32));
    let other = randn(&[bn, 2, s], 4);
    let mut cat = vec![0f32; bn * (c + 2 + c) * s];
    for (part, off) in [(&x, 0), (&other, c), (&y, c + 2)] {
        let pc = part.dims()[1];
        unsafe { once(lib, copy, (v(part).as_ptr(), cat.as_mut_ptr(), bn as i32, pc as i32, (2 * c + 2) as i32, s as i64, off as i32, 0)) };
    }
    let want_cat = backend::concat_channels(&[&x, &other, &y]).unwrap();
    close("concat", &cat, &v(&want_cat), 0.0);
    let mut mid = vec![0f32; bn * 2 * s];
    unsafe { once(lib, copy, (cat.as_ptr(), mid.as_mut_ptr(), bn as i32, (2 * c + 2) as i32, 2, s as i64, c as i32, 1)) };
    close("slice", &mid, &v(&other), 0.0);
    // Pack [B, 2C, S] real/imaginary channels to complex and back.
    let pack = kernel!(lib, "pack_complex_f32", fn(*const f32, *mut f32, i32, i32, i64, i32));
    let chans = randn(&[bn, 6, s], 5);
    let mut z = vec![0f32; chans.numel()];
    unsafe { once(lib, pack, (v(&chans).as_ptr(), z.as_mut_ptr(), bn as i32, 3, s as i64, 0)) };
    close("pack", &z, &v(&backend::channels_to_complex(&chans).unwrap()), 0.0);
    let mut back = vec![0f32; z.len()];
    unsafe { once(lib, pack, (z.as_ptr(), back.as_mut_ptr(), bn as i32, 3, s as i64, 1)) };
    close("unpack", &back, &v(&chans), 0.0);
    // Circular shifts of real and complex maps.
    let roll = kernel!(lib, "roll2d_f32", fn(*const f32, *mut f32, i64, i32, i32, i32, i32, i32));
    for (complex, inner) in [(false, 1usize), (true, 2)] {
        let shape: Vec<usize> = if complex { vec![bn, 2, 9, 7, 2] } else { vec![bn, 2, 9, 7] };
        let t = randn(&shape, 6);
        let mut r = vec![0f32; t.numel()];
        unsafe { once(lib, roll, (v(&t).as_ptr(), r.as_mut_ptr(), (bn * 2) as i64, 9, 7, inner as i32, 4, 5)) };
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
        unsafe { once(lib, mul, (v(&z).as_ptr(), v(&p).as_ptr(), y.as_mut_ptr(), n as i64, 90, conj as i32)) };
        close("complex_mul", &y, &v(&backend::complex_mul(&z, &p, conj).unwrap()), 1e-6);
    }
    let abs = kernel!(lib, "complex_abs_f32", fn(*const f32, *mut f32, i64));
    let angle = kernel!(lib, "complex_angle_f32", fn(*const f32, *mut f32, i64));
    let abs_bwd = kernel!(lib, "complex_abs_bwd_f32", fn(*const f32, *const f32, *mut f32, i64));
    let angle_bwd = kernel!(lib, "complex_angle_bwd_f32", fn(*const f32, *const f32, *mut f32, i64));
    let (zs, dys) = (v(&z), v(&dy));
    let (mut a, mut g, mut da, mut dg) = (vec![0f32; n], vec![0f32; n], vec![0f32; 2 * n], vec![0f32; 2 * n]);
    unsafe {
        once(lib, abs, (zs.as_ptr(), a.as_mut_ptr(), n as i64));
        once(lib, angle, (zs.as_ptr(), g.as_mut_ptr(), n as i64));
        once(lib, abs_bwd, (zs.as_ptr(), dys.as_ptr(), da.as_mut_ptr(), n as i64));
        once(lib, angle_bwd, (zs.as_ptr(), dys.as_ptr(), dg.as_mut_ptr(), n as i64));
    }
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
        unsafe { once(lib, col_scale, (spec.as_mut_ptr(), planes as i64, h as i32, wh as i32, w as i32)) };
        close(&format!("{h}x{w} adjoint of irfft2"), &spec, &v(&backend::irfft2_bwd(&x).unwrap()), 1e-6);
        // The prepared spectrum's DC (and Nyquist) columns are Hermitian along kx, and its exact
        // inverse transform is the CPU's irfft2 (and, with `adjoint`, rfft2's adjoint). The CPU's
        // irfft2 of a spectrum that is already Hermitian there is that exact inverse.
        let zr = randn(&[planes, h, wh, 2], 5);
        let hw = (h * w) as f32;
        for (adjoint, norm) in [(0, 1.0 / hw), (1, 1.0)] {
            let mut out = vec![0f32; zr.numel()];
            unsafe { once(lib, prep, (v(&zr).as_ptr(), out.as_mut_ptr(), planes as i64, h as i32, wh as i32, w as i32, adjoint, norm)) };
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
        let g = ConvGeom {
            c: c as i32,
            h: h as i32,
            w: w as i32,
            kh: kk as i32,
            kw: kk as i32,
            ho: ho as i32,
            wo: wo as i32,
            stride: stride as i32,
            pad: pad as i32,
        };
        let (k, hw) = (c * kk * kk, ho * wo);
        let mut cols = vec![0f32; bn * k * hw];
        unsafe { once(lib, im2col, (v(&x).as_ptr(), cols.as_mut_ptr(), bn as i32, g)) };
        let ws = v(&wt);
        let what = format!("k{kk} s{stride} p{pad}");
        let fwd: Vec<f32> = (0..bn).flat_map(|s| matmul(&ws, false, &cols[s * k * hw..(s + 1) * k * hw], false, co, hw, k)).collect();
        close(&format!("{what} forward"), &fwd, &v(&y), 1e-5);
        let dy = randn(y.dims(), 3);
        let dys = v(&dy);
        let dcols: Vec<f32> = (0..bn).flat_map(|s| matmul(&ws, true, &dys[s * co * hw..(s + 1) * co * hw], false, k, hw, co)).collect();
        let mut dx = vec![0f32; x.numel()];
        unsafe { once(lib, col2im, (dcols.as_ptr(), dx.as_mut_ptr(), bn as i32, g)) };
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
fn spectral_layerscale_and_optimiser_kernels_match_the_cpu() {
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
    let dims = |f: Mix, a: &Tensor, bb: &Tensor, out: &mut Vec<f32>| unsafe {
        once(
            lib,
            f,
            (v(a).as_ptr(), v(bb).as_ptr(), rows.as_ptr(), out.as_mut_ptr(), b as i32, ci as i32, co as i32, h as i32, wh as i32, rows.len() as i32, my as i32),
        )
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

    // LayerScale, unit norms and the optimisers on planes of 300: more than a block, so every
    // thread of every warp takes part in the per-plane and per-unit reductions.
    let (bn, c, s) = (3usize, 5usize, 300usize);
    let x = randn(&[bn, c, s], 4);
    let dy = randn(&[bn, c, s], 5);

    // LayerScale: y = x + l br; dbr = l dy; dl = sum dy br (per-plane partials, then summed).
    let (br, l) = (randn(&[bn, c, s], 8), randn(&[c], 9));
    let ls_fwd = kernel!(lib, "layerscale_fwd_f32", fn(*const f32, *const f32, *const f32, *mut f32, i32, i32, i32));
    let ls_bwd = kernel!(lib, "layerscale_bwd_f32", fn(*const f32, *const f32, *const f32, *mut f32, *mut f32, i32, i32, i32));
    let sum = kernel!(lib, "channel_sum_partials_f32", fn(*const f32, *mut f32, i32, i32));
    let (mut yl, mut dbr, mut partial, mut dl) = (vec![0f32; x.numel()], vec![0f32; x.numel()], vec![0f32; bn * c], vec![0f32; c]);
    let (xs, brs, ls, dys) = (v(&x), v(&br), v(&l), v(&dy));
    unsafe { once(lib, ls_fwd, (xs.as_ptr(), brs.as_ptr(), ls.as_ptr(), yl.as_mut_ptr(), bn as i32, c as i32, s as i32)) };
    unsafe { blocks(lib, bn * c, ls_bwd, (dys.as_ptr(), brs.as_ptr(), ls.as_ptr(), dbr.as_mut_ptr(), partial.as_mut_ptr(), bn as i32, c as i32, s as i32)) };
    unsafe { once(lib, sum, (partial.as_ptr(), dl.as_mut_ptr(), bn as i32, c as i32)) };
    close("layerscale y", &yl, &v(&backend::layerscale(&x, &br, &l).unwrap()), 1e-6);
    close("layerscale dbr", &dbr, &v(&backend::channel_scale(&dy, &l).unwrap()), 1e-6);
    close("layerscale dl", &dl, &v(&backend::channel_dot(&dy, Some(&br)).unwrap()), 1e-5);

    // Unit norms and scaling along axis 1 of a [3, 5, 21] tensor.
    let sumsq = kernel!(lib, "unit_sumsq_f32", fn(*const f32, *mut f32, i32, i32, i32));
    let scale_units = kernel!(lib, "scale_units_f32", fn(*mut f32, *const f32, i32, i32, i32));
    let mut norms = vec![0f32; c];
    unsafe { blocks(lib, c, sumsq, (xs.as_ptr(), norms.as_mut_ptr(), bn as i32, c as i32, s as i32)) };
    close("unit_sumsq", &norms, &v(&backend::unit_sumsq(&x, 1).unwrap()), 1e-5);
    let mut scaled = xs.clone();
    unsafe { once(lib, scale_units, (scaled.as_mut_ptr(), ls.as_ptr(), bn as i32, c as i32, s as i32)) };
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
        unsafe { once(lib, sgd, (pv.as_mut_ptr(), v(&g).as_ptr(), bp, pv.len() as i64, 1e-2, momentum as f32, 0.01, 2.0, nesterov as i32, first as i32)) };
        close("sgd p", &pv, &v(&p), 1e-6);
        if momentum > 0.0 {
            close("sgd buf", &bv, &v(&buf), 1e-6);
        }
    }

    // Adam and AdamW at the first and a later step.
    let adam = kernel!(lib, "adam_step_f32", fn(*mut f32, *const f32, *mut f32, *mut f32, i64, f32, f32, f32, f32, f32, f32, f32, f32, i32));
    let (m0, v0) = (randn(&[bn, c, s], 11), Tensor::rand_uniform([bn, c, s], 0.0, 1.0, 12, DType::F32, cpu()).unwrap());
    for (decoupled, step) in [(false, 1u64), (true, 7)] {
        let h = AdamStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, decoupled, step, grad_scale: 0.5 };
        let (mut p, mut m, mut vv) = (x.clone(), m0.clone(), v0.clone());
        backend::adam_step(&mut p, &g, &mut m, &mut vv, &h).unwrap();
        let (mut pv, mut mv, mut vvv, gs) = (xs.clone(), v(&m0), v(&v0), v(&g));
        let bc = |b: f64| (1.0 - b.powi(step as i32)) as f32;
        let n = pv.len() as i64;
        unsafe { once(lib, adam, (pv.as_mut_ptr(), gs.as_ptr(), mv.as_mut_ptr(), vvv.as_mut_ptr(), n, 1e-3, 0.9, 0.999, 1e-8, 0.05, bc(0.9), bc(0.999), 0.5, decoupled as i32)) };
        close(&format!("adam p (decoupled {decoupled})"), &pv, &v(&p), 1e-6);
        close("adam m", &mv, &v(&m), 1e-6);
        close("adam v", &vvv, &v(&vv), 1e-6);
    }

    // AGC in one launch: per unit of axis 1 (pre 3, post 300) and per tensor (units 1); the
    // second unit's gradient is zero, which must stay zero with factor 1.
    let agc = kernel!(lib, "agc_unit_f32", fn(*const f32, *mut f32, *mut f32, i32, i32, i32, f32, f32));
    let mut gz = v(&g);
    for a in 0..bn {
        gz[(a * c + 1) * s..(a * c + 2) * s].fill(0.0);
    }
    for (pre, units, post) in [(bn, c, s), (1, 1, bn * c * s)] {
        let gt = Tensor::from_vec(gz.clone(), [pre, units, post], cpu()).unwrap();
        let wt = x.reshape([pre, units, post]).unwrap();
        let (wn, gn) = (v(&backend::unit_sumsq(&wt, 1).unwrap()), v(&backend::unit_sumsq(&gt, 1).unwrap()));
        let (lambda, eps) = (0.05f32, 1e-3f32);
        let want_f: Vec<f32> = wn
            .iter()
            .zip(&gn)
            .map(|(w, g)| {
                let (limit, gn) = (lambda * w.sqrt().max(eps), g.sqrt());
                if gn > limit && gn > 0.0 {
                    limit / gn
                } else {
                    1.0
                }
            })
            .collect();
        let want_g: Vec<f32> = gz.iter().enumerate().map(|(i, a)| a * want_f[(i / post) % units]).collect();
        let (mut got_g, mut got_f) = (gz.clone(), vec![0f32; units]);
        unsafe { blocks(lib, units, agc, (xs.as_ptr(), got_g.as_mut_ptr(), got_f.as_mut_ptr(), pre as i32, units as i32, post as i32, lambda, eps)) };
        close(&format!("agc factors ({units} units)"), &got_f, &want_f, 1e-5);
        close(&format!("agc gradient ({units} units)"), &got_g, &want_g, 1e-5);
        assert!(units == 1 || (got_f[1] == 1.0 && want_f.iter().any(|&f| f < 1.0)), "the test must clip some units and leave the zero one alone");
    }
}

/// The three norm kernels of one element type: f32, or f16 / bf16 as their 16-bit patterns.
struct NormKernels<T> {
    fwd: unsafe extern "C" fn(*const T, *const f32, *const f32, *mut T, *mut f32, *mut f32, i32, i32, i32, i32, f32),
    bwd: unsafe extern "C" fn(*const T, *const T, *const f32, *const f32, *const f32, *mut T, i32, i32, i32, i32),
    affine: unsafe extern "C" fn(*const T, *const T, *const f32, *const f32, *mut f32, *mut f32, i32, i32, i32, i32),
}

macro_rules! norm_kernels {
    ($lib:expr, $t:ty, $fwd:literal, $bwd:literal, $affine:literal) => {
        NormKernels::<$t> {
            fwd: kernel!($lib, $fwd, fn(*const $t, *const f32, *const f32, *mut $t, *mut f32, *mut f32, i32, i32, i32, i32, f32)),
            bwd: kernel!($lib, $bwd, fn(*const $t, *const $t, *const f32, *const f32, *const f32, *mut $t, i32, i32, i32, i32)),
            affine: kernel!($lib, $affine, fn(*const $t, *const $t, *const f32, *const f32, *mut f32, *mut f32, i32, i32, i32, i32)),
        }
    };
}

/// One norm kernel family against the CPU's norm of the same (already rounded) inputs: x, dy, y
/// and dx in T, statistics and affine gradients in f32. `tol` is one rounding of T.
fn check_norm<T: Copy>(lib: &Library, k: &NormKernels<T>, enc: fn(f32) -> T, dec: fn(T) -> f32, tol: f32, kind: NormKind, shape: [usize; 3]) {
    let [bn, c, s] = shape;
    let code = [NormKind::LayerNorm, NormKind::RmsNorm, NormKind::InstanceNorm].iter().position(|&k| k == kind).unwrap() as i32;
    let rounded = |t: Tensor| -> (Vec<T>, Tensor) {
        let e: Vec<T> = v(&t).into_iter().map(enc).collect();
        let back = Tensor::from_vec(e.iter().map(|&a| dec(a)).collect(), t.dims().to_vec(), cpu()).unwrap();
        (e, back)
    };
    let ((xe, x), (dye, dy)) = (rounded(randn(&shape, 14)), rounded(randn(&shape, 15)));
    let (gamma, beta) = (randn(&[c], 16), randn(&[c], 17));
    let groups = if kind.over_channels() { bn * s } else { bn * c };
    let what = format!("{kind:?} {} over {:?}", std::any::type_name::<T>(), shape);
    let want = backend::norm(kind, &x, Some(&gamma), Some(&beta), 1e-5).unwrap();
    let (gs, bs) = (v(&gamma), v(&beta));
    let (mut y, mut mean, mut rstd) = (vec![enc(0.0); x.numel()], vec![0f32; groups], vec![0f32; groups]);
    let dims = (code, bn as i32, c as i32, s as i32);
    unsafe {
        blocks(
            lib,
            groups,
            k.fwd,
            (xe.as_ptr(), gs.as_ptr(), bs.as_ptr(), y.as_mut_ptr(), mean.as_mut_ptr(), rstd.as_mut_ptr(), dims.0, dims.1, dims.2, dims.3, 1e-5),
        )
    };
    close(&format!("{what}: y"), &y.iter().map(|&a| dec(a)).collect::<Vec<_>>(), &v(&want.y), tol);
    close(&format!("{what}: mean"), &mean, &v(&want.mean), 1e-5);
    close(&format!("{what}: rstd"), &rstd, &v(&want.rstd), 1e-5);
    let (wdx, wdg, wdb) = backend::norm_bwd(kind, &x, &dy, Some(&gamma), &want.mean, &want.rstd, true, true).unwrap();
    let (mut dx, mut dg, mut db) = (vec![enc(0.0); x.numel()], vec![0f32; c], vec![0f32; c]);
    unsafe {
        blocks(lib, groups, k.bwd, (xe.as_ptr(), dye.as_ptr(), gs.as_ptr(), mean.as_ptr(), rstd.as_ptr(), dx.as_mut_ptr(), dims.0, dims.1, dims.2, dims.3))
    };
    unsafe {
        blocks(lib, c, k.affine, (xe.as_ptr(), dye.as_ptr(), mean.as_ptr(), rstd.as_ptr(), dg.as_mut_ptr(), db.as_mut_ptr(), dims.0, dims.1, dims.2, dims.3))
    };
    // dx's reference comes from f32 statistics that differ from the kernel's in the last bits.
    close(&format!("{what}: dx"), &dx.iter().map(|&a| dec(a)).collect::<Vec<_>>(), &v(&wdx), tol.max(1e-4));
    close(&format!("{what}: dgamma"), &dg, &v(&wdg.unwrap()), 1e-4);
    close(&format!("{what}: dbeta"), &db, &v(&wdb.unwrap()), 1e-4);
}

#[test]
fn norm_kernels_match_the_cpu_in_every_precision() {
    let Some(lib) = kernels("norms") else { return };
    let f32s = norm_kernels!(lib, f32, "norm_fwd_f32", "norm_bwd_f32", "norm_affine_bwd_f32");
    let f16s = norm_kernels!(lib, u16, "norm_fwd_f16", "norm_bwd_f16", "norm_affine_bwd_f16");
    let bf16s = norm_kernels!(lib, u16, "norm_fwd_bf16", "norm_bwd_bf16", "norm_affine_bwd_bf16");
    // Groups of 70 channels (three warps, one partly filled) and of 300 positions (more than a
    // block, so threads loop): every warp of block_sum takes part.
    for (kind, shape) in [(NormKind::LayerNorm, [2, 70, 3]), (NormKind::RmsNorm, [2, 70, 3]), (NormKind::InstanceNorm, [2, 3, 300])] {
        check_norm(lib, &f32s, |a| a, |a| a, 1e-5, kind, shape);
        check_norm(lib, &f16s, |a| half::f16::from_f32(a).to_bits(), |b| half::f16::from_bits(b).to_f32(), 1e-3, kind, shape);
        check_norm(lib, &bf16s, |a| half::bf16::from_f32(a).to_bits(), |b| half::bf16::from_bits(b).to_f32(), 8e-3, kind, shape);
    }
}
