//! CPU benchmarks of conv2d, the spectral convolution, its mode mix and GELU at generator-like sizes.
//!
//! Throughput is in FLOPs (Elements = floating-point operations), so criterion reports FLOP/s:
//!   conv2d forward: 2 B C_out H_o W_o C_in kh kw
//!   spectral conv forward: rfft2 + irfft2 (5 N log2 N each for N = H W real points, counted as a
//!   complex FFT of N/2 points per plane: 2.5 N log2 N) per input/output plane, plus the mix
//!   8 B C_in C_out R M_y (one complex multiply-add = 8 real FLOPs).
//! Run: cargo bench --bench cpu_ops

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use fnokern::backend::{self, Conv2dParams};
use fnokern::{DType, Device, ModeConvention, SpectralModes, Tensor};

fn conv2d(c: &mut Criterion) {
    let dev = Device::cpu();
    let mut g = c.benchmark_group("conv2d_3x3_f32");
    for &(b, ch, n) in &[(4, 32, 64), (16, 32, 64), (16, 128, 16), (16, 256, 8), (16, 512, 4), (16, 64, 4), (16, 32, 8), (16, 8, 32)] {
        let x = Tensor::randn([b, ch, n, n], 1.0, 1, DType::F32, &dev).unwrap();
        let w = Tensor::randn([ch, ch, 3, 3], 0.1, 2, DType::F32, &dev).unwrap();
        let bias = Tensor::randn([ch], 0.1, 3, DType::F32, &dev).unwrap();
        let p = Conv2dParams::new(1, 1);
        let flops = 2 * b * ch * n * n * ch * 9;
        g.throughput(Throughput::Elements(flops as u64));
        let id = format!("b{b}_c{ch}_n{n}");
        g.bench_with_input(BenchmarkId::new("fwd", &id), &(), |bch, _| bch.iter(|| backend::conv2d(&x, &w, Some(&bias), p).unwrap()));
        let dy = Tensor::randn([b, ch, n, n], 1.0, 4, DType::F32, &dev).unwrap();
        g.bench_with_input(BenchmarkId::new("bwd_input", &id), &(), |bch, _| bch.iter(|| backend::conv2d_bwd_input(&dy, &w, x.shape(), p).unwrap()));
        g.bench_with_input(BenchmarkId::new("bwd_weight", &id), &(), |bch, _| bch.iter(|| backend::conv2d_bwd_weight(&x, &dy, w.shape(), p).unwrap()));
    }
    g.finish();
}

fn spectral(c: &mut Criterion) {
    let dev = Device::cpu();
    let mut g = c.benchmark_group("spectral_conv_f32");
    for &(b, ch, n, m) in &[(4, 32, 64, 12), (16, 32, 64, 12), (16, 128, 16, 12), (16, 512, 4, 6)] {
        let modes = SpectralModes::new(m, ModeConvention::Corners);
        let x = Tensor::randn([b, ch, n, n], 1.0, 1, DType::F32, &dev).unwrap();
        let ws = modes.weight_shape(ch, ch, n, n);
        let (r, my) = (ws.dims()[2], ws.dims()[3]);
        let w = Tensor::randn(ws, 0.1, 2, DType::F32, &dev).unwrap();
        let npx = (n * n) as f64;
        let fft = 2.0 * (b * ch) as f64 * 2.5 * npx * npx.log2();
        let mix = 8.0 * (b * ch * ch * r * my) as f64;
        g.throughput(Throughput::Elements((fft + mix) as u64));
        g.bench_with_input(BenchmarkId::new("fwd", format!("b{b}_c{ch}_n{n}_m{m}")), &(), |bch, _| {
            bch.iter(|| {
                let xh = backend::rfft2(&x).unwrap();
                let yh = backend::spectral_mix(&xh, &w, modes).unwrap();
                backend::irfft2(&yh, n).unwrap()
            })
        });
    }
    g.finish();
}

/// The mode mix alone (forward and both gradients) on the study model's spectra: its 4 x 4 levels
/// (512 channels, 12 modes clamped to 4 x 3) and its top level (32 channels, 24 x 12 modes).
fn spectral_mix(c: &mut Criterion) {
    let dev = Device::cpu();
    let mut g = c.benchmark_group("spectral_mix_f32");
    for &(b, ch, n, m) in &[(16, 512, 4, 12), (16, 128, 16, 12), (16, 32, 64, 12)] {
        let modes = SpectralModes::new(m, ModeConvention::Corners);
        let x = Tensor::randn([b, ch, n, n], 1.0, 1, DType::F32, &dev).unwrap();
        let xh = backend::rfft2(&x).unwrap();
        let dyh = backend::rfft2(&Tensor::randn([b, ch, n, n], 1.0, 3, DType::F32, &dev).unwrap()).unwrap();
        let ws = modes.weight_shape(ch, ch, n, n);
        let (r, my) = (ws.dims()[2], ws.dims()[3]);
        let w = Tensor::randn(ws.clone(), 0.1, 2, DType::F32, &dev).unwrap();
        g.throughput(Throughput::Elements(8 * (b * ch * ch * r * my) as u64));
        let id = format!("b{b}_c{ch}_n{n}_m{m}");
        g.bench_with_input(BenchmarkId::new("fwd", &id), &(), |bch, _| bch.iter(|| backend::spectral_mix(&xh, &w, modes).unwrap()));
        g.bench_with_input(BenchmarkId::new("bwd_input", &id), &(), |bch, _| bch.iter(|| backend::spectral_mix_bwd_input(&dyh, &w, modes).unwrap()));
        g.bench_with_input(BenchmarkId::new("bwd_weight", &id), &(), |bch, _| bch.iter(|| backend::spectral_mix_bwd_weight(&xh, &dyh, &ws, modes).unwrap()));
    }
    g.finish();
}

/// The machine's fp32 GEMM rate, the yardstick for the ops above: the `gemm` crate (the CPU
/// backend's GEMM, on the calling thread) on a 1024^3 product, on one thread, and on two as two
/// halves of C's columns side by side (how the backend splits its products).
fn gemm_peak(c: &mut Criterion) {
    let n = 1024;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut out = vec![0f32; n * n];
    // C[:, j0..j0 + w] = A B[:, j0..j0 + w], all row-major with row stride n; C is passed as an
    // address so that two calls can write disjoint column ranges of it at once.
    let product = |j0: usize, w: usize, c: usize| {
        assert!(j0 + w <= n);
        // SAFETY: a and b hold n x n values, and so does C (`out`, alive across every call);
        // columns j0..j0 + w of its n rows are inside it and written by this call alone.
        unsafe {
            gemm::gemm(
                n,
                w,
                n,
                (c as *mut f32).add(j0),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr().add(j0),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    let c_at = out.as_mut_ptr() as usize;
    let mut g = c.benchmark_group("gemm_f32");
    g.throughput(Throughput::Elements(2 * (n * n * n) as u64));
    g.bench_function(BenchmarkId::new("1_thread", format!("{n}x{n}x{n}")), |bch| bch.iter(|| product(0, n, c_at)));
    g.bench_function(BenchmarkId::new("2_threads", format!("{n}x{n}x{n}")), |bch| {
        bch.iter(|| rayon::join(|| product(0, n / 2, c_at), || product(n / 2, n / 2, c_at)))
    });
    g.finish();
}

fn gelu(c: &mut Criterion) {
    let dev = Device::cpu();
    let mut g = c.benchmark_group("gelu");
    for dtype in [DType::F32, DType::F64] {
        // One activation of the study model's top level: batch 16, 32 channels, 64 x 64.
        let x = Tensor::randn([16, 32, 64, 64], 1.0, 1, dtype, &dev).unwrap();
        let dy = Tensor::randn([16, 32, 64, 64], 1.0, 2, dtype, &dev).unwrap();
        g.throughput(Throughput::Elements(x.numel() as u64));
        let id = format!("{dtype:?}_b16_c32_n64");
        g.bench_with_input(BenchmarkId::new("fwd", &id), &(), |bch, _| bch.iter(|| backend::unary(backend::Unary::Gelu, &x).unwrap()));
        g.bench_with_input(BenchmarkId::new("bwd", &id), &(), |bch, _| bch.iter(|| backend::unary_bwd(backend::Unary::Gelu, &x, &dy).unwrap()));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // No plots: criterion's plotting needs system fonts that a CI or GPU host may lack.
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(3)).without_plots();
    targets = conv2d, spectral, spectral_mix, gemm_peak, gelu
}
// The main thread is worker 0 of rayon's pool, as in `fnokern` (main.rs): a parallel op called
// from outside the pool waits for the pool to pick its work up, a cost training does not pay.
fn main() {
    rayon::ThreadPoolBuilder::new().use_current_thread().build_global().expect("the thread pool starts");
    benches();
    Criterion::default().configure_from_args().final_summary();
}
