//! A corpus of bad input, each given to the binary as a user would: every one is refused with a
//! one-line error naming what is wrong, exit status 1, no panic, and nothing that existed is
//! changed (a refused fresh run leaves no directory behind).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;
use common::{bin, tempdir, tiny};
use fnokern::io::Named;
use fnokern::{DType, Device, Tensor};

/// Every file under `dir` (but the lock) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != ".lock") {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[track_caller]
fn refused(args: &[&str], want: &str) {
    let out = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: exit {:?}, stderr {err}", out.status.code());
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(want), "{args:?}: wanted `{want}` in: {err}");
}

#[test]
fn every_bad_input_is_refused_up_front() {
    let root = tempdir("bad-input");
    let cfg = tiny(&root.join("cache"));
    let base = root.join("tiny.toml");
    std::fs::write(&base, toml::to_string(&cfg).unwrap()).unwrap();
    let base = base.to_str().unwrap();
    let mut kinds = 0;

    // Config values, each through --set on a valid config, for a run directory that must not
    // appear.
    let sets: &[(&str, &str)] = &[
        ("model.depth=0", "depth must be at least 1"),
        ("model.depth=1000", "at most 64"),
        ("model.width=0", "must be at least 1"),
        ("model.width=1000000", "at most 65536"),
        ("model.max_channels=2", "below width"),
        ("model.min_resolution=0", "min_resolution"),
        ("model.norm_eps=-1", "norm_eps"),
        ("model.block=resnet", "unknown variant `resnet`"),
        ("model.widht=3", "unknown field `widht`"),
        ("data.n=1", "n must be in [2, 8192]"),
        ("data.object_size=8", "smaller than the patch size"),
        ("data.object_size=100000000", "object_size"),
        ("data.lines=1000000000000", "lines"),
        ("data.train_stride=0", "strides"),
        ("data.nphotons=-1", "nphotons"),
        ("data.probe_radius=0.9", "probe_radius"),
        ("data.train_objects=0", "at least one object"),
        ("loss.probe_scale=-1", "probe_scale"),
        ("loss.eps=nan", "eps must be"),
        ("train.lr=-1", "lr must be a positive number"),
        ("train.lr=nan", "lr must be a positive number"),
        ("train.epochs=0", "epochs"),
        ("train.epochs=4611686018427387904", "at most 10^6"),
        ("train.batch_size=0", "batch_size"),
        ("train.beta1=1.5", "beta1"),
        ("train.clip_max_norm=0", "clip_max_norm"),
        ("train.spike_factor=0.5", "spike_factor"),
        ("train.loss_scale_init=1e300", "at most 2^24"),
        ("train.memory_limit=lots", "memory_limit"),
        ("train.device=tpu", "device `tpu`"),
        ("train.precision=fp8", "fp8"),
        ("faults.spike_scale=nan", "spike_scale"),
        ("nope.x=1", "unknown section `nope`"),
    ];
    for (i, (set, want)) in sets.iter().enumerate() {
        let out = root.join(format!("set{i}"));
        refused(&["train", "--config", base, "--set", set, "--out", out.to_str().unwrap()], want);
        assert!(!out.exists(), "--set {set}: {} was created", out.display());
        kinds += 1;
    }

    // Files: not TOML, missing, a model no machine holds, NPZ data missing, not a zip, or
    // inconsistent.
    let fresh = |k: &str| root.join(format!("fresh-{k}")).to_str().unwrap().to_string();
    std::fs::write(root.join("junk.toml"), "[model\ndepth = ").unwrap();
    refused(&["train", "--config", root.join("junk.toml").to_str().unwrap(), "--out", &fresh("junk")], "junk.toml");
    refused(&["train", "--config", "/nonexistent/run.toml", "--out", &fresh("missing")], "/nonexistent/run.toml");
    let huge = ["--set", "model.width=4096", "--set", "model.max_channels=8192", "--set", "train.batch_size=4096"];
    let mut args = vec!["train", "--config", base, "--out"];
    let f = fresh("huge");
    args.push(&f);
    args.extend(huge);
    refused(&args, "needs about");
    kinds += 3;

    let ds = fnokern::data::load_or_simulate(&cfg.data, &mut |_| {}).unwrap();
    let npz = root.join("npz");
    std::fs::create_dir_all(&npz).unwrap();
    fnokern::data::npz::save(&npz.join("train.npz"), &ds.train).unwrap();
    std::fs::write(npz.join("garbage.npz"), b"not a zip").unwrap();
    let mut short = ds.test.clone();
    short.object_index = short.object_index.map(|mut v| {
        v.pop();
        v
    });
    fnokern::data::npz::save(&npz.join("short_index.npz"), &short).unwrap();
    let mut outside = ds.test.clone();
    if let Some(c) = outside.centres.as_mut() {
        c[0] = (1e6, 3.0);
    }
    fnokern::data::npz::save(&npz.join("outside.npz"), &outside).unwrap();
    let mut no_zero = ds.test.clone();
    no_zero.object_index = no_zero.object_index.map(|v| v.iter().map(|_| 1).collect());
    fnokern::data::npz::save(&npz.join("no_object_0.npz"), &no_zero).unwrap();
    let p = |n: &str| format!("\"{}\"", npz.join(n).display());
    for (test, want) in [
        (p("missing.npz"), "missing.npz"),
        (p("garbage.npz"), "not an NPZ"),
        (p("short_index.npz"), "`object_index` has"),
        (p("outside.npz"), "is outside the"),
        (p("no_object_0.npz"), "no patch of object 0"),
    ] {
        let out = fresh(&format!("npz{kinds}"));
        let (a, b) = (format!("data.npz={}", p("train.npz")), format!("data.npz_test={test}"));
        refused(&["train", "--config", base, "--set", &a, "--set", &b, "--set", "train.evaluate=true", "--out", &out], want);
        assert!(!Path::new(&out).exists(), "{test}: {out} was created");
        kinds += 1;
    }

    // An existing run: a rerun without --resume, a resume under another config, a resume of a
    // directory that holds no run, a directory in use; none changes a byte.
    let run = root.join("run");
    let run_s = run.to_str().unwrap();
    let out = bin().args(["train", "--config", base, "--set", "train.epochs=1", "--out", run_s]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = snapshot(&run);
    refused(&["train", "--config", base, "--set", "train.epochs=1", "--out", run_s], "already holds a run");
    refused(&["train", "--resume", "--out", run_s, "--set", "model.width=6"], "model.width (4 in the run, 6 now)");
    refused(&["train", "--resume", "--out", root.join("nothing").to_str().unwrap()], "holds no config.toml");
    {
        let _held = fnokern::train::run_dir::DirLock::take(&run, "run").unwrap();
        refused(&["train", "--resume", "--out", run_s], "in use by another fnokern process");
    }
    assert_eq!(snapshot(&run), before, "a refused command changed the run directory");
    kinds += 4;

    // `grad`: a damaged weights file (one flipped byte), a batch that gives NaN, a missing file.
    let small = ["--set", "model.depth=2", "--set", "model.width=4", "--set", "model.modes=3", "--set", "data.n=16"];
    let w = root.join("w.safetensors");
    let mut args = vec!["model"];
    args.extend(small);
    args.extend(["--save-weights", w.to_str().unwrap()]);
    assert!(bin().args(&args).output().unwrap().status.success());
    let mut bytes = std::fs::read(&w).unwrap();
    let k = bytes.len() - 7;
    bytes[k] ^= 0x10;
    let flipped = root.join("flipped.safetensors");
    std::fs::write(&flipped, bytes).unwrap();
    let dev = Device::cpu();
    let nan = Tensor::full(f64::NAN, [1, 1, 16, 16], DType::F32, &dev).unwrap();
    let probe = Tensor::randn([16, 16, 2], 1.0, 4, DType::F32, &dev).unwrap();
    let batch = root.join("nan_batch.safetensors");
    fnokern::io::save_tensors(
        &batch,
        &[Named { name: "diffraction".into(), tensor: &nan, complex: false }, Named { name: "probe".into(), tensor: &probe, complex: true }],
        None,
    )
    .unwrap();
    let grad_out = root.join("grad.safetensors");
    for (weights, want) in [
        (flipped.to_str().unwrap(), "checksum mismatch"),
        (w.to_str().unwrap(), "are not finite"),
        ("/nonexistent/w.safetensors", "/nonexistent/w.safetensors"),
    ] {
        let mut args = vec!["grad"];
        args.extend(small);
        args.extend(["--weights", weights, "--batch", batch.to_str().unwrap(), "--out", grad_out.to_str().unwrap()]);
        refused(&args, want);
        assert!(!grad_out.exists(), "grad wrote its output after refusing");
        kinds += 1;
    }

    // Sweeps: a repeated cell, a sweep directory in use.
    refused(&["crash-hunt", "--config", base, "--depths", "2,2", "--out", &fresh("sweep")], "must not repeat");
    refused(&["stability-map", "--config", base, "--depths", "2", "--lrs", "1e-3,-1", "--out", &fresh("map1")], "learning rates must be finite and positive");
    refused(&["stability-map", "--config", base, "--depths", "2", "--lrs", "1e-3", "--arms", "nope", "--out", &fresh("map2")], "no arm `nope`");
    let held = root.join("held-sweep");
    {
        let _held = fnokern::train::run_dir::DirLock::take(&held, "sweep").unwrap();
        refused(&["crash-hunt", "--config", base, "--depths", "2", "--seeds", "1", "--out", held.to_str().unwrap()], "in use by another fnokern process");
    }
    kinds += 2;
    eprintln!("{kinds} kinds of bad input refused");
    assert!(kinds >= 30);
}

/// What a fresh user's campaign found accepted (issue 29): each is now refused with one line and
/// exit status 1, and nothing of the user's is changed.
#[test]
fn what_the_campaign_found_accepted_is_refused() {
    let root = tempdir("bad-input-29");
    let cfg = tiny(&root.join("cache"));
    let base = root.join("tiny.toml");
    std::fs::write(&base, toml::to_string(&cfg).unwrap()).unwrap();
    let base = base.to_str().unwrap();

    // NPZ data that cannot be read correctly: a damaged byte (numpy refuses its CRC-32), a
    // negative amplitude, a probe that lights nothing.
    let ds = fnokern::data::load_or_simulate(&cfg.data, &mut |_| {}).unwrap();
    let npz = root.join("npz");
    std::fs::create_dir_all(&npz).unwrap();
    fnokern::data::npz::save(&npz.join("train.npz"), &ds.train).unwrap();
    fnokern::data::npz::save(&npz.join("crc.npz"), &ds.test).unwrap();
    let mut bytes = std::fs::read(npz.join("crc.npz")).unwrap();
    // Inside `diffraction`'s values: past its zip and .npy headers, well before the next array.
    bytes[1000] ^= 0x40;
    std::fs::write(npz.join("crc.npz"), bytes).unwrap();
    let mut negative = ds.test.clone();
    negative.diffraction[5] = -0.25;
    fnokern::data::npz::save(&npz.join("negative.npz"), &negative).unwrap();
    let mut dark = ds.test.clone();
    dark.probe.iter_mut().for_each(|z| *z = [0.0, 0.0]);
    fnokern::data::npz::save(&npz.join("dark.npz"), &dark).unwrap();
    let p = |n: &str| format!("\"{}\"", npz.join(n).display());
    for (i, (test, want)) in [
        (p("crc.npz"), "`diffraction` is damaged: its bytes do not match the archive's CRC-32"),
        (p("negative.npz"), "`diffraction` holds a negative amplitude (-0.25"),
        (p("dark.npz"), "`probeGuess` is zero everywhere"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = root.join(format!("npz{i}"));
        let (a, b) = (format!("data.npz={}", p("train.npz")), format!("data.npz_test={test}"));
        refused(&["train", "--config", base, "--set", &a, "--set", &b, "--out", out.to_str().unwrap()], want);
        assert!(!out.exists(), "{test}: {} was created", out.display());
    }

    // Flags and fields that meant nothing: no epoch to stop after, no cache directory, a
    // gradient check that matches no check.
    let fresh = root.join("fresh");
    refused(&["train", "--config", base, "--stop-after-epochs", "0", "--out", fresh.to_str().unwrap()], "--stop-after-epochs must be at least 1");
    refused(&["train", "--config", base, "--set", "data.cache_dir=\"\"", "--out", fresh.to_str().unwrap()], "cache_dir is empty");
    assert!(!fresh.exists());
    refused(&["gradcheck", "--only", "no-such-op"], "no check's name contains `no-such-op`");

    // A model no machine holds, asked for its weights: refused before the allocation.
    let w = root.join("huge.safetensors");
    refused(
        &["model", "--set", "model.width=65536", "--set", "model.max_channels=65536", "--save-weights", w.to_str().unwrap()],
        "--save-weights (the parameters and their file) needs about",
    );
    assert!(!w.exists());

    // --out naming a directory of the user's: nothing written there, nothing removed (not even
    // a file named like fnokern's temporary files).
    let mine = root.join("my-files");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    std::fs::write(mine.join(".draft.tmp123"), "also mine").unwrap();
    let before = snapshot(&mine);
    refused(&["train", "--config", base, "--out", mine.to_str().unwrap()], "already holds files that fnokern did not write");
    refused(&["crash-hunt", "--config", base, "--depths", "2", "--seeds", "1", "--out", mine.to_str().unwrap()], "did not write");
    assert_eq!(snapshot(&mine), before);
    assert!(!mine.join(".lock").exists() && !mine.join("config.toml").exists());

    // Weights with a NaN predict nothing: refused, naming the parameter.
    let run = root.join("run");
    let out = bin().args(["train", "--config", base, "--set", "train.epochs=1", "--out", run.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dev = Device::cpu();
    let loaded = fnokern::io::load_tensors(&run.join("weights.safetensors")).unwrap();
    let first = loaded.keys().next().unwrap().clone();
    let tensors: Vec<(String, Tensor, bool)> = loaded
        .iter()
        .map(|(k, l)| {
            let t = l.to_tensor(DType::F32, &dev).unwrap();
            let t = if *k == first { Tensor::full(f64::NAN, t.dims().to_vec(), DType::F32, &dev).unwrap() } else { t };
            (k.clone(), t, l.complex)
        })
        .collect();
    let nan_w = root.join("nan.safetensors");
    let named: Vec<Named> = tensors.iter().map(|(k, t, c)| Named { name: k.clone(), tensor: t, complex: *c }).collect();
    fnokern::io::save_tensors(&nan_w, &named, None).unwrap();
    let pred = root.join("pred");
    refused(
        &["predict", run.to_str().unwrap(), "--weights", nan_w.to_str().unwrap(), "--device", "cpu", "--out", pred.to_str().unwrap()],
        &format!("parameter `{}` holds NaN or infinite values", first.trim_end_matches(".re").trim_end_matches(".im")),
    );
    assert!(!pred.exists());
    // A prediction into a directory of the user's is refused too; into its own earlier output,
    // it overwrites what it wrote.
    refused(&["predict", run.to_str().unwrap(), "--device", "cpu", "--out", mine.to_str().unwrap()], "not an fnokern prediction");
    assert_eq!(snapshot(&mine), before);
    for _ in 0..2 {
        let out = bin().args(["predict", run.to_str().unwrap(), "--device", "cpu", "--out", pred.to_str().unwrap()]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Arguments the parser refuses exit with status 2, as every --help says.
#[test]
fn argument_errors_exit_2_as_the_help_says() {
    for args in [vec!["train", "--no-such-flag"], vec!["no-such-command"], vec!["train", "--depth", "deep"]] {
        let out = bin().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    for args in [vec!["--help"], vec!["train", "--help"], vec!["crash-hunt", "--help"]] {
        let out = bin().args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("2 bad command-line arguments"), "{args:?}: {text}");
    }
}
