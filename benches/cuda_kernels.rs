//! The hand-written CUDA kernels at large sizes, with the bytes each one must move (Throughput),
//! beside a device-to-device copy of the same size: the report divides a kernel's GB/s by the
//! copy's to give the fraction of usable DRAM bandwidth. Every iteration synchronises the stream.
//! Without a GPU (or without embedded kernels) it prints why and measures nothing.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fnokern::backend::cuda::spectral::SpectralDims;
use fnokern::backend::cuda::Gpu;
use fnokern::backend::{AdamStep, NormKind, Reduce, Unary};

fn kernels(c: &mut Criterion) {
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cuda_kernels: skipped: {e}");
            return;
        }
    };
    let f4 = 4u64;
    // 16 x 64 channels x 64 x 64: one activation of the depth-8 generator's first level.
    let (b, ch, s) = (16usize, 64usize, 64 * 64usize);
    let n = b * ch * s;
    let x = gpu.upload(&vec![0.5f32; n]).expect("upload");
    let br = gpu.upload(&vec![0.25f32; n]).expect("upload");
    let l = gpu.upload(&vec![0.01f32; ch]).expect("upload");
    let mut y = gpu.zeros::<f32>(n).expect("alloc");
    let mut y2 = gpu.zeros::<f32>(n).expect("alloc");
    let mut dl = gpu.zeros::<f32>(ch).expect("alloc");
    let mut g = c.benchmark_group("cuda");
    let sync = |gpu: &Gpu| gpu.sync().expect("synchronize");

    g.throughput(Throughput::Bytes(2 * f4 * n as u64));
    g.bench_function("copy_dtod (reference)", |bch| {
        bch.iter(|| {
            gpu.stream.memcpy_dtod(&x, &mut y).expect("copy");
            sync(&gpu)
        })
    });
    g.throughput(Throughput::Bytes(3 * f4 * n as u64));
    g.bench_function("layerscale_fwd", |bch| {
        bch.iter(|| {
            gpu.layerscale_fwd(&x, &br, &l, &mut y, (b, ch, s)).expect("launch");
            sync(&gpu)
        })
    });
    g.bench_function("layerscale_bwd", |bch| {
        bch.iter(|| {
            gpu.layerscale_bwd(&x, &br, &l, &mut y, &mut dl, (b, ch, s)).expect("launch");
            sync(&gpu)
        })
    });
    g.throughput(Throughput::Bytes(2 * f4 * n as u64));
    g.bench_function("unary_f32 gelu", |bch| {
        bch.iter(|| {
            gpu.unary(Unary::Gelu, &x, &mut y).expect("launch");
            sync(&gpu)
        })
    });
    g.throughput(Throughput::Bytes(f4 * n as u64));
    g.bench_function("reduce_sumsq", |bch| bch.iter(|| gpu.reduce(Reduce::SumSq, &x).expect("launch")));
    for kind in [NormKind::LayerNorm, NormKind::InstanceNorm] {
        let groups = fnokern::backend::cuda::norm::groups(kind, (b, ch, s));
        let mut mean = gpu.zeros::<f32>(groups).expect("alloc");
        let mut rstd = gpu.zeros::<f32>(groups).expect("alloc");
        // Reads x twice (mean, then variance) and once more to write y.
        g.throughput(Throughput::Bytes(4 * f4 * n as u64));
        g.bench_function(format!("norm_fwd_f32 {kind:?}"), |bch| {
            bch.iter(|| {
                gpu.norm_fwd(kind, &x, None, None, 1e-5, &mut y, &mut mean, &mut rstd, (b, ch, s)).expect("launch");
                sync(&gpu)
            })
        });
        // Reads x and dy twice, writes dx.
        g.throughput(Throughput::Bytes(5 * f4 * n as u64));
        g.bench_function(format!("norm_bwd_f32 {kind:?}"), |bch| {
            bch.iter(|| {
                gpu.norm_bwd(kind, &x, &br, None, &mean, &rstd, &mut y2, None, None, (b, ch, s)).expect("launch");
                sync(&gpu)
            })
        });
        // The 2-byte variants of kernels/dev/norm_lowp.cu beside the f32 kernel: half the bytes.
        let xb = gpu.upload(&vec![half::bf16::from_f32(0.5); n]).expect("upload");
        let mut yb = gpu.zeros::<half::bf16>(n).expect("alloc");
        g.throughput(Throughput::Bytes(4 * 2 * n as u64));
        g.bench_function(format!("norm_fwd_bf16 {kind:?} (dev)"), |bch| {
            bch.iter(|| {
                gpu.norm_fwd(kind, &xb, None, None, 1e-5, &mut yb, &mut mean, &mut rstd, (b, ch, s)).expect("launch");
                sync(&gpu)
            })
        });
    }
    // Adam over 16 M parameters: reads p, g, m, v, writes p, m, v.
    let np = 16 << 20;
    let mut p = gpu.upload(&vec![0.1f32; np]).expect("upload");
    let grad = gpu.upload(&vec![0.01f32; np]).expect("upload");
    let mut m = gpu.zeros::<f32>(np).expect("alloc");
    let mut v = gpu.zeros::<f32>(np).expect("alloc");
    let h = AdamStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false, step: 1, grad_scale: 1.0 };
    g.throughput(Throughput::Bytes(7 * f4 * np as u64));
    g.bench_function("adam_step_f32", |bch| {
        bch.iter(|| {
            gpu.adam_step(&mut p, &grad, &mut m, &mut v, &h).expect("launch");
            sync(&gpu)
        })
    });
    // AGC on a 512 x 512 x 3 x 3 conv weight: reads w and g, writes g (clipped units).
    let (units, post) = (512usize, 512 * 9usize);
    let w = gpu.upload(&vec![0.01f32; units * post]).expect("upload");
    let mut gw = gpu.upload(&vec![1.0f32; units * post]).expect("upload");
    g.throughput(Throughput::Bytes(4 * f4 * (units * post) as u64));
    g.bench_function("agc_unit_f32", |bch| {
        bch.iter(|| {
            gpu.agc_unit(&w, &mut gw, None, (1, units, post), 0.1, 1e-3).expect("launch");
            sync(&gpu)
        })
    });
    // The spectral mix at the first level: 16 x 64 -> 64 channels, 64 x 64 map, 12 modes (corners).
    let d = SpectralDims { b: 16, ci: 64, co: 64, h: 64, wh: 33, my: 12 };
    let rows: Vec<usize> = (0..12).chain(52..64).collect();
    let spec = d.b * d.ci * d.h * d.wh * 2;
    let xs = gpu.upload(&vec![0.1f32; spec]).expect("upload");
    let ws = gpu.upload(&vec![0.1f32; d.ci * d.co * rows.len() * d.my * 2]).expect("upload");
    let mut ys = gpu.zeros::<f32>(d.b * d.co * d.h * d.wh * 2).expect("alloc");
    // Compulsory traffic: the kept modes of x and y (8 bytes each) and the weight, plus the clear of y.
    let kept = (d.b * rows.len() * d.my) as u64;
    g.throughput(Throughput::Bytes(8 * kept * (d.ci + d.co) as u64 + 8 * (d.ci * d.co * rows.len() * d.my) as u64 + 8 * (spec as u64)));
    g.bench_function("spectral_mix_fwd_f32", |bch| {
        bch.iter(|| {
            gpu.spectral_mix_fwd(&xs, &ws, &rows, &mut ys, d).expect("launch");
            sync(&gpu)
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
