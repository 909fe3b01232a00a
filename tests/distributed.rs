//! Data-parallel training over MPI, with real processes on loopback (`--features mpi`; CI installs
//! PyPI's mpich and runs these): N ranks train bit for bit as one process with `accumulate` N
//! times larger, guard events included; a killed rank ends the job and the run resumes exactly;
//! SIGTERM to one rank checkpoints and stops every rank with 130.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::parallel::{assert_same_run, config, run, single_gpu_run, GpuRuns};
use common::{bin, tempdir};

/// The launcher: FNOKERN_MPIEXEC, else `mpiexec` on PATH (the one of the MPI fnokern was built
/// with: PyPI's mpich puts both in the same bin/).
fn mpiexec() -> String {
    if let Ok(m) = std::env::var("FNOKERN_MPIEXEC") {
        return m;
    }
    let found = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("mpiexec")).find(|c| c.is_file()));
    match found {
        Some(p) => p.display().to_string(),
        None => panic!("a build with --features mpi needs its mpiexec: put the MPI's bin/ on PATH or set FNOKERN_MPIEXEC"),
    }
}

/// `fnokern train` on `ranks` processes (one rayon thread each), or one process when `ranks` is 1.
fn train_cmd(ranks: usize, args: &[&str]) -> Command {
    let exe = bin().get_program().to_owned();
    let mut c = if ranks == 1 {
        Command::new(&exe)
    } else {
        let mut c = Command::new(mpiexec());
        c.args(["-n", &ranks.to_string()]).arg(&exe);
        c
    };
    c.arg("train").args(args).env("RAYON_NUM_THREADS", "1");
    c
}

/// One process with `accumulate` = ranks x `per_rank`, and `ranks` processes with `per_rank`.
fn compare(tag: &str, ranks: usize, per_rank: usize, edit: impl Fn(&mut fnokern::config::Config)) -> serde_json::Value {
    let d = tempdir(tag);
    let single_cfg = config(&d.join("single"), |c| {
        edit(c);
        c.train.accumulate = ranks * per_rank;
    });
    let multi_cfg = config(&d.join("multi"), |c| {
        edit(c);
        c.train.accumulate = per_rank;
    });
    let (single, multi) = (d.join("single/run"), d.join("multi/run"));
    run(train_cmd(1, &["--config", single_cfg.to_str().unwrap(), "--out", single.to_str().unwrap()]));
    let out = run(train_cmd(ranks, &["--config", multi_cfg.to_str().unwrap(), "--out", multi.to_str().unwrap()]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("{ranks} ranks")), "the run says it trains on {ranks} ranks:\n{said}");
    assert_eq!(said.matches("run directory:").count(), 1, "rank 0 alone speaks:\n{said}");
    assert_same_run(&single, &multi);
    // The events each test plants happened (the same in both runs, as compared above).
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(multi.join("summary.json")).unwrap()).unwrap();
    summary
}

#[test]
fn two_ranks_train_as_one_process_with_accumulate_two() {
    compare("dp2", 2, 1, |_| {});
}

#[test]
fn four_ranks_train_as_one_process_with_accumulate_four() {
    compare("dp4", 4, 1, |_| {});
}

#[test]
fn two_ranks_accumulating_two_train_as_one_process_with_accumulate_four() {
    compare("dp2x2", 2, 2, |_| {});
}

/// Guard events on one rank's micro-batch: a bad input (the group then spans two rounds), a
/// spike that rolls back (the round's later micro-batch runs again on the restored weights) and a
/// logged spike, each where the single process meets it.
#[test]
fn guard_events_on_one_rank_are_handled_as_one_process_handles_them() {
    let s = compare("dpguard", 2, 1, |c| {
        c.train.spike_action = fnokern::config::SpikeAction::Rollback;
        c.faults.nan_input_steps = vec![3];
        c.faults.spike_steps = vec![8, 15];
        c.faults.spike_scale = 100.0;
    });
    assert_eq!((s["outcomes"]["skipped_bad_input"].as_u64(), s["outcomes"]["rolled_back"].as_u64()), (Some(1), Some(2)), "{s}");
    let s = compare("dpskip", 3, 1, |c| {
        c.train.spike_action = fnokern::config::SpikeAction::Skip;
        c.faults.nan_forward_steps = vec![4];
        c.faults.spike_steps = vec![10];
        c.faults.spike_scale = 100.0;
    });
    assert_eq!((s["outcomes"]["skipped_nonfinite_loss"].as_u64(), s["outcomes"]["spike_skipped"].as_u64()), (Some(1), Some(1)), "{s}");
}

/// fp16 with a scale that overflows at first (2^20 and 2^19 do on this model): the loss scaler
/// backs off on every rank exactly as one process's does, the overflow seen in the summed gradient
/// every rank holds.
#[test]
fn fp16_loss_scaling_on_two_ranks_backs_off_as_one_process_does() {
    let s = compare("dpfp16", 2, 1, |c| {
        c.train.precision = fnokern::Precision::Fp16;
        c.train.loss_scale_init = 2f64.powi(20);
    });
    assert_eq!(s["outcomes"]["overflow_skipped"], 2, "{s}");
}

/// The processes of a running `fnokern train` whose command line names `dir`.
fn ranks_of(dir: &Path) -> Vec<u32> {
    // Anchored at the binary: the launcher's own command line names the directory too.
    let exe = bin().get_program().to_string_lossy().into_owned();
    let out = Command::new("pgrep").arg("-f").arg(format!("^{exe} train .*{}", dir.display())).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Waits until `dir`'s metrics.jsonl has at least `lines` lines (false if `child` ended first).
fn wait_for_lines(child: &mut Child, dir: &Path, lines: usize) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(120) {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if std::fs::read_to_string(dir.join("metrics.jsonl")).is_ok_and(|s| s.lines().count() >= lines) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Waits for `child` to end, at most `limit`; kills it (and fails) past that.
fn ends_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("the job did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A longer tiny run (enough steps to be stopped mid-way), and its straight single-process twin.
fn long_runs(tag: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let d = tempdir(tag);
    let edit = |c: &mut fnokern::config::Config| {
        c.train.epochs = 12;
        c.train.checkpoint_every = 1;
    };
    let single_cfg = config(&d.join("single"), |c| {
        edit(c);
        c.train.accumulate = 2;
    });
    let multi_cfg = config(&d.join("multi"), edit);
    let single = d.join("single/run");
    run(train_cmd(1, &["--config", single_cfg.to_str().unwrap(), "--out", single.to_str().unwrap()]));
    (single, d.join("multi/run"), multi_cfg, d)
}

/// Once `job` (two ranks training into `dir`) is mid-way through an epoch after its first
/// checkpoint, sends `signal` to one of its ranks (the later started: either one must do).
fn signal_one_rank(job: &mut Child, dir: &Path, signal: i32) {
    assert!(wait_for_lines(job, dir, 12), "the job ran");
    let ranks = ranks_of(dir);
    assert_eq!(ranks.len(), 2, "two ranks run: {ranks:?}");
    let victim = *ranks.iter().max().unwrap();
    unsafe { libc::kill(victim as i32, signal) };
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_exactly() {
    let (single, multi, multi_cfg, _d) = long_runs("dpkill");
    let mut job =
        train_cmd(2, &["--config", multi_cfg.to_str().unwrap(), "--out", multi.to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    signal_one_rank(&mut job, &multi, libc::SIGKILL);
    let status = ends_within(&mut job, Duration::from_secs(60));
    assert!(!status.success(), "a job that lost a rank fails");
    let t0 = Instant::now();
    while !ranks_of(&multi).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no rank is left behind");
        std::thread::sleep(Duration::from_millis(100));
    }
    run(train_cmd(2, &["--config", multi_cfg.to_str().unwrap(), "--out", multi.to_str().unwrap(), "--resume"]));
    assert_same_run(&single, &multi);
}

#[test]
fn sigterm_to_one_rank_checkpoints_and_stops_every_rank_with_130() {
    let (single, multi, multi_cfg, _d) = long_runs("dpterm");
    let mut job = train_cmd(2, &["--config", multi_cfg.to_str().unwrap(), "--out", multi.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    signal_one_rank(&mut job, &multi, libc::SIGTERM);
    let status = ends_within(&mut job, Duration::from_secs(60));
    let out = job.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(status.code(), Some(130), "the job exits 130:\n{said}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("interrupted at step"), "rank 0 says it stopped:\n{said}");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(multi.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["interrupted"], true);
    run(train_cmd(2, &["--config", multi_cfg.to_str().unwrap(), "--out", multi.to_str().unwrap(), "--resume"]));
    assert_same_run(&single, &multi);
}

/// At another number of ranks, a resume needs the same micro-batches per update, and says so.
#[test]
fn a_resume_on_another_number_of_ranks_keeps_the_update_or_is_refused() {
    let d = tempdir("dpworld");
    let single_cfg = config(&d.join("single"), |c| c.train.accumulate = 4);
    let two = config(&d.join("two"), |c| c.train.accumulate = 2);
    let four = config(&d.join("four"), |c| c.train.accumulate = 1);
    let (single, multi) = (d.join("single/run"), d.join("run"));
    run(train_cmd(1, &["--config", single_cfg.to_str().unwrap(), "--out", single.to_str().unwrap()]));
    run(train_cmd(2, &["--config", two.to_str().unwrap(), "--out", multi.to_str().unwrap(), "--stop-after-epochs", "2"]));
    // Four ranks with accumulate 2 would take 8 micro-batches per update.
    let refused = train_cmd(4, &["--config", two.to_str().unwrap(), "--out", multi.to_str().unwrap(), "--resume"]).output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("train.accumulate = 4/4"), "the refusal says what would work:\n{err}");
    let out = run(train_cmd(4, &["--config", four.to_str().unwrap(), "--out", multi.to_str().unwrap(), "--resume"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("trained on 2 rank(s) and goes on on 4"));
    assert_same_run(&single, &multi);
}

/// On the driver stand-in with its fake NCCL (libnccl.so.2, which fnokern makes findable): two
/// GPU ranks, their gradients gathered through NCCL, train as one GPU process with accumulate 2.
#[test]
fn two_gpu_ranks_over_nccl_train_as_one_process_on_the_standin() {
    let Some(standin) = common::standin::built("two_gpu_ranks_over_nccl_train_as_one_process_on_the_standin") else { return };
    let GpuRuns { single, multi, multi_cfg, lib_path } = single_gpu_run("dpnccl", &standin);
    let mut two = train_cmd(2, &["--config", multi_cfg.to_str().unwrap(), "--out", multi.to_str().unwrap()]);
    two.env("LD_LIBRARY_PATH", &lib_path);
    let out = run(two);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("gradients through NCCL, this rank on cuda:0"), "the run says its gradients go through NCCL:\n{said}");
    assert_same_run(&single, &multi);
}

/// Without NCCL, a GPU run on two ranks stops at once, saying how to install it.
#[test]
fn gpu_ranks_without_nccl_are_refused_with_the_way_to_install_it() {
    let Some(standin) = common::standin::built("gpu_ranks_without_nccl_are_refused_with_the_way_to_install_it") else { return };
    let d = tempdir("dpnonccl");
    // The stand-in's driver, without its NCCL.
    let bare = d.join("lib");
    std::fs::create_dir_all(&bare).unwrap();
    for lib in ["libcuda.so", "libcublas.so", "libcufft.so"] {
        std::fs::copy(standin.join(lib), bare.join(lib)).unwrap();
    }
    let cfg = config(&d.join("run"), |c| c.train.device = "cuda".into());
    let mut two = train_cmd(2, &["--config", cfg.to_str().unwrap(), "--out", d.join("run/out").to_str().unwrap()]);
    two.env("LD_LIBRARY_PATH", &bare);
    let t0 = Instant::now();
    let out = two.output().unwrap();
    assert!(!out.status.success());
    assert!(t0.elapsed() < Duration::from_secs(60), "refused at once");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs NCCL") && err.contains("nvidia-nccl-cu13"), "the refusal says how to install NCCL:\n{err}");
}

/// Under mpiexec a sweep's ranks each run a shard of its runs, with no MPI between them: every
/// run is the one a single-process sweep trains, and the report covers them all.
#[test]
fn a_sweep_under_mpiexec_runs_a_shard_per_rank_with_the_same_runs() {
    let d = tempdir("dpsweep");
    let cfg = config(&d.join("cfg"), |c| c.train.epochs = 2);
    let sweep = |ranks: usize, out: &Path| {
        let exe = bin().get_program().to_owned();
        let mut c = if ranks == 1 {
            Command::new(&exe)
        } else {
            let mut c = Command::new(mpiexec());
            c.args(["-n", &ranks.to_string()]).arg(&exe);
            c
        };
        c.args(["crash-hunt", "--config", cfg.to_str().unwrap(), "--depths", "2", "--seeds", "3", "--jobs", "1", "--out", out.to_str().unwrap()])
            .env("RAYON_NUM_THREADS", "1");
        run(c)
    };
    let (single, multi) = (d.join("single"), d.join("multi"));
    sweep(1, &single);
    let out = sweep(2, &multi);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("rank 0 of 2 runs shard 0/2") && said.contains("rank 1 of 2 runs shard 1/2"), "{said}");
    let runs: Vec<_> = std::fs::read_dir(single.join("runs")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(runs.len(), 3, "{runs:?}");
    for r in &runs {
        let (a, b) = (single.join("runs").join(r), multi.join("runs").join(r));
        assert_eq!(std::fs::read_to_string(a.join("metrics.jsonl")).unwrap(), std::fs::read_to_string(b.join("metrics.jsonl")).unwrap(), "{r:?}");
    }
    assert!(multi.join("report.md").is_file(), "a report of the whole sweep");
}
