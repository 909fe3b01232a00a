//! Nothing lost: a `fnokern train` process killed at any moment (SIGKILL at many points, an abort
//! in the middle of each atomic write, before its first checkpoint or during one) resumes to the
//! same run bit for bit, with no temporary file left; SIGINT checkpoints and stops cleanly with
//! its summary and exit status 130. Each trial is a real process.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{bin, tempdir, tiny};
use fnokern::config::Config;

/// A run that takes about a second: long enough to be killed at many points.
fn config(cache: &Path) -> Config {
    let mut c = tiny(cache);
    c.model.width = 8;
    c.train.epochs = 5;
    c.train.train_patterns = 96;
    c.train.checkpoint_every = 2;
    c
}

fn write_config(root: &Path, cfg: &Config) -> PathBuf {
    let path = root.join("run.toml");
    std::fs::write(&path, toml::to_string(cfg).unwrap()).unwrap();
    path
}

fn spawn(args: &[&str], abort_in_write: Option<u64>) -> Child {
    let mut cmd = bin();
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(k) = abort_in_write {
        cmd.env("FNOKERN_ABORT_IN_WRITE", k.to_string());
    }
    cmd.spawn().unwrap()
}

fn step_lines(dir: &Path) -> usize {
    std::fs::read(dir.join("metrics.jsonl"))
        .map(|b| b.split(|&c| c == b'\n').filter(|l| l.starts_with(br#"{"epoch""#) && l.windows(6).any(|w| w == b"\"step\"")).count())
        .unwrap_or(0)
}

/// Waits until the run in `dir` has logged `lines` steps (or ended), then kills it.
fn kill_after(mut child: Child, dir: &Path, lines: usize) -> bool {
    let t0 = Instant::now();
    while step_lines(dir) < lines && t0.elapsed() < Duration::from_secs(60) {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

/// Resumes the run in `dir` to its end (by its own config.toml when it has one).
fn resume(dir: &Path, config: &Path) -> std::process::Output {
    let d = dir.to_str().unwrap();
    let mut args = vec!["train", "--resume", "--out", d];
    if !dir.join("config.toml").is_file() {
        args.extend(["--config", config.to_str().unwrap()]);
    }
    bin().args(&args).output().unwrap()
}

fn temp_files(dir: &Path) -> Vec<String> {
    [dir.to_path_buf(), dir.join("checkpoints")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| fnokern::io::is_temp_name(n))
        .collect()
}

fn final_state(dir: &Path) -> (String, Vec<(String, Vec<u64>)>) {
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let w = fnokern::train::load_final_weights(dir).unwrap().into_iter().map(|(k, v)| (k, v.values.iter().map(|x| x.to_bits()).collect())).collect();
    (metrics, w)
}

#[test]
fn killed_runs_resume_to_the_straight_run() {
    let root = tempdir("kill");
    let cfg = config(&root.join("cache"));
    let cfg_path = write_config(&root, &cfg);
    let straight = root.join("straight");
    let out = bin().args(["train", "--config", cfg_path.to_str().unwrap(), "--out", straight.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = final_state(&straight);
    let total = step_lines(&straight);

    // SIGKILL after 0 (before the first checkpoint), then more and more steps; then an abort in
    // the middle of each atomic write (config.toml, checkpoints, summary, weights).
    let mut trials: Vec<(String, Option<u64>, usize)> = Vec::new();
    for k in [0, 1, 3, 10, 23, 24, 25, 50, 71, 96, 100, total - 1] {
        trials.push((format!("kill after {k} steps"), None, k));
    }
    for k in 1..=9 {
        trials.push((format!("abort in atomic write {k}"), Some(k), 0));
    }
    let mut lost = Vec::new();
    for (i, (what, abort, lines)) in trials.iter().enumerate() {
        let dir = root.join(format!("trial{i}"));
        let d = dir.to_str().unwrap();
        let child = spawn(&["train", "--config", cfg_path.to_str().unwrap(), "--out", d], *abort);
        match abort {
            Some(_) => {
                let status = child.wait_with_output().unwrap().status;
                assert!(!status.success(), "{what}: the abort did not happen");
            }
            None => {
                let killed = kill_after(child, &dir, *lines);
                assert!(killed || *lines + 5 >= total, "{what}: the run ended before the kill");
            }
        }
        let out = resume(&dir, &cfg_path);
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || final_state(&dir) != want {
            lost.push(format!("{what}: exit {:?} {err}", out.status.code()));
            continue;
        }
        assert!(temp_files(&dir).is_empty(), "{what}: temporary files left: {:?}", temp_files(&dir));
    }
    eprintln!("{} kill trials, {} lost", trials.len(), lost.len());
    assert!(lost.is_empty(), "{} of {} trials lost the run:\n{}", lost.len(), trials.len(), lost.join("\n"));
}

#[test]
fn sigint_checkpoints_mid_epoch_and_the_resumed_run_is_the_straight_one() {
    let root = tempdir("sigint");
    let cfg = config(&root.join("cache"));
    let cfg_path = write_config(&root, &cfg);
    let straight = root.join("straight");
    assert!(bin().args(["train", "--config", cfg_path.to_str().unwrap(), "--out", straight.to_str().unwrap()]).output().unwrap().status.success());

    let dir = root.join("run");
    let child = spawn(&["train", "--config", cfg_path.to_str().unwrap(), "--out", dir.to_str().unwrap()], None);
    let t0 = Instant::now();
    while step_lines(&dir) < 30 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let s: fnokern::train::Summary = serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert!(s.interrupted && !s.finished && !s.crashed, "{s:?}");
    let out = resume(&dir, &cfg_path);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(final_state(&dir), final_state(&straight));
}
