//! Mixed precision (rounding through bf16/fp16, dynamic loss scaling) and the memory plan
//! (configs/depth8-24gb.toml, the meta plan against the CPU's measured peak).

mod common;
use common::tempdir;
use std::path::Path;

use fnokern::config::{CheckpointPolicy, Config, TrainConfig};
use fnokern::optim::{LossScaler, ScaleEvent};
use fnokern::train::{self, RunOptions, StepOutcome};
use fnokern::Precision;
use fnokern::{ops, plan, DType, Device, Tape, Tensor};

#[test]
fn round_to_rounds_values_and_gradients_like_the_half_types() {
    let dev = Device::cpu();
    // Values chosen around each format's limits: 1 + 2^-11 is a tie in f16 (rounds to even, 1),
    // 65520 is the first value that rounds to inf in f16, 1e-8 underflows to 0 in f16 but not
    // in bf16, and 1.2345678 shows the 8-bit bf16 mantissa.
    let xs = [1.0 + 2f64.powi(-11), 65504.0, 65520.0, 1e-8, 1.2345678, -2.5];
    let x = Tensor::from_f64_vec(xs.to_vec(), [6], DType::F32, &dev).unwrap();
    let f32s: Vec<f32> = xs.iter().map(|&v| v as f32).collect();
    for (p, want) in [
        (Precision::Fp16, f32s.iter().map(|&v| half::f16::from_f32(v).to_f64()).collect::<Vec<_>>()),
        (Precision::Bf16, f32s.iter().map(|&v| half::bf16::from_f32(v).to_f64()).collect()),
    ] {
        let mut t = Tape::new();
        let xv = t.leaf(x.clone(), true);
        let y = ops::round_to(&mut t, &xv, p).unwrap();
        let got = y.value().to_f64_vec().unwrap();
        assert_eq!(got, want, "{p}");
        // The gradient is rounded the same way: seed it with x itself.
        let g = t.backward_with(vec![(y, x.clone())]).unwrap();
        assert_eq!(g.wrt(&xv).unwrap().to_f64_vec().unwrap(), want, "{p} gradient");
    }
    assert_eq!(half::f16::from_f32(65520.0).to_f64(), f64::INFINITY, "the overflow the loss scaler catches");
    // fp32 records nothing and changes nothing.
    let mut t = Tape::new();
    let xv = t.constant(x.clone());
    let y = ops::round_to(&mut t, &xv, Precision::Fp32).unwrap();
    assert_eq!(y.value().to_f64_vec().unwrap(), x.to_f64_vec().unwrap());
}

#[test]
fn the_loss_scaler_grows_backs_off_and_respects_floor_and_hysteresis() {
    let cfg = TrainConfig { loss_scale_init: 8.0, loss_scale_growth_interval: 3, loss_scale_min: 2.0, ..TrainConfig::default() };
    let mut s = LossScaler::new(&cfg);
    assert_eq!(s.update(true), ScaleEvent::Clean);
    assert_eq!(s.update(true), ScaleEvent::Clean);
    assert_eq!(s.update(true), ScaleEvent::Grew);
    assert_eq!(s.scale(), 16.0);
    assert_eq!(s.update(false), ScaleEvent::Overflow { backed_off: true, at_floor: false });
    assert_eq!(s.scale(), 8.0);
    // An overflow resets the clean count: two clean updates do not grow it.
    s.update(true);
    s.update(true);
    assert_eq!(s.scale(), 8.0);
    s.update(false);
    s.update(false);
    assert_eq!(s.scale(), 2.0);
    assert_eq!(s.update(false), ScaleEvent::Overflow { backed_off: false, at_floor: true });
    assert_eq!(s.scale(), 2.0, "the floor holds");

    // Hysteresis 2: the scale halves on every second overflow in a row.
    let h = TrainConfig { loss_scale_init: 64.0, loss_scale_hysteresis: 2, ..TrainConfig::default() };
    let mut s = LossScaler::new(&h);
    assert_eq!(s.update(false), ScaleEvent::Overflow { backed_off: false, at_floor: false });
    assert_eq!(s.scale(), 64.0);
    assert_eq!(s.update(false), ScaleEvent::Overflow { backed_off: true, at_floor: false });
    assert_eq!(s.scale(), 32.0);
}

/// The shared tiny config in fp16.
fn tiny_fp16(cache: &Path) -> Config {
    let mut c = common::tiny(cache);
    c.train.precision = Precision::Fp16;
    c
}

/// Gradients that overflow at every step, with the scale never allowed down (hysteresis beyond
/// the run), give an epoch without a single update: a crash, not a "finished" run of 0 updates.
#[test]
fn an_epoch_without_an_update_is_a_crash() {
    let root = tempdir("precision");
    let mut cfg = tiny_fp16(&root.join("cache"));
    cfg.train.loss_scale_init = 2f64.powi(24);
    cfg.train.loss_scale_hysteresis = 1_000_000;
    let s = train::train(&cfg, &RunOptions::new(root.join("run")), &mut |_| {}).unwrap();
    assert!(s.crashed && !s.finished && s.updates == 0, "{s:?}");
    assert!(s.reason.as_deref().unwrap_or("").contains("made no update"), "{s:?}");
    assert_eq!(s.exit_code(), train::exit::NONFINITE);
}

#[test]
fn fp16_overflow_backs_off_and_a_nonfinite_forward_skips_without_touching_the_scale() {
    let root = tempdir("precision");
    let mut cfg = tiny_fp16(&root.join("cache"));
    // 2^24 (the most a config may ask for): the scaled output gradient is far beyond fp16's 65504, so the first steps overflow
    // for real (rounded to inf in the emulated fp16 backward) until the scale has backed off.
    cfg.train.loss_scale_init = 2f64.powi(24);
    cfg.faults.nan_forward_steps = vec![20];
    let dir = root.join("run");
    let s = train::train(&cfg, &RunOptions::new(dir.clone()), &mut |_| {}).unwrap();
    assert!(s.finished && !s.crashed, "{s:?}");
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .collect();
    let scale = |i: usize| recs[i]["loss_scale"].as_f64().unwrap();
    assert_eq!(recs[0]["outcome"], "overflow_skipped", "{:?}", recs[0]);
    assert_eq!(scale(0), 2f64.powi(24));
    assert_eq!(scale(1), 2f64.powi(23), "an overflow halves the scale");
    let overflows = s.outcomes.get(&StepOutcome::OverflowSkipped).copied().unwrap_or(0);
    assert!(overflows >= 1 && s.outcomes.get(&StepOutcome::Ok).copied().unwrap_or(0) >= 1, "{:?}", s.outcomes);
    // The non-finite forward is skipped and leaves the scale alone.
    assert_eq!(recs[20]["outcome"], "skipped_nonfinite_loss");
    assert_eq!(scale(21), scale(20), "a non-finite loss must not cut the scale");
    // Every step says its scale and outcome; the weights end finite.
    assert!(recs.iter().all(|r| r["loss_scale"].as_f64().is_some() && r["outcome"].as_str().is_some()));
    for (name, w) in train::load_final_weights(&dir).unwrap() {
        assert!(w.values.iter().all(|v| v.is_finite()), "{name} is not finite");
    }
    // Resume keeps the scaler's state: a split run equals the straight one.
    let split = root.join("split");
    let o = RunOptions { stop_after_epochs: Some(2), ..RunOptions::new(split.clone()) };
    train::train(&cfg, &o, &mut |_| {}).unwrap();
    train::train(&cfg, &RunOptions { resume: true, stop_after_epochs: None, ..o }, &mut |_| {}).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(), std::fs::read_to_string(split.join("metrics.jsonl")).unwrap());
}

#[test]
fn bf16_training_rounds_and_still_learns() {
    let root = tempdir("precision");
    let mut cfg = tiny_fp16(&root.join("cache"));
    let run = |cfg: &Config, name: &str| {
        let o = RunOptions::new(root.join(name));
        train::train(cfg, &o, &mut |_| {}).unwrap()
    };
    cfg.train.precision = Precision::Bf16;
    let bf16 = run(&cfg, "bf16");
    cfg.train.precision = Precision::Fp32;
    let fp32 = run(&cfg, "fp32");
    assert!(bf16.finished && fp32.finished);
    let (b, f) = (bf16.final_val_loss.unwrap(), fp32.final_val_loss.unwrap());
    assert_ne!(b, f, "bf16 rounding must change the numbers");
    assert!(b < bf16.first_val_loss.unwrap(), "bf16 did not learn: {bf16:?}");
    assert!((b - f).abs() < 0.1 * f, "bf16 {b} strays from fp32 {f}");
}

fn depth8_24gb() -> Config {
    // FNOKERN_ROOT: where configs/ is when the test runs from a bundle copied to another host.
    let root = std::env::var("FNOKERN_ROOT").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    Config::load(&Path::new(&root).join("configs/depth8-24gb.toml")).unwrap()
}

#[test]
fn depth8_24gb_needs_checkpointing_to_fit_24_gib() {
    let cfg = depth8_24gb();
    assert_eq!((cfg.model.depth, cfg.model.max_channels), (8, 512));
    let p = plan::plan(&cfg).unwrap();
    let limit = 24u64 << 30;
    assert!(p.plain.peak > limit, "plain training fits: {}", plan::gib(p.plain.peak));
    assert!(p.checkpointed.peak <= limit, "checkpointed training does not fit: {}", plan::gib(p.checkpointed.peak));
    assert_eq!(p.policy, CheckpointPolicy::EveryLevel);
    // The parts' kept activations add up to what the forward pass holds, less the loss's share.
    let parts: u64 = p.plain.parts.iter().map(|r| r.activations).sum();
    assert!(parts <= p.plain.activations && parts > p.plain.activations / 2);
}

#[test]
fn the_plan_equals_the_cpu_measured_peak_of_a_scaled_down_depth8_24gb() {
    // The same config at N 32, batch 2, width 4 (depth 8, every other field as in the file).
    let mut cfg = depth8_24gb();
    cfg.data.n = 32;
    cfg.data.object_size = 64;
    cfg.train.batch_size = 2;
    cfg.model.width = 4;
    cfg.model.max_channels = 16;
    for policy in [CheckpointPolicy::None, CheckpointPolicy::EveryLevel, CheckpointPolicy::EveryK(3)] {
        for precision in [Precision::Fp32, Precision::Fp16] {
            cfg.model.checkpoint = policy;
            cfg.train.precision = precision;
            let meta = plan::step_memory(&cfg, &Device::meta()).unwrap();
            let cpu = plan::step_memory(&cfg, &Device::cpu()).unwrap();
            assert_eq!(meta, cpu, "{policy} {precision}: the meta plan differs from the CPU's ledger");
            assert!(cpu.peak > cpu.resident);
        }
    }
    cfg.train.precision = Precision::Fp32;
    cfg.model.checkpoint = CheckpointPolicy::None;
    let plain = plan::step_memory(&cfg, &Device::cpu()).unwrap();
    cfg.model.checkpoint = CheckpointPolicy::EveryLevel;
    let ck = plan::step_memory(&cfg, &Device::cpu()).unwrap();
    assert!(ck.activations < plain.activations, "checkpointing kept as much: {} vs {}", ck.activations, plain.activations);
}

#[test]
fn a_memory_budget_stops_training_cleanly_as_out_of_memory() {
    let root = tempdir("precision");
    let mut cfg = tiny_fp16(&root.join("cache"));
    cfg.train.precision = Precision::Fp32;
    let step = plan::step_memory(&cfg, &Device::meta()).unwrap();
    // A budget between what the model holds and what a step needs.
    cfg.train.memory_limit = Some(format!("{}", (step.resident + step.peak) / 2));
    let dir = root.join("run");
    let s = train::train(&cfg, &RunOptions::new(dir.clone()), &mut |_| {}).unwrap();
    assert!(s.crashed && s.crash_kind == Some(train::Crash::Oom), "{s:?}");
    assert!(s.reason.as_deref().unwrap().contains("out of memory"), "{s:?}");
    assert!(dir.join("summary.json").is_file());
    // With the step's planned peak as the budget, the same run trains.
    cfg.train.memory_limit = Some(format!("{}", step.peak + (1 << 20)));
    let s = train::train(&cfg, &RunOptions::new(root.join("fits")), &mut |_| {}).unwrap();
    assert!(s.finished, "{s:?}");
}

/// A group's memory is the same for every `accumulate` from 2 up, so the plan runs two
/// micro-batches of it: `accumulate = 10^6` is planned at once (it ran 3 x 10^6 micro-batches on
/// the meta device: minutes of silence before a run started) and equals the plan of 2.
#[test]
fn a_large_accumulate_is_planned_at_once() {
    let root = tempdir("precision");
    let mut cfg = tiny_fp16(&root.join("cache"));
    cfg.train.precision = Precision::Fp32;
    cfg.train.accumulate = 2;
    let two = plan::step_memory(&cfg, &Device::meta()).unwrap();
    cfg.train.accumulate = 1_000_000;
    assert_eq!(plan::step_memory(&cfg, &Device::meta()).unwrap(), two);
    assert_eq!(plan::step_memory(&cfg, &Device::cpu()).unwrap(), two);
    // (Measured before the plan ran two: 3, 5 and 9 micro-batches peaked exactly as 2 did, in
    // fp32 and fp16, with and without the rollback snapshot; one holds no accumulated gradients.)
    cfg.train.accumulate = 1;
    assert!(plan::step_memory(&cfg, &Device::meta()).unwrap().peak < two.peak);
}
