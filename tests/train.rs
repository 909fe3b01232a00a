//! The trainer: exact resume, determinism, the guards (NaN inputs, loss spikes, rollback, crash
//! on repeated failure), the run directory, and bad input.

use std::path::Path;

mod common;
use common::{tempdir, tiny};
use fnokern::config::{Config, SpikeAction};
use fnokern::train::{self, RunOptions, StepOutcome, Summary};

fn opts(dir: &Path) -> RunOptions {
    RunOptions::new(dir.to_path_buf())
}

fn run(cfg: &Config, o: &RunOptions) -> Summary {
    train::train(cfg, o, &mut |_| {}).unwrap()
}

fn weights_of(dir: &Path) -> Vec<(String, Vec<u64>)> {
    train::load_final_weights(dir).unwrap().into_iter().map(|(k, v)| (k, v.values.iter().map(|x| x.to_bits()).collect())).collect()
}

/// The records of one `kind` (`step` or `epoch`) in the run's metrics.jsonl.
fn records(dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .collect()
}

fn step_records(dir: &Path) -> Vec<serde_json::Value> {
    records(dir, "step")
}

#[test]
fn resume_continues_bit_for_bit() {
    let root = tempdir("train");
    let cfg = tiny(&root.join("cache"));
    let straight = root.join("straight");
    let s = run(&cfg, &opts(&straight));
    assert!(s.finished && !s.crashed);
    assert_eq!(s.steps, 4 * 6);

    let split = root.join("split");
    let first = run(&cfg, &RunOptions { stop_after_epochs: Some(2), ..opts(&split) });
    assert!(!first.finished && first.epochs_done == 2);
    let second = run(&cfg, &RunOptions { resume: true, ..opts(&split) });
    assert!(second.finished && second.epochs_done == 4);
    assert_eq!(weights_of(&straight), weights_of(&split), "resumed weights differ from the straight run");
    // The metrics of the two runs are the same lines.
    let a = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let b = std::fs::read_to_string(split.join("metrics.jsonl")).unwrap();
    assert_eq!(a, b);
    assert_eq!(s.final_val_loss.map(f64::to_bits), second.final_val_loss.map(f64::to_bits));
    // What the checkpoint's JSON carried over (the first epoch's loss, the spike window) comes
    // back to the bit: serde_json parses floats exactly only with `float_roundtrip`.
    assert_eq!(s.first_val_loss.map(f64::to_bits), second.first_val_loss.map(f64::to_bits));
    let state = |dir: &Path| {
        let (_, header) = safetensors::SafeTensors::read_metadata(&std::fs::read(dir.join("checkpoints/last.safetensors")).unwrap()).unwrap();
        let text = header.metadata().as_ref().unwrap()["fnokern_state"].clone();
        let v: train::TrainState = serde_json::from_str(&text).unwrap();
        (text, serde_json::to_string(&v).unwrap())
    };
    let (text, reprinted) = state(&split);
    assert_eq!(text, reprinted, "the trainer state does not survive a JSON round trip");
}

#[test]
fn same_seed_same_run() {
    let root = tempdir("train");
    let cfg = tiny(&root.join("cache"));
    run(&cfg, &opts(&root.join("a")));
    run(&cfg, &opts(&root.join("b")));
    assert_eq!(weights_of(&root.join("a")), weights_of(&root.join("b")));
    assert_eq!(std::fs::read(root.join("a/metrics.jsonl")).unwrap(), std::fs::read(root.join("b/metrics.jsonl")).unwrap());
    let mut other = cfg.clone();
    other.train.seed = 1;
    run(&other, &opts(&root.join("c")));
    assert_ne!(weights_of(&root.join("a")), weights_of(&root.join("c")), "the shuffling seed must matter");
}

#[test]
fn nan_inputs_and_a_spike_are_skipped_and_the_run_finishes() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.faults.nan_input_steps = vec![3, 4];
    cfg.faults.spike_steps = vec![9];
    cfg.train.spike_action = SpikeAction::Skip;
    let dir = root.join("run");
    let s = run(&cfg, &opts(&dir));
    assert!(s.finished && !s.crashed, "{s:?}");
    assert_eq!(s.outcomes.get(&StepOutcome::SkippedBadInput), Some(&2));
    assert_eq!(s.outcomes.get(&StepOutcome::SpikeSkipped), Some(&1));
    let recs = step_records(&dir);
    assert_eq!(recs.len(), 24, "one record per step");
    assert_eq!(recs[3]["outcome"], "skipped_bad_input");
    assert_eq!(recs[9]["outcome"], "spike_skipped");
    assert!(recs.iter().all(|r| r["outcome"].as_str().is_some()));
    for (name, w) in train::load_final_weights(&dir).unwrap() {
        assert!(w.values.iter().all(|v| v.is_finite()), "{name} is not finite");
    }
}

#[test]
fn a_spike_rolls_back_with_a_lower_learning_rate() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.faults.spike_steps = vec![14];
    cfg.train.spike_action = SpikeAction::Rollback;
    cfg.train.rollback_rewarmup = 4;
    let dir = root.join("run");
    let s = run(&cfg, &opts(&dir));
    assert!(s.finished && !s.crashed, "{s:?}");
    assert_eq!(s.outcomes.get(&StepOutcome::RolledBack), Some(&1));
    let recs = step_records(&dir);
    assert_eq!(recs[14]["outcome"], "rolled_back");
    let lr = |i: usize| recs[i]["lr"].as_f64().unwrap();
    assert_eq!(lr(13), 1e-3);
    assert_eq!(lr(15), 0.5e-3, "the rate after a rollback is halved");
    // ... and climbs back to the schedule's over rollback_rewarmup = 4 updates.
    for (i, want) in [(16, 0.625e-3), (17, 0.75e-3), (18, 0.875e-3), (19, 1e-3), (23, 1e-3)] {
        assert!((lr(i) - want).abs() < 1e-15, "step {i}: lr {} not {want}", lr(i));
    }
    for (name, w) in train::load_final_weights(&dir).unwrap() {
        assert!(w.values.iter().all(|v| v.is_finite()), "{name} is not finite");
    }
}

/// A rollback moves Adam's update count back while the schedule's goes on; the checkpoint keeps
/// both, so a run stopped after a rollback resumes bit for bit (it kept only the schedule's, and
/// Adam's bias correction went wrong after the resume).
#[test]
fn resume_is_exact_after_a_rollback() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.faults.spike_steps = vec![8];
    cfg.train.spike_action = SpikeAction::Rollback;
    let straight = root.join("straight");
    let s = run(&cfg, &opts(&straight));
    assert_eq!(s.outcomes.get(&StepOutcome::RolledBack), Some(&1), "{s:?}");
    let split = root.join("split");
    run(&cfg, &RunOptions { stop_after_epochs: Some(2), ..opts(&split) });
    let resumed = run(&cfg, &RunOptions { resume: true, ..opts(&split) });
    assert!(resumed.finished, "{resumed:?}");
    assert_eq!(std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap(), std::fs::read_to_string(split.join("metrics.jsonl")).unwrap());
    assert_eq!(weights_of(&straight), weights_of(&split));
}

/// metrics.jsonl and summary.json spell each outcome as the enum's words.
#[test]
fn step_outcomes_keep_their_words() {
    for o in StepOutcome::ALL {
        assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        assert_eq!(serde_json::from_value::<StepOutcome>(o.as_str().into()).unwrap(), o);
    }
    let failures: Vec<&str> = StepOutcome::ALL.iter().filter(|o| o.is_failure()).map(|o| o.as_str()).collect();
    assert_eq!(failures, ["skipped_bad_input", "skipped_nonfinite_loss", "skipped_nonfinite_grad", "overflow_at_floor", "spike_skipped", "rolled_back"]);
    let spikes: Vec<&str> = StepOutcome::ALL.iter().filter(|o| o.is_spike()).map(|o| o.as_str()).collect();
    assert_eq!(spikes, ["spike_logged", "spike_skipped", "rolled_back"]);
}

#[test]
fn repeated_failures_stop_the_run_as_crashed() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.faults.nan_input_steps = (2..10).collect();
    cfg.train.max_consecutive_failures = 3;
    let dir = root.join("run");
    let s = run(&cfg, &opts(&dir));
    assert!(s.crashed && !s.finished);
    assert_eq!(s.reason.as_deref(), Some("3 failed steps in a row (last: skipped_bad_input)"));
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["crashed"], true);
    assert_eq!(step_records(&dir).len(), 5);
}

#[test]
fn the_run_directory_has_its_files_and_the_loss_falls() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.train.evaluate = true;
    cfg.train.epochs = 6;
    cfg.train.checkpoint_every = 2;
    let dir = root.join("run");
    let s = run(&cfg, &opts(&dir));
    for f in [
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "loss.png",
        "grad_norm.png",
        "lr.png",
        "reconstruction.png",
        "weights.safetensors",
        "checkpoints/last.safetensors",
        "checkpoints/best.safetensors",
        "checkpoints/epoch_2.safetensors",
        "checkpoints/epoch_4.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f} is missing");
    }
    assert!(s.metrics.is_some());
    assert!(s.best_val_loss.unwrap() < s.first_val_loss.unwrap(), "{s:?}");
    // The resolved config reloads to the same config.
    assert_eq!(Config::load(&dir.join("config.toml")).unwrap(), cfg);
}

#[test]
fn bad_input_gives_clear_errors_and_overwrites_nothing() {
    let root = tempdir("train");
    let cfg = tiny(&root.join("cache"));
    let mut neg = cfg.clone();
    neg.train.lr = -1e-3;
    let err = train::train(&neg, &opts(&root.join("neg")), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("lr must be a positive number, got -0.001"), "{err}");

    std::fs::write(root.join("a_file"), b"x").unwrap();
    let err = train::train(&cfg, &opts(&root.join("a_file/run")), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("cannot create the run directory"), "{err}");

    let dir = root.join("run");
    let mut short = cfg.clone();
    short.train.epochs = 1;
    run(&short, &opts(&dir));
    let err = train::train(&short, &opts(&dir), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("already holds a run"), "{err}");

    let last = dir.join("checkpoints/last.safetensors");
    std::fs::write(&last, b"garbage, not a checkpoint").unwrap();
    let before = std::fs::read(dir.join("metrics.jsonl")).unwrap();
    // A damaged `last` is passed over, with the reason, for the newest checkpoint that loads
    // (`best`, of this finished run): nothing to do, and nothing is overwritten.
    let mut said = Vec::new();
    let s = train::train(&short, &RunOptions { resume: true, ..opts(&dir) }, &mut |m| said.push(m.to_string())).unwrap();
    assert!(s.finished, "{s:?}");
    assert!(said.iter().any(|m| m.contains("passing over") && m.contains("last.safetensors") && m.contains("not a checkpoint")), "{said:?}");
    assert!(said.iter().any(|m| m.contains("nothing to do")), "{said:?}");
    assert_eq!(std::fs::read(&last).unwrap(), b"garbage, not a checkpoint");
    assert_eq!(std::fs::read(dir.join("metrics.jsonl")).unwrap(), before);

    // A checkpoint of another model is refused too, naming the field; so is one whose config
    // says the same model but whose tensors are not shaped like it.
    let other = root.join("other");
    run(&short, &opts(&other));
    let mut wider = short.clone();
    wider.model.width = 6;
    let err = train::train(&wider, &RunOptions { resume: true, ..opts(&other) }, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("different config") && err.contains("model.width (4 in the run, 6 now)"), "{err}");
}

/// A resume takes the newest checkpoint that loads: with `last` and `epoch_2` damaged, `best` or
/// `epoch_1`; the run then ends as the straight one. A directory whose checkpoints are all
/// damaged (or that has none: killed before its first) starts from its beginning. A finished
/// run extends with more epochs, and its training time adds up.
#[test]
fn resume_falls_back_to_an_older_checkpoint_and_extends_finished_runs() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.train.checkpoint_every = 1;
    let straight = root.join("straight");
    let s = run(&cfg, &opts(&straight));
    let split = root.join("split");
    run(&cfg, &RunOptions { stop_after_epochs: Some(2), ..opts(&split) });
    for f in ["last", "epoch_2"] {
        let p = split.join(format!("checkpoints/{f}.safetensors"));
        let mut b = std::fs::read(&p).unwrap();
        let k = b.len() - 5;
        b[k] ^= 1;
        std::fs::write(&p, b).unwrap();
    }
    // A torn, non-UTF-8 line in metrics.jsonl is dropped, not a reason to refuse the resume.
    let mut m = std::fs::OpenOptions::new().append(true).open(split.join("metrics.jsonl")).unwrap();
    std::io::Write::write_all(&mut m, b"{\"kind\":\"st\xff\xfe").unwrap();
    drop(m);
    let mut said = Vec::new();
    let r = train::train(&cfg, &RunOptions { resume: true, ..opts(&split) }, &mut |m| said.push(m.to_string())).unwrap();
    assert!(said.iter().any(|m| m.contains("passing over") && m.contains("checksum mismatch")), "{said:?}");
    assert!(said.iter().any(|m| m.contains("dropped 1 unreadable line")), "{said:?}");
    assert!(r.finished);
    assert_eq!(std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap(), std::fs::read_to_string(split.join("metrics.jsonl")).unwrap());
    assert_eq!(weights_of(&straight), weights_of(&split));

    let fresh = root.join("fresh");
    run(&cfg, &RunOptions { stop_after_epochs: Some(1), ..opts(&fresh) });
    for e in std::fs::read_dir(fresh.join("checkpoints")).unwrap().flatten() {
        std::fs::write(e.path(), b"torn").unwrap();
    }
    let mut said = Vec::new();
    train::train(&cfg, &RunOptions { resume: true, ..opts(&fresh) }, &mut |m| said.push(m.to_string())).unwrap();
    assert!(said.iter().any(|m| m.contains("starting the run from its beginning")), "{said:?}");
    assert_eq!(std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap(), std::fs::read_to_string(fresh.join("metrics.jsonl")).unwrap());

    // The training time the extension resumes from is what the last checkpoint recorded (the
    // summary's also counts the plots after it, which the extension writes again): the extended
    // run's time must exceed it. (Against the summary's, a lighter second pass on a busy machine
    // could come out below: a timing race, which CI once lost.)
    let bytes = std::fs::read(straight.join("checkpoints/last.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let state: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["fnokern_state"]).unwrap();
    let base = state["wall_seconds"].as_f64().unwrap();
    assert!(base > 0.0 && base <= s.wall_seconds, "checkpoint {base} s, summary {} s", s.wall_seconds);
    let mut longer = cfg.clone();
    longer.train.epochs = 6;
    let mut said = Vec::new();
    let e = train::train(&longer, &RunOptions { resume: true, ..opts(&straight) }, &mut |m| said.push(m.to_string())).unwrap();
    assert!(e.finished && e.epochs_done == 6 && e.steps == 36, "{e:?}");
    assert!(said.iter().any(|m| m.contains("extending the run from 4 to 6 epochs")), "{said:?}");
    assert!(e.wall_seconds > base, "resumed from {base} s, then {} s", e.wall_seconds);
}

/// One process at a time holds a run directory.
#[test]
fn a_run_directory_in_use_is_refused() {
    let root = tempdir("train");
    let cfg = tiny(&root.join("cache"));
    let dir = root.join("run");
    let _held = train::run_dir::DirLock::take(&dir, "run").unwrap();
    let err = train::train(&cfg, &opts(&dir), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("in use by another fnokern process"), "{err}");
}

#[test]
fn accumulation_and_the_auxiliary_curriculum_run() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.train.accumulate = 2;
    cfg.train.aux_loss = fnokern::config::AuxLoss::SupervisedL1;
    cfg.train.aux_warmup_steps = 2;
    cfg.train.aux_ramp_steps = 4;
    cfg.train.schedule = fnokern::config::ScheduleKind::WarmupCosine;
    cfg.train.clip = fnokern::config::ClipKind::AgcUnit;
    cfg.train.optimizer = fnokern::config::OptimizerKind::Adamw;
    let dir = root.join("run");
    let s = run(&cfg, &opts(&dir));
    assert!(s.finished && !s.crashed, "{s:?}");
    // 6 micro-batches per epoch, 2 per update.
    assert_eq!((s.steps, s.updates), (24, 12));
    let recs = step_records(&dir);
    assert_eq!(recs[0]["outcome"], "accumulated");
    assert_eq!(recs[1]["outcome"], "ok");
    assert!(recs[1]["grad_norm"].as_f64().is_some());
}

/// The overlap term trains (paired batches of neighbours, both axes), resumes to the bit, and
/// changes the training (a weight of 0 leaves it out); an unpaired validation keeps the physics
/// loss alone.
#[test]
fn the_overlap_term_trains_and_resumes_exactly() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.train.aux_loss = fnokern::config::AuxLoss::Overlap;
    cfg.train.aux_weight = 1.0;
    let straight = root.join("straight");
    let s = run(&cfg, &opts(&straight));
    assert!(s.finished && !s.crashed, "{s:?}");
    let split = root.join("split");
    run(&cfg, &RunOptions { stop_after_epochs: Some(1), ..opts(&split) });
    let resumed = run(&cfg, &RunOptions { resume: true, ..opts(&split) });
    assert_eq!(weights_of(&straight), weights_of(&split), "resumed weights differ");
    assert_eq!(s.final_val_loss.map(f64::to_bits), resumed.final_val_loss.map(f64::to_bits));
    let mut off = cfg.clone();
    off.train.aux_weight = 0.0;
    let without = root.join("without");
    run(&off, &opts(&without));
    // With a weight of 0 the batches are still paired, so only the term differs.
    assert_ne!(weights_of(&straight), weights_of(&without), "the overlap term changed nothing");
    // A batch of 1 cannot pair.
    let mut one = cfg.clone();
    one.train.batch_size = 1;
    assert!(one.validate().unwrap_err().to_string().contains("at least 2"));
}

/// Spikes are detected from the first step on: step 1 against step 0's loss, step 2 against
/// both (the guard's window was empty until step 3, so these went unseen). Step 0's own loss is
/// the initial weights', before any update: nothing to detect.
#[test]
fn spikes_in_the_first_steps_are_detected() {
    let root = tempdir("train");
    for step in [1u64, 2] {
        let mut cfg = tiny(&root.join("cache"));
        cfg.faults.spike_steps = vec![step];
        cfg.train.spike_action = SpikeAction::Skip;
        let dir = root.join(format!("run{step}"));
        let s = run(&cfg, &opts(&dir));
        assert_eq!(s.outcomes.get(&StepOutcome::SpikeSkipped), Some(&1), "step {step}: {s:?}");
        let recs = step_records(&dir);
        assert_eq!(recs[step as usize]["outcome"], "spike_skipped", "step {step}");
        assert!(recs[step as usize]["spike_reference"].as_f64().is_some_and(|r| r > 0.0), "step {step}");
    }
}

/// An epoch that ends blown up (a bad update at its last step: a 10^4 x rate, whose damage only
/// its validation sees) is not made a rollback point: the next epoch's spike goes back to the
/// epoch before it, once, and training goes on (the guard rolled back into the blown-up state
/// until the run crashed with "rollbacks exhausted"). The run resumes exactly from a checkpoint
/// that holds both rollback points.
#[test]
fn an_epoch_that_ends_blown_up_is_never_a_rollback_point() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.train.epochs = 5;
    cfg.train.spike_action = SpikeAction::Rollback;
    // 24 patterns in batches of 4: steps 6-11 are epoch 2.
    cfg.faults.bad_update_steps = vec![11];
    cfg.faults.spike_scale = 1e4;
    let dir = root.join("run");
    let mut lines = Vec::new();
    let s = train::train(&cfg, &opts(&dir), &mut |l| lines.push(l.to_string())).unwrap();
    assert!(s.finished && !s.crashed, "{s:?}");
    let epochs = records(&dir, "epoch");
    let val = |k: usize| epochs[k]["val_loss"].as_f64().unwrap();
    assert!(val(1) > 2.0 * val(0), "the bad update did not blow epoch 2 up: {} vs {}", val(1), val(0));
    assert_eq!(epochs.iter().map(|e| e["rollback_point"].as_bool().unwrap()).collect::<Vec<_>>()[..2], [true, false]);
    assert!(lines.iter().any(|l| l.starts_with("epoch 2's end is not a rollback point") && l.ends_with("a rollback goes to epoch 1's end")), "{lines:?}");
    let recs = step_records(&dir);
    let rollbacks: Vec<&serde_json::Value> = recs.iter().filter(|r| r["outcome"] == "rolled_back").collect();
    assert!(!rollbacks.is_empty(), "the blow-up was not caught");
    assert!(rollbacks.iter().all(|r| r["rolled_back_to_epoch"] == 1), "{rollbacks:?}");
    assert!(rollbacks.len() <= 2, "the guard looped: {} rollbacks", rollbacks.len());
    assert!(val(4) < val(1) / 2.0, "training did not go on from epoch 1's end: {} then {}", val(1), val(4));

    // Stopped after the blown-up epoch (its checkpoint holds epoch 1's point and the initial
    // weights; epoch 2's state is not one), then resumed: the straight run, bit for bit.
    let split = root.join("split");
    run(&cfg, &RunOptions { stop_after_epochs: Some(2), ..opts(&split) });
    let resumed = run(&cfg, &RunOptions { resume: true, ..opts(&split) });
    assert!(resumed.finished, "{resumed:?}");
    assert_eq!(std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(), std::fs::read_to_string(split.join("metrics.jsonl")).unwrap());
    assert_eq!(weights_of(&dir), weights_of(&split));
}

/// A rollback point that leads straight to another spike is passed over: a rollback while the
/// rate still climbs back from the last goes one point older (epoch 2's end, then epoch 1's); one
/// after the rate is back goes to the newest again.
#[test]
fn repeated_rollbacks_go_to_older_points() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.train.spike_action = SpikeAction::Rollback;
    cfg.train.rollback_rewarmup = 2;
    // Epoch 3 is steps 12-17, before its end makes a new point: a spike at 13, another at once
    // (no update between: the rate is climbing), and one at 17, after the updates of steps 15
    // and 16 (the rate is back).
    cfg.faults.spike_steps = vec![13, 14, 17];
    let dir = root.join("run");
    let s = run(&cfg, &opts(&dir));
    assert!(s.finished && !s.crashed, "{s:?}");
    let recs = step_records(&dir);
    let to = |i: usize| recs[i]["rolled_back_to_epoch"].as_u64();
    assert_eq!((to(13), to(14), to(17)), (Some(2), Some(1), Some(2)));
}

#[test]
fn a_run_is_scored_on_unseen_objects_as_their_mean_and_sd() {
    let dir = common::tempdir("eval-seeds");
    let mut cfg = common::tiny(&dir.join("cache"));
    cfg.train.epochs = 1;
    cfg.train.evaluate = true;
    cfg.train.eval_seeds = vec![7, 8, 9];
    let s = fnokern::train::train(&cfg, &fnokern::train::RunOptions::new(dir.join("run")), &mut |_| {}).unwrap();
    let m = s.metrics.expect("scored");
    let objects = m["objects"].as_array().unwrap();
    assert_eq!(objects.iter().map(|o| o["data_seed"].as_u64().unwrap()).collect::<Vec<_>>(), [7, 8, 9]);
    let ssim: Vec<f64> = objects.iter().map(|o| o["amp_ssim"].as_f64().unwrap()).collect();
    let mean = ssim.iter().sum::<f64>() / 3.0;
    let sd = (ssim.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
    assert!((m["amp_ssim"].as_f64().unwrap() - mean).abs() < 1e-12, "{m}");
    assert!((m["sd"]["amp_ssim"].as_f64().unwrap() - sd).abs() < 1e-12, "{m}");
    // Three different objects: three different scores.
    assert!(ssim[0] != ssim[1] && ssim[1] != ssim[2], "{ssim:?}");
    assert!(dir.join("run/reconstruction.png").is_file());

    // The validation object's seed, a repeat, or NPZ data are refused by name.
    for (seeds, npz) in [(vec![0], false), (vec![7, 7], false), (vec![7], true)] {
        let mut c = cfg.clone();
        c.train.eval_seeds = seeds;
        if npz {
            c.data.npz = Some("x.npz".into());
        }
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("eval_seeds"), "{err}");
    }
}

/// A fork of a run's epoch-2 checkpoint under the same config is the straight run, bit for bit
/// (its log starts with the run's own); under a changed optimiser setting it says what changed and
/// trains apart from there; under another model, or with no epochs left, it is refused.
#[test]
fn a_fork_continues_a_checkpoint_under_a_changed_config() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.train.checkpoint_every = 1;
    let dir = root.join("run");
    run(&cfg, &opts(&dir));
    let ck = dir.join("checkpoints/epoch_2.safetensors");

    let same = root.join("same");
    let mut lines = Vec::new();
    let s = train::train(&cfg, &RunOptions { fork: Some(ck.clone()), ..opts(&same) }, &mut |l| lines.push(l.to_string())).unwrap();
    assert!(s.finished && s.epochs_done == cfg.train.epochs, "{s:?}");
    assert!(lines.iter().any(|l| l.starts_with("forked from") && l.contains("after epoch 2 (step 12); changed: nothing")), "{lines:?}");
    assert_eq!(std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(), std::fs::read_to_string(same.join("metrics.jsonl")).unwrap());
    assert_eq!(weights_of(&dir), weights_of(&same));

    let mut changed = cfg.clone();
    changed.train.beta2 = 0.99;
    let other = root.join("beta2");
    let mut lines = Vec::new();
    train::train(&changed, &RunOptions { fork: Some(ck.clone()), ..opts(&other) }, &mut |l| lines.push(l.to_string())).unwrap();
    assert!(lines.iter().any(|l| l.contains("changed: train.beta2 (0.999 in the run, 0.99 now)")), "{lines:?}");
    let (a, b) = (step_records(&dir), step_records(&other));
    assert_eq!(a.len(), b.len());
    assert_eq!(a[..13], b[..13], "the fork's first step (12) uses the checkpoint's weights");
    assert_ne!(a[13]["loss"], b[13]["loss"], "the changed beta2 changed nothing");

    let mut wider = cfg.clone();
    wider.model.width = 8;
    let err = train::train(&wider, &RunOptions { fork: Some(ck.clone()), ..opts(&root.join("wider")) }, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("the model needs") || err.contains("shape"), "{err}");
    let mut short = cfg.clone();
    short.train.epochs = 2;
    let err = train::train(&short, &RunOptions { fork: Some(ck), ..opts(&root.join("short")) }, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("must be more"), "{err}");
}

/// `train.log_layers`: every update's record holds each part's gradient norm before clipping,
/// whose root sum of squares is the global norm.
#[test]
fn log_layers_logs_each_parts_gradient_norm() {
    let root = tempdir("train");
    let mut cfg = tiny(&root.join("cache"));
    cfg.train.epochs = 1;
    cfg.train.log_layers = true;
    let dir = root.join("run");
    run(&cfg, &opts(&dir));
    let parts = fnokern::model::Generator::for_run(&cfg, &fnokern::Device::cpu()).unwrap().table().len();
    for r in step_records(&dir) {
        let norms: Vec<f64> = r["layer_grad_norm"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(norms.len(), parts);
        let total = norms.iter().map(|n| n * n).sum::<f64>().sqrt();
        let global = r["grad_norm"].as_f64().unwrap();
        assert!((total - global).abs() <= 1e-5 * global, "{total} vs {global}");
    }
}

/// An observer that asks to stop after a step ends the run right there (the autopsy's replay
/// ends at its window's last step), checkpointed, and a resume continues to the straight run.
#[test]
fn an_observer_stop_ends_the_run_after_that_step() {
    struct StopAt(u64);
    impl train::StepObserver for StopAt {
        fn after_step(&mut self, _t: &train::Trainer, r: &train::StepReport) -> fnokern::Result<bool> {
            Ok(r.step != self.0)
        }
    }
    let dir = tempdir("observer-stop");
    let cfg = tiny(&dir.join("cache"));
    // Step 8 is the third of epoch 1 (6 steps an epoch), not an epoch's last.
    let s = train::train_observed(&cfg, &opts(&dir.join("run")), &mut StopAt(8), &mut |_| {}).unwrap();
    assert!(s.interrupted, "{s:?}");
    assert_eq!(s.steps, 9, "the run stops right after step 8");
    let resumed = run(&cfg, &RunOptions { resume: true, ..opts(&dir.join("run")) });
    let straight = run(&cfg, &opts(&dir.join("straight")));
    assert_eq!(resumed.steps, straight.steps);
    assert_eq!(weights_of(&dir.join("run")), weights_of(&dir.join("straight")));
}
