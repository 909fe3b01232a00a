//! The grid-lines data: determinism, the cache, NPZ files (round trip and bad files), and the
//! physics forward model agreeing with the simulator.

use std::path::{Path, PathBuf};

use fnokern::autograd::Tape;
use fnokern::config::{DataConfig, LossConfig, LossKind};
use fnokern::data::{self, npz, simulate};
use fnokern::loss;
use fnokern::{DType, Device, Error, Tensor};

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "fnokern-data-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn small(dir: &Path, seed: u64) -> DataConfig {
    DataConfig {
        n: 16,
        object_size: 48,
        lines: 30,
        train_stride: 8,
        test_stride: 8,
        nphotons: 1e6,
        seed,
        cache_dir: dir.to_path_buf(),
        ..DataConfig::default()
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_data() {
    let (d1, d2) = (tempdir(), tempdir());
    let quiet = &mut |_: &str| {};
    let a = data::load_or_simulate(&small(&d1, 5), quiet).unwrap();
    // Past zip's 2-second timestamp resolution: a file stamped with the time would differ.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let b = data::load_or_simulate(&small(&d2, 5), quiet).unwrap();
    assert!(!a.from_cache && !b.from_cache);
    for f in ["train.npz", "test.npz"] {
        let fa = std::fs::read(data::cache_path(&small(&d1, 5)).join(f)).unwrap();
        let fb = std::fs::read(data::cache_path(&small(&d2, 5)).join(f)).unwrap();
        assert!(fa == fb, "{f} differs between two runs with the same seed");
    }
    let c = data::load_or_simulate(&small(&d2, 6), quiet).unwrap();
    assert_ne!(a.train.diffraction, c.train.diffraction);
    // 48-px objects, 16-px patches at stride 8: 5 x 5 patches per split.
    assert_eq!((a.train.len(), a.test.len()), (25, 25));
    assert!(a.train.diffraction.iter().all(|v| v.is_finite() && *v >= 0.0));
}

#[test]
fn a_second_run_reads_the_cache() {
    let d = tempdir();
    let mut said = Vec::new();
    let a = data::load_or_simulate(&small(&d, 1), &mut |m| said.push(m.to_string())).unwrap();
    let b = data::load_or_simulate(&small(&d, 1), &mut |m| said.push(m.to_string())).unwrap();
    assert!(!a.from_cache && b.from_cache);
    assert_eq!(a.train, b.train);
    assert_eq!(a.test, b.test);
    assert!(said.iter().any(|m| m.starts_with("reading the cached dataset")), "{said:?}");
    // Any change to the data's parameters is a different cache entry.
    let mut other = small(&d, 1);
    other.nphotons = 1e5;
    assert_ne!(data::cache_path(&other), data::cache_path(&small(&d, 1)));
}

#[test]
fn npz_round_trip_and_bad_files() {
    let d = tempdir();
    let ds = data::load_or_simulate(&small(&d, 2), &mut |_| {}).unwrap();
    let p = d.join("copy.npz");
    npz::save(&p, &ds.test).unwrap();
    assert_eq!(npz::load(&p).unwrap(), ds.test);

    let missing = npz::load(&d.join("nope.npz")).unwrap_err();
    assert!(matches!(missing, Error::Io { .. }) && missing.to_string().contains("nope.npz"), "{missing}");
    std::fs::write(d.join("junk.npz"), b"definitely not a zip").unwrap();
    let junk = npz::load(&d.join("junk.npz")).unwrap_err().to_string();
    assert!(junk.contains("junk.npz") && junk.contains("not an NPZ"), "{junk}");
    // A file without Y_phi: refused for training, and loads for a prediction (which needs only
    // the diffraction).
    let t = &ds.test;
    let (count, n) = (t.len() as u64, t.n as u64);
    let p2 = d.join("partial.npz");
    npz::save_arrays(
        &p2,
        &[
            npz::Array::F32("diffraction", vec![count, n, n], &t.diffraction),
            npz::Array::F32("Y_I", vec![count, n, n], &t.y_i),
            npz::Array::C64("probeGuess", vec![n, n], &t.probe),
        ],
    )
    .unwrap();
    let err = npz::load(&p2).unwrap_err().to_string();
    assert!(err.contains("`Y_phi` is missing"), "{err}");
    let inputs = npz::load_inputs(&p2).unwrap();
    assert_eq!((inputs.diffraction.len(), inputs.y_phi.len(), inputs.has_targets()), (t.diffraction.len(), 0, false));
    // An inconsistent split is not written at all (no partial file left behind).
    let mut bad = ds.test.clone();
    bad.y_phi.pop();
    let p3 = d.join("inconsistent.npz");
    assert!(npz::save(&p3, &bad).is_err());
    assert!(!p3.exists() && std::fs::read_dir(&d).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().contains(".tmp")));
    // The configured NPZ path must exist, and both splits are needed.
    let mut cfg = small(&d, 2);
    cfg.npz = Some(d.join("copy.npz"));
    let err = data::load_or_simulate(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("npz_test"), "{err}");
    cfg.npz_test = Some(d.join("absent.npz"));
    let err = data::load_or_simulate(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("absent.npz"), "{err}");
    cfg.npz_test = Some(p.clone());
    let loaded = data::load_or_simulate(&cfg, &mut |_| {}).unwrap();
    assert_eq!(loaded.test, ds.test);
}

/// `v` (C order, `shape` of 1 to 3 axes) in Fortran order: the first axis fastest.
fn fortran<T: Copy>(shape: &[u64], v: &[T]) -> Vec<T> {
    let d: Vec<usize> = shape.iter().map(|&x| x as usize).collect();
    let mut out = Vec::with_capacity(v.len());
    match d.as_slice() {
        [_] => out.extend_from_slice(v),
        [a, b] => (0..*b).for_each(|j| (0..*a).for_each(|i| out.push(v[i * b + j]))),
        [a, b, c] => (0..*c).for_each(|k| (0..*b).for_each(|j| (0..*a).for_each(|i| out.push(v[(i * b + j) * c + k])))),
        _ => unreachable!(),
    }
    out
}

/// An NPZ whose arrays numpy stored in Fortran order (`np.savez(f, x=np.asfortranarray(x))`)
/// reads as the same split as the C-ordered file: each array is put back in C order.
#[test]
fn fortran_ordered_arrays_read_as_numpy_reads_them() {
    use npyz::WriterBuilder;
    use rustfft::num_complex::Complex;
    type W = npyz::npz::NpzWriter<std::io::BufWriter<std::fs::File>>;
    fn put<T: npyz::AutoSerialize + Copy>(w: &mut W, key: &str, shape: &[u64], c_order: &[T]) {
        let opts = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        let mut a = w.array::<T>(key, opts).unwrap().default_dtype().shape(shape).order(npyz::Order::Fortran).begin_nd().unwrap();
        a.extend(fortran(shape, c_order)).unwrap();
        a.finish().unwrap();
    }
    let d = tempdir();
    let ds = data::load_or_simulate(&small(&d, 3), &mut |_| {}).unwrap();
    let t = &ds.test;
    let (count, n) = (t.len() as u64, t.n as u64);
    let complex = |v: &[[f32; 2]]| v.iter().map(|z| Complex::new(z[0], z[1])).collect::<Vec<_>>();
    let (side, gt) = t.ground_truth.clone().unwrap();
    let centres = t.centres.clone().unwrap();
    let p = d.join("fortran.npz");
    {
        let mut w = npyz::npz::NpzWriter::create(&p).unwrap();
        put(&mut w, "diffraction", &[count, n, n], &t.diffraction);
        put(&mut w, "Y_I", &[count, n, n], &t.y_i);
        put(&mut w, "Y_phi", &[count, n, n], &t.y_phi);
        put(&mut w, "probeGuess", &[n, n], &complex(&t.probe));
        put(&mut w, "YY_ground_truth", &[side as u64, side as u64], &complex(&gt));
        put(&mut w, "xcoords", &[count], &centres.iter().map(|c| c.1).collect::<Vec<f64>>());
        put(&mut w, "ycoords", &[count], &centres.iter().map(|c| c.0).collect::<Vec<f64>>());
        put(&mut w, "object_index", &[count], t.object_index.as_ref().unwrap());
    }
    // The test split's patterns are not symmetric, so a transposed read would differ.
    assert_ne!(fortran(&[count, n, n], &t.diffraction), t.diffraction);
    assert_eq!(npz::load(&p).unwrap(), *t);
}

/// The cache is used only when its files are the ones its params.json lists: swapped splits or
/// a damaged byte are said and the data made again (the same data); a killed writer's temporary
/// files are removed by the next writer.
#[test]
fn a_damaged_or_swapped_cache_is_made_again_and_killed_writers_leave_nothing() {
    let d = tempdir();
    let cfg = small(&d, 4);
    let dir = data::cache_path(&cfg);
    let fresh = data::load_or_simulate(&cfg, &mut |_| {}).unwrap();
    let reload = |what: &str| {
        let mut said = Vec::new();
        let ds = data::load_or_simulate(&cfg, &mut |m| said.push(m.to_string())).unwrap();
        assert!(!ds.from_cache, "{what}: the damaged cache was used");
        assert!(said.iter().any(|m| m.contains("is damaged")), "{what}: {said:?}");
        assert_eq!((&ds.train, &ds.test), (&fresh.train, &fresh.test), "{what}");
        assert!(data::load_or_simulate(&cfg, &mut |_| {}).unwrap().from_cache, "{what}: the cache made again is not used");
    };
    // Swapped splits (here both hold 25 patterns, so only the sums tell them apart).
    std::fs::rename(dir.join("train.npz"), dir.join("x.npz")).unwrap();
    std::fs::rename(dir.join("test.npz"), dir.join("train.npz")).unwrap();
    std::fs::rename(dir.join("x.npz"), dir.join("test.npz")).unwrap();
    reload("swapped");
    // One damaged byte in the values.
    let mut bytes = std::fs::read(dir.join("test.npz")).unwrap();
    bytes[2000] ^= 1;
    std::fs::write(dir.join("test.npz"), bytes).unwrap();
    reload("a damaged byte");
    // A writer killed before params.json: its temporary file goes when the next one writes.
    std::fs::remove_file(dir.join("params.json")).unwrap();
    std::fs::write(dir.join(".train.npz.tmp4242.npz"), b"half of a file").unwrap();
    let mut said = Vec::new();
    let ds = data::load_or_simulate(&cfg, &mut |m| said.push(m.to_string())).unwrap();
    assert_eq!(ds.train, fresh.train);
    assert!(said.iter().any(|m| m.contains("removed 1 temporary file")), "{said:?}");
    let left: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| fnokern::io::is_temp_name(n)).collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The forward model run on the true object reproduces the simulator's noiseless diffraction:
/// with O = (Y e^{i phi}) / probe_scale, |fftshift(FFT2_ortho(O probe_scale P))| is the data.
#[test]
fn physics_forward_model_matches_the_simulator() {
    let n = 16;
    let obj = simulate::lines_object(48, 30, true, 4);
    let corners = simulate::patch_corners(48, n, 16);
    let (amp, ph) = simulate::cut(&obj, &corners, n);
    let probe = simulate::probe(n, 0.25, 1.0, 1.5);
    let s = simulate::intensity_scale(&amp, &probe, 1e6);
    let diff = simulate::diffract(&amp, &ph, &probe, n, s, false, 0);

    let dev = Device::cpu();
    let cfg = LossConfig::default();
    let count = corners.len();
    // Generator output [B, 2, N, N]: real parts, then imaginary parts, of Y e^{i phi} / probe_scale.
    let mut out = vec![0.0; count * 2 * n * n];
    for k in 0..count {
        for px in 0..n * n {
            let (a, f) = (amp[k * n * n + px] / cfg.probe_scale, ph[k * n * n + px]);
            out[(2 * k) * n * n + px] = a * f.cos();
            out[(2 * k + 1) * n * n + px] = a * f.sin();
        }
    }
    let out = Tensor::from_vec(out, [count, 2, n, n], &dev).unwrap();
    let p = Tensor::from_vec(probe.iter().flat_map(|z| [z[0], z[1]]).collect::<Vec<_>>(), [n, n, 2], &dev).unwrap();
    let sp = loss::scaled_probe(&p, &cfg).unwrap();
    let mut t = Tape::new();
    let o = t.constant(out);
    let pred = loss::predicted_amplitude(&mut t, &o, &sp).unwrap().value().to_f64_vec().unwrap();
    for (i, (a, b)) in pred.iter().zip(&diff).enumerate() {
        assert!((a - b).abs() < 1e-9 * (1.0 + b.abs()), "pixel {i}: {a} vs {b}");
    }
    // And every loss is (near) zero there, and positive elsewhere.
    let obs = t.constant(Tensor::from_vec(diff.clone(), [count, 1, n, n], &dev).unwrap());
    let yi: Vec<f64> = (0..count * n * n).map(|k| amp[k] * (probe[k % (n * n)][0].hypot(probe[k % (n * n)][1]))).collect();
    let yi = t.constant(Tensor::from_vec(yi, [count, 1, n, n], &dev).unwrap());
    let yp = t.constant(Tensor::from_vec(ph.clone(), [count, 1, n, n], &dev).unwrap());
    let targets = loss::Targets { diffraction: &obs, y_i: &yi, y_phi: &yp };
    for kind in [LossKind::NormalizedAmplitudeMae, LossKind::SupervisedL1] {
        let c = LossConfig { kind, ..LossConfig::default() };
        let l = loss::objective(&mut t, &c, &o, &targets, &sp).unwrap().value().scalar_value().unwrap();
        assert!(l.abs() < 1e-9, "{kind:?}: {l}");
    }
    let zero = t.constant(Tensor::zeros([count, 2, n, n], DType::F64, &dev).unwrap());
    let c = LossConfig::default();
    let l = loss::objective(&mut t, &c, &zero, &targets, &sp).unwrap().value().scalar_value().unwrap();
    assert!((l - 1.0).abs() < 1e-6, "a zero object misses everything: {l}");
}

#[test]
fn bad_data_configs_are_named() {
    let mut c = DataConfig { object_size: 8, n: 16, ..DataConfig::default() };
    assert!(c.validate().unwrap_err().to_string().contains("object_size (8) is smaller than the patch size n (16)"));
    c = DataConfig { train_stride: 0, ..DataConfig::default() };
    assert!(c.validate().unwrap_err().to_string().contains("strides"));
    c = DataConfig { nphotons: -1.0, ..DataConfig::default() };
    assert!(c.validate().unwrap_err().to_string().contains("nphotons"));
}
