//! CPU benchmarks of conv2d, the spectral convolution and GELU at generator-like sizes.
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
    targets = conv2d, spectral, gelu
}
// The main thread is worker 0 of rayon's pool, as in `fnokern` (main.rs): a parallel op called
// from outside the pool waits for the pool to pick its work up, a cost training does not pay.
fn main() {
    rayon::ThreadPoolBuilder::new().use_current_thread().build_global().expect("the thread pool starts");
    benches();
    Criterion::default().configure_from_args().final_summary();
}
