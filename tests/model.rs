//! The generator: its shape at depth 8, a parameter count derived by hand, whole-generator
//! gradient checks for every block variant, checkpointing, weights round trips and bad configs.
//! The checkpointing and weights tests run on each device (`test_device!`); the gradient checks
//! are f64 finite differences, which only the CPU computes, and the rest needs no device.

use fnokern::autograd::Tape;
use fnokern::config::{BlockKind, CheckpointPolicy, Config, ModelConfig, PrenormKind};
use fnokern::gradcheck::{check_with_params, Input, Tolerance};
use fnokern::model::{plan_grid_levels, plan_levels, weights, Generator, Grid, Transition};
use fnokern::{ops, DType, Device, Tensor};

mod common;
use common::tempdir;

fn small(block: BlockKind) -> ModelConfig {
    ModelConfig { depth: 3, width: 4, modes: 3, max_channels: 8, block, ..ModelConfig::default() }
}

#[test]
fn depth_8_at_n_64_builds_with_capped_widths() {
    let cfg = ModelConfig { depth: 8, ..ModelConfig::default() };
    let meta = Device::meta();
    let g = Generator::new(&cfg, 64, 1, &meta, DType::F32).unwrap();
    let levels = g.levels();
    assert_eq!(levels.len(), 8);
    let res: Vec<usize> = levels.iter().map(|l| l.resolution.rows).collect();
    assert_eq!(res, [64, 32, 16, 8, 4, 4, 4, 4], "halve while >= min_resolution 4, then keep");
    let widths: Vec<usize> = levels.iter().map(|l| l.width).collect();
    assert_eq!(widths, [32, 64, 128, 256, 512, 512, 512, 512]);
    assert!(widths.iter().all(|&w| w <= 512));
    assert_eq!(levels[3].next, Some(Transition::Down));
    assert_eq!(levels[4].next, Some(Transition::Same));
    assert!(g.num_params() > 0);
    assert!(g.describe().contains("total"));
    // Meta parameters hold no data but are accounted: 4 bytes per scalar.
    assert_eq!(meta.memory().current, 4 * g.num_params() as u64);
}

/// Hand derivation for depth 2, width 4, modes 3, N 8, max_channels 8, corners, ptycho blocks:
///   lifter: conv 1->4 3x3: 36 + 4 = 40; conv 4->4 3x3: 144 + 4 = 148               -> 188
///   encoder.0 (8x8, 4 ch): spectral rows 0..3 and 5..8 (6) x cols min(3, 5) = 3:
///     4*4*6*3*2 = 576; conv 148; down 2x2 4->8: 8*4*4 + 8 = 136                     -> 860
///   encoder.1 (4x4, 8 ch): spectral rows min(3,2) + min(3,2) = 4 x cols 3: 8*8*4*3*2 = 1536;
///     conv 8*8*9 + 8 = 584                                                           -> 2120
///   bottleneck (4x4, 8 ch, modes 1): rows 2 x cols 1: 8*8*2*1*2 = 256; conv 584      -> 840
///   decoder.0: up convT 8->4 2x2: 128 + 4; conv1 8->4 3x3: 288 + 4; conv2: 148       -> 572
///   head: 1x1 4->2: 8 + 2                                                            -> 10
///   total 188 + 860 + 2120 + 840 + 572 + 10 = 4590
#[test]
fn parameter_count_matches_the_hand_derivation() {
    let cfg = ModelConfig { depth: 2, width: 4, modes: 3, max_channels: 8, ..ModelConfig::default() };
    let g = Generator::new(&cfg, 8, 1, &Device::meta(), DType::F32).unwrap();
    assert_eq!(g.num_params(), 4590);
    let per_part: Vec<usize> = g.table().iter().map(|r| r.params).collect();
    assert_eq!(per_part, [188, 860, 2120, 840, 572, 10]);
}

#[test]
fn levels_keep_resolution_when_the_map_is_too_small() {
    let cfg = ModelConfig { depth: 4, min_resolution: 8, ..ModelConfig::default() };
    let res: Vec<usize> = plan_levels(&cfg, 16).iter().map(|l| l.resolution.rows).collect();
    assert_eq!(res, [16, 8, 8, 8]);
    // An odd map never halves (the transposed conv could not restore it).
    let res: Vec<usize> = plan_levels(&cfg, 18).iter().map(|l| l.resolution.rows).collect();
    assert_eq!(res, [18, 9, 9, 9]);
}

#[test]
fn rectangular_maps_halve_both_sides_or_neither() {
    let cfg = ModelConfig { depth: 4, min_resolution: 4, ..ModelConfig::default() };
    let sides: Vec<(usize, usize)> = plan_grid_levels(&cfg, Grid { rows: 16, cols: 24 }).iter().map(|l| (l.resolution.rows, l.resolution.cols)).collect();
    assert_eq!(sides, [(16, 24), (8, 12), (4, 6), (4, 6)], "4 x 6 stops: 2 < min_resolution");
    // One odd side keeps both.
    let sides: Vec<(usize, usize)> = plan_grid_levels(&cfg, Grid { rows: 16, cols: 10 }).iter().map(|l| (l.resolution.rows, l.resolution.cols)).collect();
    assert_eq!(sides, [(16, 10), (8, 5), (8, 5), (8, 5)]);
    // The spectral weights keep rows of both half-spectra of H and columns of W's rfft.
    let g = Generator::new_grid(&small(BlockKind::Ptycho), Grid { rows: 8, cols: 12 }, 1, &Device::meta(), DType::F32).unwrap();
    let enc0 = g.params.iter().find(|(_, n, _)| *n == "encoder.0.spectral.weight").map(|(_, _, t)| t.dims().to_vec()).unwrap();
    assert_eq!(g.table()[1].modes, Some((6, 3)));
    assert_eq!(enc0[2..4], [6, 3]);
    let cpu = Device::cpu();
    let g = Generator::new_grid(&small(BlockKind::Ptycho), Grid { rows: 8, cols: 12 }, 1, &cpu, DType::F32).unwrap();
    let mut t = Tape::with_params(&g.params);
    let x = t.constant(Tensor::zeros([1, 1, 12, 8], DType::F32, &cpu).unwrap());
    let err = g.forward(&mut t, &x).unwrap_err().to_string();
    assert!(err.contains("[B, C, H, W]"), "{err}");
}

/// Whole-generator gradient check (f64; depth 3, width 4, N 16) for the input and every parameter
/// of every block variant (up to 12 entries per tensor, spread over it).
fn whole_generator_check(block: BlockKind, prenorm: PrenormKind) {
    grid_generator_check(block, prenorm, Grid::square(16));
}

/// The same check on `grid` maps.
fn grid_generator_check(block: BlockKind, prenorm: PrenormKind, grid: Grid) {
    let dev = Device::cpu();
    let mut cfg = small(block);
    cfg.prenorm = prenorm;
    // Non-trivial gains, so that every branch carries gradient (zero_gamma starts at 0, which is
    // its point, but then its branch parameters would get exactly 0 and test nothing).
    let mut g = Generator::new_grid(&cfg, grid, 1, &dev, DType::F64).unwrap();
    let ids: Vec<_> =
        g.params.iter().filter(|(_, n, _)| n.ends_with("norm.weight") || n.ends_with(".scale")).map(|(id, _, v)| (id, v.shape().clone())).collect();
    for (k, (id, shape)) in ids.into_iter().enumerate() {
        g.params.set(id, Tensor::rand_uniform(shape, 0.5, 1.5, 50 + k as u64, DType::F64, &dev).unwrap()).unwrap();
    }
    let x = Tensor::randn([2, 1, grid.rows, grid.cols], 1.0, 7, DType::F64, &dev).unwrap();
    let gen = &g;
    let f = move |t: &mut Tape, v: &[fnokern::Var]| gen.forward(t, &v[0]);
    let report = check_with_params(&g.params, vec![Input::var(x)], &f, Tolerance::default(), 3, 12).unwrap();
    assert!(
        report.passed(),
        "{block:?}/{prenorm:?}: {} of {} wrong:\n{}",
        report.mismatches.len(),
        report.checked,
        report.mismatches.iter().take(6).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn gradcheck_generator_ptycho() {
    whole_generator_check(BlockKind::Ptycho, PrenormKind::Rms);
}
#[test]
fn gradcheck_generator_layerscale() {
    whole_generator_check(BlockKind::Layerscale, PrenormKind::Rms);
}
#[test]
fn gradcheck_generator_layerscale_norm() {
    whole_generator_check(BlockKind::LayerscaleNorm, PrenormKind::Rms);
}
#[test]
fn gradcheck_generator_prenorm_rms() {
    whole_generator_check(BlockKind::Prenorm, PrenormKind::Rms);
}
#[test]
fn gradcheck_generator_prenorm_layer() {
    whole_generator_check(BlockKind::Prenorm, PrenormKind::Layer);
}
#[test]
fn gradcheck_generator_zero_gamma() {
    whole_generator_check(BlockKind::ZeroGamma, PrenormKind::Rms);
}
#[test]
fn gradcheck_generator_on_rectangular_maps() {
    // 16 x 24 -> 8 x 12 -> 4 x 6: a swapped H and W anywhere in the model gives a wrong shape or
    // a wrong gradient here, where square maps hide it.
    grid_generator_check(BlockKind::LayerscaleNorm, PrenormKind::Rms, Grid { rows: 16, cols: 24 });
}

fn step(g: &Generator, x: &Tensor) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut t = Tape::with_params(&g.params);
    let xv = t.constant(x.clone());
    let out = g.forward(&mut t, &xv).unwrap();
    let o = out.value().to_f64_vec().unwrap();
    let loss = ops::sum_sq(&mut t, &out).unwrap();
    drop(out);
    let grads = t.backward(&loss).unwrap();
    (o, grads.params().iter().map(|g| g.as_ref().unwrap().to_f64_vec().unwrap()).collect())
}

test_device!(
    fn checkpointed_generator_gives_identical_gradients_and_meta_predicts_its_peak(dev) {
        let x_of = |dev: &Device| Tensor::randn([2, 1, 16, 16], 1.0, 7, DType::F32, dev).unwrap();
        let mut peaks = Vec::new();
        let mut results = Vec::new();
        for policy in [CheckpointPolicy::None, CheckpointPolicy::EveryLevel, CheckpointPolicy::EveryK(2)] {
            let mut cfg = small(BlockKind::Layerscale);
            cfg.checkpoint = policy;
            let real = Device::of_kind(dev.kind()).unwrap();
            let g = Generator::new(&cfg, 16, 1, &real, DType::F32).unwrap();
            let x = x_of(&real);
            real.reset_peak();
            results.push(step(&g, &x));
            // The same step on the meta device.
            let meta = Device::meta();
            let gm = Generator::new(&cfg, 16, 1, &meta, DType::F32).unwrap();
            let xm = x_of(&meta);
            meta.reset_peak();
            let mut t = Tape::with_params(&gm.params);
            let xv = t.constant(xm);
            let out = gm.forward(&mut t, &xv).unwrap();
            let loss = ops::sum_sq(&mut t, &out).unwrap();
            drop(out);
            let grads = t.backward(&loss).unwrap();
            drop(grads);
            assert_eq!(meta.memory().peak, real.memory().peak, "{policy}: meta peak vs {real} peak");
            peaks.push(real.memory().peak);
        }
        assert_eq!(results[0], results[1], "every_level changed the output or gradients");
        assert_eq!(results[0], results[2], "every_2 changed the output or gradients");
        assert!(peaks[1] < peaks[0], "checkpointing every level did not lower the peak: {peaks:?}");
    }
);

test_device!(
    fn weights_round_trip_gives_identical_outputs(dev) {
        let dir = tempdir("model");
        let path = dir.join("w.safetensors");
        let cfg = small(BlockKind::Prenorm);
        let a = Generator::new(&cfg, 16, 1, dev, DType::F32).unwrap();
        weights::save_params(&path, &a.params, None).unwrap();
        let mut other = cfg.clone();
        other.seed = 99;
        let mut b = Generator::new(&other, 16, 1, dev, DType::F32).unwrap();
        let x = Tensor::randn([2, 1, 16, 16], 1.0, 7, DType::F32, dev).unwrap();
        assert_ne!(step(&a, &x).0, step(&b, &x).0, "a different seed must give a different model");
        weights::load_params(&path, &mut b.params).unwrap();
        assert_eq!(step(&a, &x), step(&b, &x));
        // Spectral weights are stored as complex64 [in, out, kx, ky].
        let file = fnokern::io::load_tensors(&path).unwrap();
        let s = &file["encoder.0.spectral.weight"];
        assert!(s.complex);
        assert_eq!(s.shape.dims(), [4, 4, 6, 3, 2]);
    }
);

test_device!(
    fn loading_mismatched_weights_is_a_clear_error_and_changes_nothing(dev) {
        let dir = tempdir("model");
        let path = dir.join("w.safetensors");
        let a = Generator::new(&small(BlockKind::Ptycho), 16, 1, dev, DType::F32).unwrap();
        weights::save_params(&path, &a.params, None).unwrap();
        let mut wider = small(BlockKind::Ptycho);
        wider.width = 6;
        let mut b = Generator::new(&wider, 16, 1, dev, DType::F32).unwrap();
        let before: Vec<Vec<f64>> = b.params.values().iter().map(|t| t.to_f64_vec().unwrap()).collect();
        let err = weights::load_params(&path, &mut b.params).unwrap_err().to_string();
        assert!(err.contains("lifter.0.weight") && err.contains("[4, 1, 3, 3]") && err.contains("[6, 1, 3, 3]"), "{err}");
        let after: Vec<Vec<f64>> = b.params.values().iter().map(|t| t.to_f64_vec().unwrap()).collect();
        assert_eq!(before, after);
        let mut ls = Generator::new(&small(BlockKind::Layerscale), 16, 1, dev, DType::F32).unwrap();
        let err = weights::load_params(&path, &mut ls.params).unwrap_err().to_string();
        assert!(err.contains("`encoder.0.scale` is missing"), "{err}");
        std::fs::write(dir.join("junk.safetensors"), b"not a tensor file").unwrap();
        let err = weights::load_params(&dir.join("junk.safetensors"), &mut b.params).unwrap_err().to_string();
        assert!(err.contains("junk.safetensors") && err.contains("not a safetensors file"), "{err}");
    }
);

#[test]
fn bad_model_configs_are_named() {
    let cases = [
        ("[model]\ndepth = 0\n", "depth must be at least 1"),
        ("[model]\nwidth = 64\nmax_channels = 32\n", "max_channels (32) is below width (64)"),
        ("[model]\nmodes = 0\n", "modes (0) must be at least 1"),
        ("[model]\ndepht = 3\n", "unknown field `depht`"),
        ("[model]\nblock = \"resnet\"\n", "unknown variant `resnet`"),
        ("[model]\ncheckpoint = \"sometimes\"\n", "`sometimes` is not a policy"),
        ("[data]\nn = 32\n[model]\nmin_resolution = 64\n", "min_resolution (64)"),
        ("[loss]\nprobe_scale = -1.0\n", "probe_scale must be > 0"),
        ("[training]\nlr = 1\n", "unknown field `training`"),
    ];
    for (text, want) in cases {
        let err = Config::parse(text, "test.toml").unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}: {err}");
    }
    let mut cfg = Config::default();
    cfg.set("model.depth=6").unwrap();
    cfg.set("model.block=layerscale").unwrap();
    assert_eq!((cfg.model.depth, cfg.model.block), (6, BlockKind::Layerscale));
    assert!(cfg.set("model.nope=1").unwrap_err().to_string().contains("unknown field `nope`"));
    assert!(cfg.set("depth=1").is_err());
}

/// configs/default.toml documents every field; it must say exactly what the defaults are.
#[test]
fn the_documented_default_config_is_the_default() {
    // FNOKERN_ROOT: where configs/ is when the test runs from a bundle copied to another host.
    let root = std::env::var("FNOKERN_ROOT").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let path = std::path::Path::new(&root).join("configs/default.toml");
    assert_eq!(Config::load(&path).unwrap(), Config::default());
}

/// Every shipped config loads and validates; the reference's Stage A is the setting its header
/// names (REFERENCE section 3) and the deep study differs from it only in depth.
#[test]
fn the_shipped_configs_load_and_stage_a_is_the_reference_setting() {
    let root = std::env::var("FNOKERN_ROOT").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let dir = std::path::Path::new(&root).join("configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).validate().unwrap();
            seen += 1;
        }
    }
    assert!(seen >= 5, "{seen} configs");
    let a = Config::load(&dir.join("reference-stage-a.toml")).unwrap();
    assert_eq!((a.model.depth, a.model.width, a.model.modes, a.model.max_channels, a.data.n), (4, 32, 12, 512, 64));
    assert_eq!((a.data.train_objects, a.data.test_objects, a.data.phase), (2, 1, false));
    assert_eq!((a.train.epochs, a.train.batch_size, a.train.lr), (50, 16, 1e-3));
    assert_eq!((a.train.clip, a.train.clip_max_norm), (fnokern::config::ClipKind::GlobalNorm, 1.0));
    assert_eq!(a.train.optimizer, fnokern::config::OptimizerKind::Adam);
    let mut deep = Config::load(&dir.join("study-deep.toml")).unwrap();
    assert_eq!(deep.model.depth, 8);
    deep.model.depth = 4;
    deep.train.memory_limit = None;
    assert_eq!(deep, a);
}
