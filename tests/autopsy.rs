//! `fnokern autopsy`: a run with a planted bad update (the `[faults]` section) is replayed bit for
//! bit and the verdict names the planted step; a replay that differs from the run is refused. One
//! test body for every device (the CPU, and the CUDA backend on the driver stand-in or a card).

use std::path::Path;

use fnokern::autopsy::{autopsy, Options};
use fnokern::config::{Config, SpikeAction};
use fnokern::train::{self, RunOptions};

mod common;
use common::{tempdir, tiny};

/// 24 patterns in batches of 4: 6 steps per epoch; the bad update at step 70 (epoch 12), after
/// the tiny model's first epochs, when its steps are calm.
const PLANTED: u64 = 70;

fn planted(cache: &Path, device: &str) -> Config {
    let mut cfg = tiny(cache);
    cfg.train.device = device.into();
    cfg.train.epochs = 14;
    cfg.train.spike_action = SpikeAction::Log;
    cfg.train.checkpoint_every = 1;
    cfg.faults.bad_update_steps = vec![PLANTED];
    cfg.faults.spike_scale = 1e3;
    cfg
}

fn options(run: &Path, steps: (u64, u64), factor: f64) -> Options {
    Options { run: run.to_path_buf(), steps, out: None, factor, baseline_steps: 20, progress: false, stop: None }
}

fn names_the_planted_step(device: &str) {
    let root = tempdir("autopsy");
    let cfg = planted(&root.join("cache"), device);
    let run = root.join("run");
    let s = train::train(&cfg, &RunOptions::new(&run), &mut |_| {}).unwrap();
    assert!(s.finished, "{s:?}");

    let mut lines = Vec::new();
    let r = autopsy(&options(&run, (40, 80), 3.0), &mut |l| lines.push(l.to_string())).unwrap();
    // From the newest checkpoint at or before step 40: epoch 6's end, step 36.
    assert_eq!(r.header.from_step, 36, "{lines:?}");
    assert!(!r.reused);
    assert_eq!(r.records.len(), 41);
    let first = &r.verdict.departures[0];
    assert_eq!((first.step, first.quantity.as_str()), (PLANTED, "update ratio"), "{}", r.verdict.line);
    assert!(first.ratio > 100.0, "{first:?}");
    let moved = r.verdict.loss_moved.expect("the bad update moved the loss");
    assert!(moved.0 > PLANTED, "the loss moved at step {} before the planted update", moved.0);
    assert!(r.verdict.line.contains(&format!("step {PLANTED}")) && r.verdict.line.contains("before the loss moved"), "{}", r.verdict.line);
    // Every step's record: its batch's patterns with their own losses, every parameter tensor,
    // each part's output activation.
    let rec = &r.records[(PLANTED - 40) as usize];
    assert_eq!(rec.step, PLANTED);
    assert_eq!(rec.samples.len(), cfg.train.batch_size);
    assert!(rec.samples.iter().all(|x| x.loss.is_finite() && x.loss > 0.0));
    assert_eq!(rec.params.len(), r.records[0].params.len());
    assert!(rec.params.iter().all(|p| p.update_ratio.is_some() && p.grad_norm.is_some() && p.sqrt_v_median.is_some()));
    assert_eq!(rec.activations.iter().filter(|a| a.what == "output").count(), r.header.parts.len());
    assert!(rec.activations.iter().any(|a| a.what == "branch"));
    for f in ["autopsy.jsonl", "autopsy.json", "verdict.txt", "grad_norm.png", "update_ratio.png", "activations.png", "loss.png"] {
        assert!(r.out.join(f).is_file(), "{f} missing");
    }
    assert!(!r.out.join("replay").exists(), "the replay's directory was left");

    // Judged again with another factor: read back, not replayed; the same first departure.
    let again = autopsy(&options(&run, (40, 80), 10.0), &mut |_| {}).unwrap();
    assert!(again.reused);
    assert_eq!(again.records, r.records);
    assert_eq!(again.verdict.departures[0].step, PLANTED);
}

#[test]
fn the_verdict_names_a_planted_bad_update_on_the_cpu() {
    names_the_planted_step("cpu");
}

#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn the_verdict_names_a_planted_bad_update_on_cuda() {
    if common::standin::cuda_device("autopsy").is_none() {
        return;
    }
    names_the_planted_step("cuda");
}

/// A run whose config was changed after it ran is refused: from its initial weights at the
/// first step whose loss differs, from a checkpoint at once (the checkpoint holds the config).
#[test]
fn a_replay_that_differs_from_the_run_is_refused() {
    let root = tempdir("autopsy");
    let mut cfg = planted(&root.join("cache"), "cpu");
    cfg.train.epochs = 4;
    cfg.faults.bad_update_steps.clear();
    let run = root.join("run");
    assert!(train::train(&cfg, &RunOptions::new(&run), &mut |_| {}).unwrap().finished);
    let config = run.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let changed = text.replace("lr = 0.001", "lr = 0.002");
    assert_ne!(changed, text, "the config's learning rate line moved");
    std::fs::write(&config, changed).unwrap();

    // The first checkpoint (epoch 1's end) is past step 4: the replay starts from the initial
    // weights, and step 0's loss is the same (the rate acts from its update on).
    let err = autopsy(&options(&run, (4, 12), 3.0), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("differs from the run at step 1") && err.contains("nothing is reported"), "{err}");
    assert!(!run.join("autopsy-4-12/autopsy.jsonl").exists());

    // With a checkpoint before the window (epoch 3's end, step 18), its config is compared at once.
    let err = autopsy(&options(&run, (18, 23), 3.0), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("different config") && err.contains("train.lr"), "{err}");
}

#[test]
fn a_window_beyond_the_run_is_refused() {
    let root = tempdir("autopsy");
    let mut cfg = planted(&root.join("cache"), "cpu");
    cfg.train.epochs = 1;
    let run = root.join("run");
    assert!(train::train(&cfg, &RunOptions::new(&run), &mut |_| {}).unwrap().finished);
    let err = autopsy(&options(&run, (2, 40), 3.0), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("logged steps up to 5"), "{err}");
    assert!(Options::parse_steps("9..3").is_err() && Options::parse_steps("x").is_err());
    assert_eq!(Options::parse_steps("3..9").unwrap(), (3, 9));
    let err = autopsy(&Options { factor: 1.0, ..options(&run, (0, 5), 3.0) }, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("--factor"), "{err}");
}
