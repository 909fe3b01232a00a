//! The trainer's own step, `Trainer::step` (input check, forward, physics loss, spike guard,
//! backward, clipping, Adam, with the rollback snapshot held), timed in its steady state
//! (`plan::SteadyState`: after warm-up updates, as `fnokern plan` measures it):
//!
//! - `train_step_cpu_preset`: the `cpu` preset's generator (depth 8, N 32, width 8,
//!   max_channels 64, batch 16) on the CPU: the cost of activation checkpointing (none vs
//!   every_level) and of emulated low precision (bf16/fp16 rounding on top of fp32);
//! - `train_step_cpu_study`: the `study` preset's depth-8 generator on the CPU (fp32), the
//!   model of the side-by-side comparison with PyTorch (benches/torch/);
//! - `train_step_gpu_study`: DESIGN's GPU target, the `study` preset's generator at depth 8
//!   (N 64, width 32, modes 12, batch 16) on GPU 0, each iteration synchronised; skipped without
//!   a usable GPU.
//!
//! Throughput is in patterns per second.

use criterion::{criterion_group, Criterion, Throughput};
use fnokern::config::{presets, CheckpointPolicy};
use fnokern::plan::SteadyState;
use fnokern::Device;
use fnokern::Precision;

fn step(c: &mut Criterion) {
    let mut g = c.benchmark_group("train_step_cpu_preset");
    g.sample_size(10);
    for (policy, precision) in [
        (CheckpointPolicy::None, Precision::Fp32),
        (CheckpointPolicy::EveryLevel, Precision::Fp32),
        (CheckpointPolicy::None, Precision::Bf16),
        (CheckpointPolicy::None, Precision::Fp16),
    ] {
        let mut cfg = presets::get("cpu").expect("the cpu preset exists");
        cfg.model.checkpoint = policy;
        cfg.train.precision = precision;
        g.throughput(Throughput::Elements(cfg.train.batch_size as u64));
        let mut s = SteadyState::new(&cfg, &Device::cpu()).expect("the step builds");
        g.bench_function(format!("{precision}/checkpoint_{policy}"), |b| b.iter(|| s.trainer.step(s.batch.clone(), true).expect("the step runs")));
    }
    g.finish();
}

/// The `study` preset's depth-8 generator (96.1 M parameters, N 64, batch 16) on the CPU, fp32:
/// the model of the PyTorch comparison in benches/torch/.
fn step_study_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("train_step_cpu_study");
    g.sample_size(10);
    let mut cfg = presets::get("study").expect("the study preset exists");
    cfg.model.depth = 8;
    g.throughput(Throughput::Elements(cfg.train.batch_size as u64));
    let mut s = SteadyState::new(&cfg, &Device::cpu()).expect("the step builds");
    g.bench_function("fp32/checkpoint_none", |b| b.iter(|| s.trainer.step(s.batch.clone(), true).expect("the step runs")));
    g.finish();
}

fn step_gpu(c: &mut Criterion) {
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("train_step_gpu_study: skipped: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("train_step_gpu_study");
    g.sample_size(10);
    for (policy, precision) in
        [(CheckpointPolicy::None, Precision::Fp32), (CheckpointPolicy::EveryLevel, Precision::Fp32), (CheckpointPolicy::None, Precision::Bf16)]
    {
        let mut cfg = presets::get("study").expect("the study preset exists");
        cfg.model.depth = 8;
        cfg.model.checkpoint = policy;
        cfg.train.precision = precision;
        g.throughput(Throughput::Elements(cfg.train.batch_size as u64));
        let mut s = SteadyState::new(&cfg, &dev).expect("the step builds");
        g.bench_function(format!("{precision}/checkpoint_{policy}"), |b| {
            b.iter(|| {
                s.trainer.step(s.batch.clone(), true).expect("the step runs");
                dev.synchronize().expect("the GPU finishes the step")
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // No plots: criterion's plotting needs system fonts that a CI or GPU host may lack.
    config = Criterion::default().without_plots();
    targets = step, step_study_cpu, step_gpu
}
// The main thread is worker 0 of rayon's pool, as in `fnokern` (main.rs): a parallel op called
// from outside the pool waits for the pool to pick its work up, a cost training does not pay.
fn main() {
    rayon::ThreadPoolBuilder::new().use_current_thread().build_global().expect("the thread pool starts");
    benches();
    Criterion::default().configure_from_args().final_summary();
}
