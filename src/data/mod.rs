//! Data: the grid-lines simulator, the Darcy flow generator (`darcy`), NPZ files in the reference layout, the on-disk cache, batches,
//! and the physics forward model with the losses.

pub(crate) mod cache;
pub mod darcy;
pub mod npz;
pub mod simulate;

use std::path::PathBuf;

use crate::config::DataConfig;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use npz::NpzSplit;

/// Bumped whenever the simulation changes, so that old caches are not reused.
const SIM_VERSION: u32 = 1;

/// A training and a test split with their probe.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub train: NpzSplit,
    pub test: NpzSplit,
    /// Where it came from: the cache directory or the NPZ files.
    pub source: String,
    /// Whether it was read from an existing cache rather than simulated now.
    pub from_cache: bool,
}

/// FNV-1a over bytes: a stable key for the cache (std's hasher may change between releases).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The cache directory of a config: every field that changes the data, hashed.
pub fn cache_path(cfg: &DataConfig) -> PathBuf {
    let mut key = cfg.clone();
    key.cache_dir = PathBuf::new();
    key.npz = None;
    key.npz_test = None;
    let text = format!("v{SIM_VERSION}:{}", serde_json::to_string(&key).unwrap_or_default());
    cfg.cache_dir.join(format!("gridlines-{:016x}", fnv1a(text.as_bytes())))
}

fn to_split(sim: &simulate::SimSplit, probe: &[[f64; 2]], n: usize) -> NpzSplit {
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let half = n as f64 / 2.0;
    let obj = &sim.objects[0];
    NpzSplit {
        n,
        diffraction: f32s(&sim.diffraction),
        y_i: f32s(&sim.y_i),
        y_phi: f32s(&sim.y_phi),
        probe: probe.iter().map(|p| [p[0] as f32, p[1] as f32]).collect(),
        // The first object of the split; stitching uses object_index to pick its patches.
        ground_truth: Some((
            obj.amplitude.size,
            obj.amplitude.data.iter().zip(&obj.phase.data).map(|(&a, &ph)| [(a * ph.cos()) as f32, (a * ph.sin()) as f32]).collect(),
        )),
        centres: Some(sim.origin.iter().map(|&(_, r, c)| (r as f64 + half, c as f64 + half)).collect()),
        object_index: Some(sim.origin.iter().map(|&(i, _, _)| i as i64).collect()),
    }
}

/// About how many bytes the simulated data set holds in memory (patterns of diffraction, Y_I
/// and Y_phi in f32, and the objects); 0 for NPZ data, whose size the files give.
pub fn estimated_bytes(cfg: &DataConfig) -> u64 {
    let Some((train, test)) = pattern_counts(cfg) else { return 0 };
    let objects = (cfg.train_objects + cfg.test_objects) as u64 * (2 * cfg.object_size as u64).pow(2) * 8;
    (train + test) * (cfg.n as u64).pow(2) * 4 * 3 + objects
}

/// The (training, test) patterns the simulation makes: a regular grid of windows on each object;
/// None for NPZ data (its files say) or objects smaller than a pattern.
pub fn pattern_counts(cfg: &DataConfig) -> Option<(u64, u64)> {
    if cfg.npz.is_some() || cfg.object_size < cfg.n {
        return None;
    }
    let per_object = |stride: usize| (((cfg.object_size - cfg.n) / stride.max(1) + 1) as u64).pow(2);
    Some((cfg.train_objects as u64 * per_object(cfg.train_stride), cfg.test_objects as u64 * per_object(cfg.test_stride)))
}

/// Simulates, or reads the cache, or reads the configured NPZ files.
pub fn load_or_simulate(cfg: &DataConfig, progress: &mut dyn FnMut(&str)) -> Result<Dataset> {
    cfg.validate()?;
    if let Some(train) = &cfg.npz {
        let test = cfg.npz_test.as_ref().ok_or_else(|| Error::invalid("data config", "npz is set but npz_test is not: both splits are needed"))?;
        let ds = Dataset { train: npz::load(train)?, test: npz::load(test)?, source: format!("{} + {}", train.display(), test.display()), from_cache: false };
        if ds.train.n != cfg.n || ds.test.n != cfg.n {
            return Err(Error::invalid(
                "data config",
                format!("the NPZ patches are {}x{} / {}x{} but data.n is {}", ds.train.n, ds.train.n, ds.test.n, ds.test.n, cfg.n),
            ));
        }
        return Ok(ds);
    }
    let dir = cache_path(cfg);
    let source = dir.display().to_string();
    let read = |params: &serde_json::Value| -> Result<Dataset> {
        let ds = Dataset { train: npz::load(&dir.join("train.npz"))?, test: npz::load(&dir.join("test.npz"))?, source: source.clone(), from_cache: true };
        // The pattern counts params.json records: a swapped pair of splits, or a split of another
        // config, does not pass.
        let counts = (params["train_patterns"].as_u64(), params["test_patterns"].as_u64());
        if counts != (Some(ds.train.len() as u64), Some(ds.test.len() as u64)) || ds.train.n != cfg.n || ds.test.n != cfg.n {
            return Err(Error::invalid(
                "data cache",
                format!("its splits hold {} and {} patterns of {}x{}, not what params.json lists", ds.train.len(), ds.test.len(), ds.train.n, ds.train.n),
            ));
        }
        Ok(ds)
    };
    let mut make = |progress: &mut dyn FnMut(&str)| -> Result<(Dataset, serde_json::Value)> {
        progress(&format!(
            "simulating grid-lines data: {} + {} objects of {} px, N = {}, strides {}/{}",
            cfg.train_objects, cfg.test_objects, cfg.object_size, cfg.n, cfg.train_stride, cfg.test_stride
        ));
        let (train, test, probe, s) = simulate::simulate(cfg);
        let ds = Dataset { train: to_split(&train, &probe, cfg.n), test: to_split(&test, &probe, cfg.n), source: source.clone(), from_cache: false };
        for (name, split) in [("train.npz", &ds.train), ("test.npz", &ds.test)] {
            npz::save(&dir.join(name), split)?;
        }
        progress(&format!("cached at {}", dir.display()));
        let params = serde_json::json!({
            "simulation_version": SIM_VERSION,
            "config": cfg,
            "intensity_scale": s,
            "train_patterns": ds.train.len(),
            "test_patterns": ds.test.len(),
        });
        Ok((ds, params))
    };
    cache::read_or_make(&dir, &["train.npz", "test.npz"], "dataset", &read, &mut make, progress)
}

/// A batch: the model's input and what the losses compare against.
#[derive(Clone)]
pub struct Batch {
    /// Grid lines: the diffraction amplitudes [B, 1, N, N]; Darcy: the normalised coefficient
    /// with the grid coordinates [B, 3, s, s].
    pub input: Tensor,
    pub target: Target,
    /// Set when the batch is [A; B] with B_k the neighbour of A_k (the overlap term's batches).
    pub pairs: Option<crate::loss::Pairs>,
}

/// What a batch's loss compares the model's output with.
#[derive(Clone)]
pub enum Target {
    /// Grid lines: the illuminated object's amplitude and phase [B, 1, N, N] (the physics losses
    /// compare with the input itself).
    Ptycho { y_i: Tensor, y_phi: Tensor },
    /// Darcy: the solution field u [B, 1, s, s].
    Field(Tensor),
}

/// Patterns `idx` of one of a split's [count, N, N] stacks as a [B, 1, N, N] tensor on `dev`.
fn gather(split: &NpzSplit, stack: &[f32], what: &str, idx: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
    let n2 = split.n * split.n;
    let count = split.len();
    if let Some(&bad) = idx.iter().find(|&&i| i >= count) {
        return Err(Error::invalid("batch", format!("pattern {bad} of a split of {count}")));
    }
    if stack.len() != count * n2 {
        return Err(Error::invalid("batch", format!("the split holds no `{what}` for its {count} patterns")));
    }
    let v: Vec<f64> = idx.iter().flat_map(|&i| stack[i * n2..(i + 1) * n2].iter().map(|&x| x as f64)).collect();
    Tensor::from_f64_vec(v, [idx.len(), 1, split.n, split.n], dtype, dev)
}

/// The generator input alone (the diffraction amplitudes) of patterns `idx`, for a prediction.
pub fn inputs(split: &NpzSplit, idx: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
    gather(split, &split.diffraction, "diffraction", idx, dtype, dev)
}

/// Builds the batch of patterns `idx` of a split on `dev`.
pub fn batch(split: &NpzSplit, idx: &[usize], dtype: DType, dev: &Device) -> Result<Batch> {
    Ok(Batch {
        input: inputs(split, idx, dtype, dev)?,
        target: Target::Ptycho { y_i: gather(split, &split.y_i, "Y_I", idx, dtype, dev)?, y_phi: gather(split, &split.y_phi, "Y_phi", idx, dtype, dev)? },
        pairs: None,
    })
}

/// The split's probe as a [N, N, 2] tensor.
pub fn probe_tensor(split: &NpzSplit, dtype: DType, dev: &Device) -> Result<Tensor> {
    let v: Vec<f64> = split.probe.iter().flat_map(|p| [p[0] as f64, p[1] as f64]).collect();
    Tensor::from_f64_vec(v, [split.n, split.n, 2], dtype, dev)
}
