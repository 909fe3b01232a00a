//! What a user sees of a run: the guards' events on the terminal and in the logs, metrics.csv,
//! `fnokern predict` on a finished run, and help text that the parser agrees with.

use std::path::{Path, PathBuf};

use fnokern::data::npz;

mod common;
use common::{bin, tempdir, tiny};

fn write_config(root: &Path, cfg: &fnokern::config::Config) -> PathBuf {
    let p = root.join("config.toml");
    std::fs::write(&p, toml::to_string(cfg).unwrap()).unwrap();
    p
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = bin().args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn a_rollback_is_told_counted_logged_and_marked() {
    let root = tempdir("events");
    let mut cfg = tiny(&root.join("cache"));
    // 6 micro-batches per epoch: step 9 is the fourth of epoch 2.
    cfg.faults.spike_steps = vec![9];
    cfg.faults.spike_scale = 100.0;
    let c = write_config(&root, &cfg);
    let dir = root.join("run");
    let (ok, out, err) = run(&["train", "--config", c.to_str().unwrap(), "--out", dir.to_str().unwrap(), "--device", "auto"]);
    assert!(ok, "{err}");
    // `auto` says what it chose: here the CPU unless a real GPU is there.
    let auto = out.lines().find(|l| l.starts_with("device auto: ")).unwrap_or_else(|| panic!("{out}"));
    assert!(auto.starts_with("device auto: cuda:0") || auto.starts_with("device auto: cpu ("), "{auto}");
    if !common::standin::real_gpu_present() {
        assert!(auto.starts_with("device auto: cpu ("), "{auto}");
    }
    let told: Vec<&str> = out.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(told.len(), 1, "{out}");
    assert!(told[0].starts_with("step 9 (epoch 2): loss spike") && told[0].contains("rolled back to the weights of epoch 1's end"), "{out}");
    assert!(told[0].contains("learning rate now 5.00e-4"), "{out}");
    let epoch2 = out.lines().find(|l| l.starts_with("epoch   2/4")).unwrap();
    assert!(epoch2.ends_with("events: 1 rolled_back"), "{epoch2}");
    assert!(!out.lines().find(|l| l.starts_with("epoch   3/4")).unwrap().contains("events"), "{out}");
    assert!(out.contains("guard events: 1 rolled_back"), "{out}");

    // metrics.csv: the same records as metrics.jsonl, one row each, the spike's among them.
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let jsonl = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let mut rows = csv.lines();
    let header: Vec<&str> = rows.next().unwrap().split(',').collect();
    assert_eq!(header[..4], ["kind", "epoch", "step", "outcome"]);
    let rows: Vec<Vec<&str>> = rows.map(|r| r.split(',').collect()).collect();
    assert_eq!(rows.len(), jsonl.lines().count());
    assert!(rows.iter().all(|r| r.len() == header.len()));
    let spike = rows.iter().find(|r| r[3] == "rolled_back").expect("the rollback's row");
    assert_eq!(spike[2], "9");
    let reference: f64 = spike[header.iter().position(|h| *h == "spike_reference").unwrap()].parse().unwrap();
    let loss: f64 = spike[4].parse().unwrap();
    assert!(loss > 3.0 * reference, "{loss} vs {reference}");
    assert_eq!(rows.iter().filter(|r| r[0] == "epoch").count(), 4);
    assert!(dir.join("loss.png").is_file());
}

#[test]
fn predict_reconstructs_a_finished_runs_test_split_as_its_evaluation_did() {
    let root = tempdir("predict");
    let mut cfg = tiny(&root.join("cache"));
    cfg.train.evaluate = true;
    let c = write_config(&root, &cfg);
    let dir = root.join("run");
    let (ok, _, err) = run(&["train", "--config", c.to_str().unwrap(), "--out", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();

    let (ok, out, err) = run(&["predict", dir.to_str().unwrap(), "--device", "cpu"]);
    assert!(ok, "{err}");
    assert!(out.contains("the run's test split") && out.contains("against the ground truth: amplitude SSIM"), "{out}");
    let pred = dir.join("prediction");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(pred.join("metrics.json")).unwrap()).unwrap();
    // The same weights on the same patterns: the training's own final scores, to the bit.
    for k in ["amp_ssim", "amp_mae", "phase_ssim", "phase_mae", "amp_frc50"] {
        assert_eq!(m["metrics"][k], summary["metrics"][k], "{k}");
    }
    assert!(m["loss"].as_f64().is_some_and(|l| l.is_finite() && l > 0.0), "{m}");
    assert!(pred.join("reconstruction.png").is_file());
    let test = npz::load(
        &PathBuf::from(&cfg.data.cache_dir).join(std::fs::read_dir(&cfg.data.cache_dir).unwrap().next().unwrap().unwrap().file_name()).join("test.npz"),
    )
    .unwrap();
    let count = test.len();
    let z = std::fs::File::open(pred.join("prediction.npz")).unwrap();
    let mut arc = npyz::npz::NpzArchive::new(std::io::BufReader::new(z)).unwrap();
    let amp = arc.by_name("amplitude").unwrap().unwrap();
    assert_eq!(amp.shape(), [count as u64, 16, 16]);
    let amp: Vec<f32> = amp.into_vec().unwrap();
    let phase: Vec<f32> = arc.by_name("phase").unwrap().unwrap().into_vec().unwrap();
    let object: Vec<rustfft::num_complex::Complex<f32>> = arc.by_name("object").unwrap().unwrap().into_vec().unwrap();
    for i in [0, 77, amp.len() - 1] {
        assert!((object[i].norm() - amp[i]).abs() < 1e-5 && (object[i].arg() - phase[i]).abs() < 1e-4, "{i}");
    }
    let canvas = arc.by_name("canvas_amplitude").unwrap().unwrap();
    assert_eq!(canvas.shape(), [m["canvas"]["rows"].as_u64().unwrap(), m["canvas"]["cols"].as_u64().unwrap()]);

    // A file of diffraction patterns alone (what a user has): patches out, no scores.
    let only = root.join("patterns.npz");
    let n = 16u64;
    npz::save_arrays(&only, &[npz::Array::F32("diffraction", vec![3, n, n], &test.diffraction[..3 * 256])]).unwrap();
    let (ok, out, err) =
        run(&["predict", dir.to_str().unwrap(), "--input", only.to_str().unwrap(), "--weights", dir.join("checkpoints/best.safetensors").to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("input: 3 patterns") && !out.contains("against the ground truth"), "{out}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("prediction-patterns/metrics.json")).unwrap()).unwrap();
    assert!(m["metrics"].is_null() && m["loss"].is_null() && m["canvas"].is_null(), "{m}");
    let z = std::fs::File::open(dir.join("prediction-patterns/prediction.npz")).unwrap();
    let mut arc = npyz::npz::NpzArchive::new(std::io::BufReader::new(z)).unwrap();
    let first: Vec<f32> = arc.by_name("amplitude").unwrap().unwrap().into_vec().unwrap();
    // The best checkpoint is the last epoch's here (validation improves every epoch of this run).
    assert_eq!(first[..], amp[..3 * 256]);

    // Refusals name what is wrong.
    for (args, want) in [
        (vec!["predict", root.join("cache").to_str().unwrap()], "not a run directory"),
        (vec!["predict", root.to_str().unwrap()], "holds no weights.safetensors and no checkpoint"),
        (vec!["predict", dir.to_str().unwrap(), "--input", c.to_str().unwrap()], "not an NPZ"),
        (vec!["predict", dir.to_str().unwrap(), "--batch-size", "0"], "at least 1"),
    ] {
        let (ok, _, err) = run(&args);
        assert!(!ok && err.starts_with("error: ") && err.contains(want), "{args:?}: {err}");
    }
    let wrong_n = root.join("n8.npz");
    npz::save_arrays(&wrong_n, &[npz::Array::F32("diffraction", vec![1, 8, 8], &[0.5; 64])]).unwrap();
    let (ok, _, err) = run(&["predict", dir.to_str().unwrap(), "--input", wrong_n.to_str().unwrap()]);
    assert!(!ok && err.contains("8 x 8 patterns but the run's model takes 16 x 16"), "{err}");
}

/// The options a command's --help lists (long names, and whether each takes a value).
fn options(help: &str) -> Vec<(String, bool)> {
    help.lines()
        .map(str::trim_start)
        .filter_map(|l| {
            let l = l.strip_prefix("-h, ").or(Some(l)).filter(|l| l.starts_with("--") || l.get(4..).is_some_and(|r| r.starts_with("--")))?;
            let long = &l[l.find("--")?..];
            let name = long.split_whitespace().next()?.to_string();
            Some((name, long.split_whitespace().nth(1).is_some_and(|v| v.starts_with('<'))))
        })
        .filter(|(n, _)| n != "--help" && n != "--version")
        .collect()
}

#[test]
fn every_option_that_help_lists_is_accepted() {
    let (_, top, _) = run(&["--help"]);
    let commands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 10 && commands.contains(&"predict".to_string()), "{commands:?}");
    let bogus = "--no-such-option-xyz";
    let mut checked = 0;
    for cmd in &commands {
        let (ok, help, err) = run(&[cmd, "--help"]);
        assert!(ok, "{cmd}: {err}");
        for (opt, takes_value) in options(&help) {
            // The parser took the option (and its value) when what it rejects is the bogus flag.
            let values: &[&str] = if takes_value { &["2", "cpu", "control", "x", "0/1"] } else { &[""] };
            let accepted = values.iter().any(|v| {
                let mut args = vec![cmd.as_str()];
                if cmd == "predict" {
                    args.push("some-run");
                }
                args.push(&opt);
                if takes_value {
                    args.push(v);
                }
                args.push(bogus);
                let (_, _, err) = run(&args);
                err.contains(&format!("unexpected argument '{bogus}'"))
            });
            assert!(accepted, "`fnokern {cmd} --help` lists {opt}, which the parser refuses");
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} options found");
    // The help tells the truth about what changed.
    let (_, help, _) = run(&["crash-hunt", "--help"]);
    assert!(!help.contains("--depth ") && help.contains("--depths"), "{help}");
    let (_, help, _) = run(&["train", "--help"]);
    assert!(!help.contains("so far") && help.contains("auto"), "{help}");
}
