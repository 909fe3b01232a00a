//! The binary as a user runs it: `model`, `grad` (parity file), `gradcheck`, and bad input.

use std::path::PathBuf;

use fnokern::io::Named;
use fnokern::{DType, Device, Tensor};

mod common;
use common::bin;

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "fnokern-cli-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = bin().args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn model_depth_8_prints_its_table() {
    let (ok, out, err) = run(&["model", "--preset", "study", "--depth", "8"]);
    assert!(ok, "{err}");
    assert!(out.contains("depth 8") && out.contains("encoder.7") && out.contains("bottleneck") && out.contains("total"), "{out}");
    assert!(out.contains("widths <= max_channels (512): true"), "{out}");
    // Bare, it describes the model that a bare `fnokern train --depth 8` trains, and says so.
    let (ok, out, err) = run(&["model", "--depth", "8"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("preset cpu (no --config or --preset given)") && out.contains("widths <= max_channels (64): true"), "{out}");
}

#[test]
fn bad_input_is_a_one_line_error() {
    for (args, want) in [
        (vec!["model", "--depth", "0"], "depth must be at least 1"),
        (vec!["model", "--config", "/nonexistent/x.toml"], "/nonexistent/x.toml"),
        (vec!["model", "--set", "model.widht=3"], "unknown field `widht`"),
        (vec!["model", "--set", "model.max_channels=4"], "max_channels (4) is below width (8)"),
        (vec!["autopsy", "/nonexistent/run", "--steps", "1..5"], "holds no config.toml: not a run directory"),
        (vec!["autopsy", "/nonexistent/run", "--steps", "5..1"], "--steps takes A..B"),
    ] {
        let (ok, _, err) = run(&args);
        assert!(!ok, "{args:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn grad_writes_loss_output_and_every_gradient() {
    let d = tempdir();
    let w = d.join("w.safetensors");
    let small = ["--set", "model.depth=2", "--set", "model.width=4", "--set", "model.modes=3", "--set", "data.n=16"];
    let mut args = vec!["model"];
    args.extend(small);
    args.extend(["--save-weights", w.to_str().unwrap()]);
    let (ok, _, err) = run(&args);
    assert!(ok, "{err}");

    let dev = Device::cpu();
    let x = Tensor::rand_uniform([2, 1, 16, 16], 0.0, 1.0, 3, DType::F32, &dev).unwrap();
    let probe = Tensor::randn([16, 16, 2], 1.0, 4, DType::F32, &dev).unwrap();
    let batch = d.join("batch.safetensors");
    fnokern::io::save_tensors(
        &batch,
        &[Named { name: "diffraction".into(), tensor: &x, complex: false }, Named { name: "probe".into(), tensor: &probe, complex: true }],
        None,
    )
    .unwrap();
    let out = d.join("out.safetensors");
    let mut args = vec!["grad"];
    args.extend(small);
    args.extend(["--weights", w.to_str().unwrap(), "--batch", batch.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let (ok, stdout, err) = run(&args);
    assert!(ok, "{err}");
    assert!(stdout.lines().any(|l| l.starts_with("loss ")), "{stdout}");

    let file = fnokern::io::load_tensors(&out).unwrap();
    let loss = file["loss"].values[0];
    assert!(loss.is_finite() && loss > 0.0);
    assert_eq!(file["output"].shape.dims(), [2, 2, 16, 16]);
    let params = fnokern::io::load_tensors(&w).unwrap();
    for (name, p) in &params {
        let g = file.get(&format!("grad.{name}")).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.shape, p.shape, "{name}");
        assert_eq!(g.complex, p.complex, "{name}");
    }
    assert_eq!(file.len(), params.len() + 2);
    assert!(file["grad.lifter.0.weight"].values.iter().any(|v| *v != 0.0));

    // A batch without the probe is refused by name.
    fnokern::io::save_tensors(&batch, &[Named { name: "diffraction".into(), tensor: &x, complex: false }], None).unwrap();
    let (ok, _, err) = run(&args);
    assert!(!ok && err.contains("`probe` is missing"), "{err}");
}

#[test]
fn gradcheck_command_passes_and_says_so() {
    let (ok, out, err) = run(&["gradcheck", "--only", "conv"]);
    assert!(ok, "{err}");
    assert!(out.lines().last().unwrap_or("").ends_with("passed, 0 failed"), "{out}");
}

#[test]
fn plan_shows_depth8_24gb_needs_checkpointing_and_info_names_the_build() {
    let root = std::env::var("FNOKERN_ROOT").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let cfg = format!("{root}/configs/depth8-24gb.toml");
    let (ok, out, err) = run(&["plan", "--config", &cfg, "--mem-limit", "24GiB"]);
    assert!(ok, "{err}");
    assert!(out.contains("without checkpointing: 27.95 GiB") && out.contains("EXCEEDS 24.00 GiB"), "{out}");
    assert!(out.contains("checkpoint = every_level: 18.25 GiB") && out.contains("fits in 24.00 GiB"), "{out}");
    assert!(out.contains("decoder.0") && out.contains("head"), "{out}");
    let (ok, _, err) = run(&["plan", "--checkpoint", "every_zero"]);
    assert!(!ok && err.contains("every_K"), "{err}");

    let (ok, out, err) = run(&["info"]);
    assert!(ok, "{err}");
    assert!(out.contains("cuda kernels:") && (out.contains("gpu 0:") || out.contains("gpu: none usable")), "{out}");
}

/// `--device cuda` where there is no GPU: a one-line error before anything is written, whether the
/// binary was built without nvcc (a newcomer's build), the driver library is missing, or it sees
/// no device (the stand-in with FAKECUDA_DEVICES=0). Only on machines without a GPU.
#[test]
fn without_a_gpu_cuda_is_a_clear_error_and_writes_nothing() {
    if common::standin::real_gpu_present() {
        eprintln!("without a gpu: skipped: this machine has one");
        return;
    }
    let d = tempdir();
    let run_dir = d.join("run");
    let args = ["train", "--device", "cuda", "--out", run_dir.to_str().unwrap()];
    let check = |out: std::process::Output, want: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(last.starts_with("error: cuda") && last.contains(want), "{err}");
        assert!(!run_dir.exists(), "nothing is written before the device opens");
    };
    if !fnokern::build_info::KERNELS_EMBEDDED {
        // A newcomer's build (no nvcc): the binary says so before it looks for a driver.
        check(bin().args(args).env_remove("LD_LIBRARY_PATH").output().unwrap(), "built without nvcc");
        return;
    }
    // No driver library at all (LD_LIBRARY_PATH cleared).
    check(bin().args(args).env_remove("LD_LIBRARY_PATH").output().unwrap(), "libcuda");
    // A driver that sees no GPU.
    if let Some(dir) = common::standin::built("without a gpu") {
        check(bin().args(args).env("LD_LIBRARY_PATH", &dir).env("FAKECUDA_DEVICES", "0").output().unwrap(), "driver sees 0");
        let (ok, _, err) = run(&["train", "--device", "cuda:x"]);
        assert!(!ok && err.contains("cuda:N"), "{err}");
    }
}

/// `fnokern info` on the stand-in opens GPU 0 and checks an allocation, copies, a kernel, cuBLAS
/// and cuFFT against the CPU.
#[test]
#[cfg_attr(not(fnokern_kernels), ignore = "skipped: no kernels (built without nvcc; scripts/install-nvcc.sh installs it)")]
fn info_checks_a_gpu_it_finds() {
    let Some(dir) = common::standin::built("info") else { return };
    let out = bin().arg("info").env("LD_LIBRARY_PATH", &dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("stand-in") && text.contains("agree with the CPU"), "{text}");
}

/// Output into a pipe whose reader has gone (`fnokern info | head -1`) ends the process quietly:
/// no panic, no backtrace on stderr.
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills two new descriptors; the read end is closed at once, and the write
    // end is owned by the OwnedFd that becomes the child's stdout.
    let write_end = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        std::os::fd::OwnedFd::from_raw_fd(fds[1])
    };
    let out = bin()
        .args(["model", "--preset", "study", "--depth", "8"])
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
}

#[test]
fn a_sweep_dry_run_counts_runs_and_the_guard_is_off_unless_named() {
    let dir = tempdir();
    let out = dir.join("sweep");
    let peak = |extra: &[&str]| {
        let mut args = vec!["shootout", "--preset", "map", "--depths", "2,3", "--arms", "control,guard", "--seeds", "3", "--dry-run", "--step-ms", "2=10"];
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = run(&args);
        assert!(ok, "{stderr}");
        assert!(stdout.contains("12 runs (2 arms x 2 depths x 1 rates x 3 seeds = 12 in the plan)"), "{stdout}");
        // Depth 3 has no step time: its runs are left out of the hours, and said to be.
        assert!(stdout.contains("without 6 runs"), "{stdout}");
        let row = |arm: &str| {
            stdout.lines().find(|l| l.starts_with(arm) && l.split_whitespace().nth(1) == Some("2")).unwrap().split_whitespace().nth(5).unwrap().to_string()
        };
        (row("control "), row("guard "))
    };
    // The guard arm holds its rollback points; the control runs without them.
    let (control, guard) = peak(&[]);
    assert_ne!(control, guard);
    // Named on the command line, the guard is on for every arm.
    let (control_on, guard_on) = peak(&["--set", "train.spike_action=rollback"]);
    assert_eq!((control_on.as_str(), guard_on.as_str()), (guard.as_str(), guard.as_str()));
    assert!(!out.exists(), "a dry run writes nothing");
}
