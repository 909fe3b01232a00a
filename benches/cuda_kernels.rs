//! The hand-written CUDA kernels at large sizes, through the same dispatch the trainer uses, with
//! the bytes each one must move (Throughput), beside a device-to-device copy of the same size: the
//! report divides a kernel's GB/s by the copy's to give the fraction of usable DRAM bandwidth.
//! Every iteration synchronises the stream. The dispatch allocates each output from the memory
//! pool (a cached block, as in training). The bf16 norm of kernels/dev/ runs beside the f32 one
//! through its own entry. Without a GPU (or without embedded kernels) it prints why and measures
//! nothing.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fnokern::backend::norm::cuda::dev;
use fnokern::backend::norm::NormGeom;
use fnokern::backend::{self, AdamStep, NormKind, Reduce, Unary};
use fnokern::{DType, Device, ModeConvention, SpectralModes, Tensor};

fn kernels(c: &mut Criterion) {
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cuda_kernels: skipped: {e}");
            return;
        }
    };
    let gpu = fnokern::backend::gpu::Gpu::shared(0).expect("the GPU opened above");
    let full = |shape: &[usize], v: f64| Tensor::full(v, shape.to_vec(), DType::F32, &dev).expect("alloc");
    let f4 = 4u64;
    // 16 x 64 channels x 64 x 64: one activation of the depth-8 generator's first level.
    let (b, ch, s) = (16usize, 64usize, 64 * 64usize);
    let n = b * ch * s;
    let shape = [b, ch, 64, 64];
    let (x, br, l) = (full(&shape, 0.5), full(&shape, 0.25), full(&[ch], 0.01));
    let mut g = c.benchmark_group("cuda");
    let sync = || dev.synchronize().expect("synchronize");

    let xs = gpu.upload(&vec![0.5f32; n]).expect("upload");
    let mut ys = gpu.zeros::<f32>(n).expect("alloc");
    g.throughput(Throughput::Bytes(2 * f4 * n as u64));
    g.bench_function("copy_dtod (reference)", |bch| {
        bch.iter(|| {
            gpu.copy_into(&xs, &mut ys).expect("copy");
            sync()
        })
    });
    g.throughput(Throughput::Bytes(3 * f4 * n as u64));
    g.bench_function("layerscale_fwd_f32", |bch| {
        bch.iter(|| {
            backend::layerscale(&x, &br, &l).expect("launch");
            sync()
        })
    });
    g.bench_function("layerscale_bwd_f32", |bch| {
        bch.iter(|| {
            backend::layerscale_bwd(&x, &br, &l).expect("launch");
            sync()
        })
    });
    g.throughput(Throughput::Bytes(2 * f4 * n as u64));
    g.bench_function("unary_f32 gelu", |bch| {
        bch.iter(|| {
            backend::unary(Unary::Gelu, &x).expect("launch");
            sync()
        })
    });
    g.throughput(Throughput::Bytes(f4 * n as u64));
    g.bench_function("reduce sumsq", |bch| bch.iter(|| backend::reduce(Reduce::SumSq, &x).expect("launch").scalar_value().expect("read")));
    for kind in [NormKind::LayerNorm, NormKind::InstanceNorm] {
        // Reads x twice (mean, then variance) and once more to write y.
        g.throughput(Throughput::Bytes(4 * f4 * n as u64));
        g.bench_function(format!("norm_fwd_f32 {kind:?}"), |bch| {
            bch.iter(|| {
                backend::norm(kind, &x, None, None, 1e-5).expect("launch");
                sync()
            })
        });
        let st = backend::norm(kind, &x, None, None, 1e-5).expect("launch");
        // Reads x and dy twice, writes dx.
        g.throughput(Throughput::Bytes(5 * f4 * n as u64));
        g.bench_function(format!("norm_bwd_f32 {kind:?}"), |bch| {
            bch.iter(|| {
                backend::norm_bwd(kind, &x, &br, None, &st.mean, &st.rstd, false, false).expect("launch");
                sync()
            })
        });
        // The 2-byte variant of kernels/dev/norm_lowp.cu beside the f32 kernel: half the bytes.
        let ng = NormGeom::new("bench", kind, (b, ch, s), 1e-5).expect("geometry");
        let xb = gpu.upload(&vec![half::bf16::from_f32(0.5); n]).expect("upload");
        let mut yb = gpu.zeros::<half::bf16>(n).expect("alloc");
        let (mut mean, mut rstd) = (gpu.zeros::<f32>(ng.groups()).expect("alloc"), gpu.zeros::<f32>(ng.groups()).expect("alloc"));
        g.throughput(Throughput::Bytes(4 * 2 * n as u64));
        g.bench_function(format!("norm_fwd_bf16 {kind:?} (dev)"), |bch| {
            bch.iter(|| {
                dev::norm_fwd(&gpu, ng, &xb, None, None, &mut yb, &mut mean, &mut rstd).expect("launch");
                sync()
            })
        });
    }
    // Adam over 16 M parameters: reads p, g, m, v, writes p, m, v.
    let np = 16 << 20;
    let (mut p, grad, mut m, mut v) = (full(&[np], 0.1), full(&[np], 0.01), full(&[np], 0.0), full(&[np], 0.0));
    let h = AdamStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false, step: 1, grad_scale: 1.0 };
    g.throughput(Throughput::Bytes(7 * f4 * np as u64));
    g.bench_function("adam_step_f32", |bch| {
        bch.iter(|| {
            backend::adam_step(&mut [backend::AdamTensors { p: &mut p, g: &grad, m: &mut m, v: &mut v }], &h).expect("launch");
            sync()
        })
    });
    // AGC on a 512 x 512 x 3 x 3 conv weight: reads w and g, writes g (clipped units).
    let (w, mut gw) = (full(&[512, 512, 3, 3], 0.01), full(&[512, 512, 3, 3], 1.0));
    g.throughput(Throughput::Bytes(4 * f4 * (512 * 512 * 9) as u64));
    g.bench_function("agc_unit_f32", |bch| {
        bch.iter(|| {
            backend::agc(&w, &mut gw, Some(0), 0.1, 1e-3).expect("launch");
            sync()
        })
    });
    // The spectral mix at the first level: 16 x 64 -> 64 channels, 64 x 64 map, 12 modes (corners).
    let modes = SpectralModes::new(12, ModeConvention::Corners);
    let wshape = modes.weight_shape(64, 64, 64, 64);
    let (xh, wt) = (full(&[16, 64, 64, 33, 2], 0.1), full(wshape.dims(), 0.1));
    // Compulsory traffic: the kept modes of x and y (8 bytes each) and the weight, plus the clear of y.
    let kept = (16 * 24 * 12) as u64;
    g.throughput(Throughput::Bytes(8 * kept * 128 + 4 * wt.numel() as u64 + 4 * xh.numel() as u64));
    g.bench_function("spectral_mix_fwd_f32", |bch| {
        bch.iter(|| {
            backend::spectral_mix(&xh, &wt, modes).expect("launch");
            sync()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // No plots: criterion's plotting needs system fonts that a CI or GPU host may lack.
    config = Criterion::default().without_plots();
    targets = kernels
}
criterion_main!(benches);
