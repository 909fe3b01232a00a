//! Checkpoints: safetensors files holding the parameters (`param.<name>`), the optimiser's moments
//! (`opt_m.<name>`, `opt_v.<name>`), the rollback points (`good<i>.param.<name>`, ..., oldest
//! first; the newest is not stored again when it is the checkpoint's own state), and the run's
//! state as JSON in the metadata (`fnokern_state`, with each rollback point's epoch, optimiser
//! update count and spike window in `good_points`).
//! Every file carries a checksum over all of that (`io::CHECKSUM_KEY`), verified on load.
//!
//! A run directory may hold `last` (every epoch end, and where an interrupted run stopped),
//! `best` and `epoch_<K>`: a resume takes the newest one that loads, so a damaged `last` costs
//! at most the epochs since the one before it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::step::GoodPoint;
use super::{TrainState, Trainer};
use crate::autograd::ParamStore;
use crate::error::{Error, Result};
use crate::io::{self, io_err, Named};
use crate::optim::OptimizerState;
use crate::tensor::Tensor;

/// What a checkpoint restores: parameters, optimiser state, the rollback points (and whether the
/// newest is the checkpoint's own state), and the run's state.
pub(crate) struct Checkpoint {
    pub params: ParamStore,
    pub optimizer: OptimizerState,
    pub good: Vec<GoodPoint>,
    pub newest_is_current: bool,
    pub state: TrainState,
}

/// A rollback point's state besides tensors, in the checkpoint's run state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GoodMeta {
    pub epoch: usize,
    pub optimizer_updates: u64,
    pub window: Vec<f64>,
    /// The point is the checkpoint's own state: its tensors are not stored twice.
    pub current: bool,
}

fn push<'a>(v: &mut Vec<Named<'a>>, prefix: &str, params: &'a ParamStore, opt: &'a OptimizerState) {
    for (id, name, t) in params.iter() {
        v.push(Named { name: format!("{prefix}param.{name}"), tensor: t, complex: false });
        if let Some(m) = &opt.m[id.0] {
            v.push(Named { name: format!("{prefix}opt_m.{name}"), tensor: m, complex: false });
        }
        if let Some(s) = &opt.v[id.0] {
            v.push(Named { name: format!("{prefix}opt_v.{name}"), tensor: s, complex: false });
        }
    }
}

/// Writes the trainer (with its rollback points) and `state` to `path` atomically.
pub(crate) fn save(path: &Path, trainer: &Trainer, state: &TrainState) -> Result<()> {
    let (points, newest_is_current) = trainer.good();
    // The newest point, when it is the trainer's own state, is not stored twice.
    let is_current = |i: usize| newest_is_current && i + 1 == points.len();
    let mut state = state.clone();
    state.good_optimizer_updates = None;
    state.good_points = Some(
        points
            .iter()
            .enumerate()
            .map(|(i, p)| GoodMeta { epoch: p.epoch, optimizer_updates: p.optimizer.updates, window: p.window.clone(), current: is_current(i) })
            .collect(),
    );
    let mut meta = BTreeMap::new();
    meta.insert("fnokern_state".to_string(), serde_json::to_string(&state).map_err(|e| Error::invalid("checkpoint", e.to_string()))?);
    let mut named = Vec::new();
    push(&mut named, "", &trainer.model().params, trainer.optimizer_state());
    for (i, p) in points.iter().enumerate().filter(|(i, _)| !is_current(*i)) {
        push(&mut named, &format!("good{i}."), &p.params, &p.optimizer);
    }
    io::save_tensors(path, &named, Some(meta))
}

/// The run state of a checkpoint, from its header alone (a multi-GB file is not read).
pub(crate) fn read_state(path: &Path) -> Result<TrainState> {
    let bad = |why: String| io::bad(path, why);
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| bad("not a checkpoint: shorter than a safetensors header".into()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!("not a checkpoint: a {len}-byte header")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|_| bad("not a checkpoint: truncated header".into()))?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(format!("not a checkpoint: its header is not JSON ({e})")))?;
    let state = header["__metadata__"]["fnokern_state"].as_str().ok_or_else(|| bad("no trainer state in this file: not an fnokern checkpoint".into()))?;
    serde_json::from_str(state).map_err(|e| bad(format!("trainer state unreadable: {e}")))
}

/// Reads a checkpoint into fresh values shaped like `params`; nothing is changed on error.
pub(crate) fn load(path: &Path, params: &ParamStore) -> Result<Checkpoint> {
    let bad = |why: String| io::bad(path, why);
    let state = read_state(path)?;
    // Verifies the checksum, so a damaged file fails here as a whole.
    let mut file = io::load_tensors(path)?;
    let mut take = |key: String, like: &Tensor, required: bool| -> Result<Option<Tensor>> {
        match file.remove(&key) {
            Some(l) if l.shape == *like.shape() => Ok(Some(l.to_tensor(like.dtype(), like.device())?)),
            Some(l) => Err(bad(format!("`{key}` has shape {} but the model needs {}", l.shape, like.shape()))),
            None if required => Err(bad(format!("`{key}` is missing"))),
            None => Ok(None),
        }
    };
    let mut read = |prefix: &str, required: bool| -> Result<Option<(ParamStore, OptimizerState)>> {
        let mut out = params.clone();
        let mut opt = OptimizerState { m: vec![None; params.len()], v: vec![None; params.len()], updates: 0 };
        for (id, name, t) in params.iter() {
            let Some(p) = take(format!("{prefix}param.{name}"), t, required)? else { return Ok(None) };
            out.set(id, p)?;
            opt.m[id.0] = take(format!("{prefix}opt_m.{name}"), t, false)?;
            opt.v[id.0] = take(format!("{prefix}opt_v.{name}"), t, false)?;
        }
        Ok(Some((out, opt)))
    };
    let (params_out, optimizer) = read("", true)?.ok_or_else(|| bad("no parameters".into()))?;
    let (mut good, mut newest_is_current) = (Vec::new(), false);
    match &state.good_points {
        Some(metas) => {
            for (i, m) in metas.iter().enumerate() {
                if m.current {
                    // The checkpoint's own state, added by the trainer's restore.
                    newest_is_current = true;
                    continue;
                }
                let (p, mut o) = read(&format!("good{i}."), true)?.ok_or_else(|| bad(format!("rollback point {i} is missing")))?;
                o.updates = m.optimizer_updates;
                good.push(GoodPoint { params: p, optimizer: o, window: m.window.clone(), epoch: m.epoch });
            }
        }
        // Written before rollback points were stored at every epoch end: the point of a
        // mid-epoch checkpoint (`good.`), else the checkpoint's own state.
        None => match read("good.", false)? {
            Some((p, mut o)) => {
                o.updates = state.good_optimizer_updates.unwrap_or(0);
                good.push(GoodPoint { params: p, optimizer: o, window: Vec::new(), epoch: state.epochs_done });
            }
            None => newest_is_current = true,
        },
    }
    if let Some(extra) = file.keys().next() {
        return Err(bad(format!("`{extra}` does not belong to this model")));
    }
    Ok(Checkpoint { params: params_out, optimizer, good, newest_is_current, state })
}

/// The checkpoints of a run directory, newest first by the steps they hold (then `last` before
/// `epoch_<K>` before `best`), with the state each header holds. Files whose header cannot be
/// read come last, with their error, so that the caller can say why they were passed over.
pub(crate) fn candidates(dir: &Path) -> Vec<(PathBuf, Result<TrainState>)> {
    let ck = dir.join("checkpoints");
    let mut paths = vec![ck.join("last.safetensors")];
    if let Ok(entries) = fs::read_dir(&ck) {
        let mut epochs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("epoch_") && n.ends_with(".safetensors")))
            .collect();
        epochs.sort();
        paths.extend(epochs);
    }
    paths.push(ck.join("best.safetensors"));
    let mut found: Vec<(usize, PathBuf, Result<TrainState>)> =
        paths.into_iter().filter(|p| p.is_file()).enumerate().map(|(i, p)| (i, p.clone(), read_state(&p))).collect();
    found.sort_by_key(|(i, _, s)| match s {
        Ok(s) => (0, std::cmp::Reverse(s.trainer.steps), *i),
        Err(_) => (1, std::cmp::Reverse(0), *i),
    });
    found.into_iter().map(|(_, p, s)| (p, s)).collect()
}
