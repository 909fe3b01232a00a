//! The sweeps: a killed sweep resumes without redoing finished runs, each failure class is
//! detected on a run built to fail that way, arms merge over the base, and the report is written.

use std::path::Path;
use std::sync::Mutex;

mod common;
use common::tempdir;
use fnokern::config::Config;
use fnokern::experiments::{self as ex, Arm, CrashKind, Criteria, Plan, SweepKind, SweepOptions};

/// The shared tiny config with 3 epochs.
fn tiny(cache: &Path) -> Config {
    let mut c = common::tiny(cache);
    c.train.epochs = 3;
    c
}

fn options(dir: &Path) -> SweepOptions {
    SweepOptions { out_dir: dir.to_path_buf(), jobs: 2, threads: Some(2), max_runs: None, criteria: loose(), command: "test".into(), stop: None, shard: None }
}

/// Loose enough that the tiny runs pass unless built to fail.
fn loose() -> Criteria {
    Criteria { max_val_loss: 10.0, min_amp_ssim: 0.0, min_amp_contrast: 0.0, ..Criteria::default() }
}

fn quiet() -> impl Fn(&str) + Sync {
    |_| {}
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn a_killed_sweep_resumes_without_redoing_finished_runs() {
    let dir = tempdir("resume");
    let base = tiny(&dir.join("cache"));
    let arms = vec![Arm::load("control").unwrap(), Arm::load("layerscale").unwrap()];
    let plan = Plan::new(SweepKind::Shootout, &base, arms, vec![2], vec![0, 1]).unwrap();
    let specs = plan.runs().unwrap();
    assert_eq!(specs.len(), 4);

    // "Killed" after two runs ended...
    let mut o = options(&dir);
    o.max_runs = Some(2);
    let first = ex::run_sweep(&plan, &o, &quiet()).unwrap();
    assert_eq!((first.ran, first.reused, first.results.len()), (2, 0, 2));
    assert!(!first.complete());
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(report.contains("Incomplete"), "{report}");
    let done: Vec<String> = first.results.iter().map(|r| r.name.clone()).collect();
    let stamps: Vec<_> = done.iter().map(|n| mtime(&dir.join("runs").join(n).join("summary.json"))).collect();
    // ... and while the third run was in its second epoch: it has a checkpoint after epoch 1.
    let third = specs.iter().find(|s| !done.contains(&s.name)).unwrap();
    let third_dir = dir.join("runs").join(&third.name);
    let stop = fnokern::train::RunOptions { stop_after_epochs: Some(1), ..fnokern::train::RunOptions::new(third_dir.clone()) };
    fnokern::train::train(&third.config, &stop, &mut |_| {}).unwrap();

    let messages = Mutex::new(Vec::new());
    let second = ex::run_sweep(&plan, &options(&dir), &|m: &str| messages.lock().unwrap().push(m.to_string())).unwrap();
    assert!(second.complete());
    assert_eq!((second.ran, second.reused), (2, 2), "{:?}", messages.lock().unwrap());
    for (n, t) in done.iter().zip(&stamps) {
        assert_eq!(mtime(&dir.join("runs").join(n).join("summary.json")), *t, "{n} was run again");
    }
    let log = std::fs::read_to_string(third_dir.join("train.log")).unwrap();
    assert!(log.contains("resumed from"), "the interrupted run was not resumed: {log}");
    let third_result = second.results.iter().find(|r| r.name == third.name).unwrap();
    assert_eq!(third_result.epochs_done, 3);
    assert_eq!(third_result.val_curve.len(), 3);

    // A resumed run equals one trained straight through (the trainer's exact resume).
    let straight = tempdir("straight");
    let s = fnokern::train::train(&third.config, &fnokern::train::RunOptions::new(straight.clone()), &mut |_| {}).unwrap();
    assert_eq!(s.final_val_loss, third_result.final_val_loss);

    // A third invocation runs nothing; a different plan in the same directory is refused.
    let third_call = ex::run_sweep(&plan, &options(&dir), &quiet()).unwrap();
    assert_eq!((third_call.ran, third_call.reused), (0, 4));
    let other = Plan::new(SweepKind::Shootout, &base, vec![Arm::load("agc").unwrap()], vec![2], vec![0]).unwrap();
    let err = ex::run_sweep(&other, &options(&dir), &quiet()).unwrap_err().to_string();
    assert!(err.contains("different sweep") && err.contains("arms") && err.contains("seeds"), "{err}");
    // A base config that differs says in which field.
    let mut changed = base.clone();
    changed.train.lr = 2e-3;
    let other = Plan::new(SweepKind::Shootout, &changed, plan.arms.clone(), vec![2], vec![0, 1]).unwrap();
    let err = ex::run_sweep(&other, &options(&dir), &quiet()).unwrap_err().to_string();
    assert!(err.contains("train.lr: 0.001 here, 0.002 now"), "{err}");

    for f in ["report.md", "results.json", "p_crash.png", "val_curves.png", "plan.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["runs"].as_array().unwrap().len(), 4);
    assert_eq!(results["complete"], true);
}

/// One run of `cfg` through a one-run sweep; returns its result.
fn judge_run(tag: &str, cfg: &Config, criteria: Criteria) -> ex::RunResult {
    let dir = tempdir(tag);
    let arm = Arm { name: "as-is".into(), overlay: String::new() };
    let plan = Plan::new(SweepKind::CrashHunt, cfg, vec![arm], vec![cfg.model.depth], vec![0]).unwrap();
    let mut o = options(&dir);
    o.criteria = criteria;
    let out = ex::run_sweep(&plan, &o, &quiet()).unwrap();
    out.results[0].clone()
}

#[test]
fn each_crash_kind_is_detected_on_a_run_built_to_crash_that_way() {
    use CrashKind::*;
    let cache = tempdir("cache");

    // A healthy run does not crash, and trains (at a rate that moves it in 18 steps).
    let mut c = tiny(&cache);
    c.train.lr = 1e-2;
    let r = judge_run("ok", &c, loose());
    assert_eq!((r.crashes.as_slice(), r.did_not_train), (&[][..], false), "{:?}", r.reason);
    assert!(r.initial_loss.is_some() && r.max_train_loss.is_some(), "{r:?}");

    // Non-finite: every input batch is NaN, so every step is skipped until the trainer gives up.
    let mut c = tiny(&cache);
    c.faults.nan_input_steps = (0..10).collect();
    c.train.max_consecutive_failures = 3;
    let r = judge_run("nan", &c, loose());
    assert_eq!(r.crashes, [Nonfinite], "{:?}", r.reason);

    // The guard gives up: every step from the 4th is a 100x spike, rolled back until the
    // trainer stops; the spikes were explosions too.
    let mut c = tiny(&cache);
    c.faults.spike_steps = (3..20).collect();
    c.train.max_consecutive_failures = 3;
    c.train.spike_action = fnokern::config::SpikeAction::Rollback;
    let r = judge_run("spike", &c, loose());
    assert_eq!(r.crashes, [Explosion, Spike], "{:?}", r.reason);

    // One 100x spike that the guard rescues is still a loss explosion; with the guard off the
    // same spike is logged, trained through, and counted the same way.
    for (tag, action) in [("rescued", fnokern::config::SpikeAction::Rollback), ("logged", fnokern::config::SpikeAction::Log)] {
        let mut c = tiny(&cache);
        c.faults.spike_steps = vec![9];
        c.train.spike_action = action;
        let r = judge_run(tag, &c, loose());
        assert!(r.finished, "{tag}: {:?}", r.reason);
        assert_eq!(r.crashes, [Explosion], "{tag}: {:?}", r.reason);
        assert_eq!(r.max_train_loss.map(|m| m.0), Some(9), "{tag}");
        assert_eq!(r.rollbacks, u64::from(action == fnokern::config::SpikeAction::Rollback), "{tag}");
        // A larger explosion factor than the spike lets it pass.
        let mut r = r.clone();
        r.judge(&Criteria { explosion_factor: 1e6, ..loose() });
        assert_eq!(r.crashes, [], "{tag}: {:?}", r.reason);
    }

    // Out of memory: a budget that holds the model but not a training step's activations.
    let mut c = tiny(&cache);
    c.train.memory_limit = Some("64KiB".into());
    let r = judge_run("oom", &c, loose());
    assert_eq!(r.crashes, [Oom], "{:?}", r.reason);
    assert!(r.reason.as_deref().unwrap_or("").contains("out of memory"), "{:?}", r.reason);
    // ... and a budget too small for the model itself.
    c.train.memory_limit = Some("1KiB".into());
    assert_eq!(judge_run("oom-model", &c, loose()).crashes, [Oom]);

    // Collapse: an (almost) untrained generator reconstructs nothing like the object; it did
    // not train either (counted apart).
    let mut c = tiny(&cache);
    c.train.lr = 1e-9;
    c.train.epochs = 1;
    c.train.evaluate = true;
    let r = judge_run("collapse", &c, Criteria { min_amp_ssim: 0.5, ..loose() });
    assert_eq!(r.crashes, [Collapse], "{:?}", r.reason);
    assert!(r.did_not_train, "{:?}", r.reason);
    assert!(r.amp_contrast.is_some_and(f64::is_finite), "{r:?}");

    // Validation loss: the same untrained run misses a 0.15 threshold when collapse is not checked.
    let mut r = r.clone();
    r.judge(&Criteria { max_val_loss: 0.15, ..loose() });
    assert_eq!(r.crashes, [ValLoss], "{:?}", r.reason);

    // A flat output is a collapse whatever its SSIM.
    r.amp_ssim = Some(0.9);
    r.amp_contrast = Some(0.01);
    r.judge(&Criteria { min_amp_ssim: 0.5, min_amp_contrast: 0.1, ..loose() });
    assert_eq!(r.crashes, [Collapse], "{:?}", r.reason);
    assert!(r.reason.as_deref().unwrap_or("").contains("flat"), "{:?}", r.reason);

    // Criteria that cannot mean anything are refused.
    for bad in [Criteria { explosion_factor: 1.0, ..loose() }, Criteria { min_amp_ssim: 2.0, ..loose() }, Criteria { max_val_loss: f64::NAN, ..loose() }] {
        assert!(bad.check().is_err(), "{bad:?}");
    }
}

#[test]
fn a_committed_sweep_reports_from_its_results_without_the_logs() {
    // A sweep directory that kept summary.json and result.json of each run (not the logs or the
    // checkpoints: what docs/experiments commits) reports the same and trains nothing.
    let dir = tempdir("committed");
    let mut c = tiny(&dir.join("cache"));
    c.faults.spike_steps = vec![9];
    c.train.spike_action = fnokern::config::SpikeAction::Log;
    let plan = Plan::new(SweepKind::CrashHunt, &c, vec![Arm::load("control").unwrap()], vec![2], vec![0, 1]).unwrap();
    let first = ex::run_sweep(&plan, &options(&dir), &quiet()).unwrap();
    for r in &first.results {
        let run = dir.join("runs").join(&r.name);
        for entry in std::fs::read_dir(&run).unwrap() {
            let p = entry.unwrap().path();
            let keep = p.file_name().is_some_and(|n| n == "summary.json" || n == "result.json");
            if !keep {
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        }
    }
    let again = ex::run_sweep(&plan, &options(&dir), &quiet()).unwrap();
    assert_eq!((again.ran, again.reused), (0, 2));
    assert_eq!(again.results, first.results);
    assert!(again.results.iter().all(|r| r.crashes == [CrashKind::Explosion]), "{:?}", again.results);
    // Each blew up and trained on to the end: crashed, and recovered.
    let g = &ex::report::groups(&plan, &again.results)[0];
    assert_eq!((g.crashed, g.recovered, g.runs), (2, 2, 2));
    // ... and judges them again under other criteria, training nothing (`--report-only`).
    let mut o = options(&dir);
    o.criteria.explosion_factor = 1e6;
    o.max_runs = Some(0);
    let rejudged = ex::run_sweep(&plan, &o, &quiet()).unwrap();
    assert!(rejudged.results.iter().all(|r| r.crashes.is_empty()), "{:?}", rejudged.results);
    // A result.json of another run is refused.
    let a = dir.join("runs").join(&first.results[0].name).join("result.json");
    let b = dir.join("runs").join(&first.results[1].name).join("result.json");
    std::fs::copy(&b, &a).unwrap();
    let err = ex::run_sweep(&plan, &options(&dir), &quiet()).unwrap_err().to_string();
    assert!(err.contains("holds run"), "{err}");
}

#[test]
fn arms_merge_over_the_base_and_bad_arms_are_refused() {
    let base = tiny(Path::new("cache"));
    let agc = Arm::load("agc").unwrap().apply(&base).unwrap();
    assert_eq!(agc.train.clip, fnokern::config::ClipKind::AgcUnit);
    assert_eq!(agc.train.agc_factor, 0.1);
    assert_eq!(agc.data, base.data, "an arm changes only what it names");
    let ls = Arm::load("layerscale").unwrap().apply(&base).unwrap();
    assert_eq!(ls.model.block, fnokern::config::BlockKind::Layerscale);
    assert_eq!(ls.train.clip, fnokern::config::ClipKind::None);

    // Every shipped arm loads and merges.
    for (name, _) in ex::BUILTIN_ARMS {
        Arm::load(name).unwrap().apply(&base).unwrap();
    }
    let bf16 = Arm::load("bf16").unwrap().apply(&base).unwrap();
    assert_eq!(bf16.train.precision, fnokern::Precision::Bf16);

    let typo = Arm { name: "typo".into(), overlay: "[train]\nclipp = \"none\"\n".into() };
    let err = typo.apply(&base).unwrap_err().to_string();
    assert!(err.contains("typo") && err.contains("clipp"), "{err}");
    let err = Arm::load("no-such-arm").unwrap_err().to_string();
    assert!(err.contains("control"), "{err}");
    let err = Plan::new(SweepKind::CrashHunt, &base, vec![Arm::load("control").unwrap()], vec![], vec![0]).unwrap_err();
    assert!(err.to_string().contains("at least one"));
}

#[test]
fn a_stability_map_runs_every_rate_and_reports_the_largest_stable_one() {
    let dir = tempdir("map");
    let mut base = tiny(&dir.join("cache"));
    base.train.evaluate = true;
    base.train.evaluate_best = true;
    // The guard off, as the sweeps run it.
    base.train.spike_action = fnokern::config::SpikeAction::Log;
    let plan = Plan::map(&base, vec![Arm::load("control").unwrap()], vec![2], vec![10.0, 1e-3], vec![0, 1]).unwrap();
    // Rates run ascending, each named in its runs' directories.
    assert_eq!(plan.lrs, vec![1e-3, 10.0]);
    let specs = plan.runs().unwrap();
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    // Seed by seed (a sweep cut short has as many seeds of every cell).
    assert_eq!(names, ["control-d2-lr1e-3-s0", "control-d2-lr1e1-s0", "control-d2-lr1e-3-s1", "control-d2-lr1e1-s1"]);
    assert_eq!(specs[1].config.train.lr, 10.0);

    let out = ex::run_sweep(&plan, &options(&dir), &quiet()).unwrap();
    assert!(out.complete());
    // Reported cell by cell.
    let reported: Vec<&str> = out.results.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(reported, ["control-d2-lr1e-3-s0", "control-d2-lr1e-3-s1", "control-d2-lr1e1-s0", "control-d2-lr1e1-s1"]);
    for r in &out.results {
        // An absurd rate is unstable (one way or another); a sane one is not.
        assert_eq!(r.unstable(), r.lr == Some(10.0), "{}: {:?} (initial loss {:?}, final {:?})", r.name, r.reason, r.initial_loss, r.final_val_loss);
        assert!(r.initial_loss.is_some_and(|l| l.is_finite() && l > 0.0), "{}", r.name);
        if !r.unstable() {
            // Quality is scored on the best epoch's weights.
            assert!(r.amp_ssim.is_some() && r.evaluated_epoch.is_some(), "{}", r.name);
        }
    }
    let cells = ex::map::cells(&plan, &out.results);
    assert_eq!(cells.iter().map(|c| (c.lr, c.unstable, c.runs)).collect::<Vec<_>>(), [(1e-3, 0, 2), (10.0, 2, 2)]);
    let edges = ex::map::edges(&plan, &cells);
    assert_eq!((edges[0].largest_stable_lr, edges[0].first_unstable_lr, edges[0].non_monotone), (Some(1e-3), Some(10.0), false));
    // 0 of 2 unstable: the exact 95% interval reaches 1 - 0.025^(1/2).
    assert!((edges[0].p_unstable_upper.unwrap() - (1.0 - 0.025f64.sqrt())).abs() < 1e-9);
    for f in ["report.md", "results.json", "map_control.png", "plan.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(report.contains("| control | 2 | 1e-3 (unstable at 1e1) |"), "{report}");

    // Another grid in the same directory is another sweep.
    let other = Plan::map(&base, vec![Arm::load("control").unwrap()], vec![2], vec![1e-3], vec![0, 1]).unwrap();
    assert!(!other.same_sweep(&plan));
    let err = ex::run_sweep(&other, &options(&dir), &quiet()).unwrap_err().to_string();
    assert!(err.contains("different sweep"), "{err}");
}

#[test]
fn stability_map_rates_are_checked_and_intervals_are_exact() {
    let base = tiny(Path::new("cache"));
    let control = || vec![Arm::load("control").unwrap()];
    for bad in [vec![], vec![1e-3, 1e-3], vec![0.0], vec![-1e-3], vec![f64::NAN]] {
        let err = Plan::map(&base, control(), vec![2], bad.clone(), vec![0]).unwrap_err().to_string();
        assert!(err.contains("learning rate"), "{bad:?}: {err}");
    }
    assert_eq!(ex::lr_label(3e-4), "3e-4");
    assert_eq!(ex::lr_label(2.5e-3), "2.5e-3");
    assert_eq!(ex::lr_label(0.1), "1e-1");
    // Clopper-Pearson 95% intervals (R: binom.test(k, n)$conf.int).
    let cp = ex::map::clopper_pearson;
    let close = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0).abs() < 1e-4 && (a.1 - b.1).abs() < 1e-4;
    assert!(close(cp(0, 5), (0.0, 0.5218)), "{:?}", cp(0, 5));
    assert!(close(cp(5, 5), (0.4782, 1.0)), "{:?}", cp(5, 5));
    assert!(close(cp(2, 5), (0.0527, 0.8534)), "{:?}", cp(2, 5));
    assert!(close(cp(1, 10), (0.0025, 0.4450)), "{:?}", cp(1, 10));
}

#[test]
fn shards_share_one_sweep_and_run_each_run_once() {
    let dir = tempdir("shards");
    let base = tiny(&dir.join("cache"));
    let plan = Plan::new(SweepKind::CrashHunt, &base, vec![Arm::load("control").unwrap()], vec![2], vec![0, 1, 2, 3, 4]).unwrap();
    // Two shards at once in one directory, as two processes of a job array would be.
    let outcomes: Vec<ex::SweepOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|k| {
                let (plan, dir) = (&plan, &dir);
                s.spawn(move || {
                    let mut o = options(dir);
                    o.jobs = 1;
                    o.threads = Some(1);
                    o.shard = Some(format!("{k}/2").parse().unwrap());
                    ex::run_sweep(plan, &o, &quiet()).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Shard 0 takes runs 0, 2, 4 and shard 1 runs 1, 3: each run once.
    assert_eq!((outcomes[0].ran, outcomes[1].ran), (3, 2));
    let names = |o: &ex::SweepOutcome| o.results.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    // A shard reports every run ended by its end: its own, and the other's that had ended. How
    // many of those depends on the two threads' timing, but the shard that reports later sees
    // all five (the other shard's runs all ended before it reported).
    for o in &outcomes {
        assert!(o.results.len() >= o.ran, "a shard reports its own runs: {:?}", names(o));
    }
    assert!(outcomes.iter().any(|o| o.results.len() == 5), "the later report has every run: {:?}", outcomes.iter().map(names).collect::<Vec<_>>());
    // Again: nothing to run, and every run ended.
    let again = ex::run_sweep(&plan, &options(&dir), &quiet()).unwrap();
    assert_eq!((again.ran, again.reused), (0, 5));
    assert!(again.complete());

    // The cost of a cell: the tiny config's 24 patterns in batches of 4, 3 epochs.
    let costs = ex::costs(&plan, Some("1/2".parse().unwrap())).unwrap();
    assert_eq!(costs.len(), 1);
    assert_eq!((costs[0].runs, costs[0].steps_per_run), (2, Some(18)));
    assert!(costs[0].parameters > 0 && costs[0].peak_bytes > 0);

    for bad in ["2/2", "0/0", "1", "a/2", "-1/2"] {
        let err = bad.parse::<ex::Shard>().unwrap_err().to_string();
        assert!(err.contains("INDEX/COUNT"), "{bad}: {err}");
    }
}
