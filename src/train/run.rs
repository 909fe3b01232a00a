//! One run, in three parts: [`Run::open`] (the checks, the data, the directory, the trainer, a
//! resume or a fork), [`Run::epochs`] and [`Run::finish`] (the final weights, the evaluation,
//! the plots, the summary).
//!
//! On several ranks ([`crate::parallel`]) every rank runs all three in step, and every decision
//! that ends or changes the run is the same on every rank: a step's (replayed from everyone's
//! losses by [`Trainer::round`]), a stop request (any rank's, agreed at each round and epoch
//! end), a resume's checkpoint (rank 0's choice, sent to the others). Rank 0 alone touches the
//! run directory: its duties are [`RunFiles`]'s, which the other ranks do not have.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::checkpoint;
use super::run_dir::{self, DirLock, MetricsLog};
use super::workload::{self, Neighbours, RunData};
use super::{
    check_fits, eval_splits, evaluate, event_counts, event_line, plots, resume_point, run_config, subset, validate_sharded, warn_scale, write_csv,
    write_summary, Crash, Ending, RunOptions, StepAt, StepObserver, StepOutcome, Summary, TrainState, Trainer,
};
use crate::config::Config;
use crate::device::{Device, DeviceKind};
use crate::error::{Error, Result};
use crate::eval;
use crate::model::weights;
use crate::model::Generator;
use crate::optim;
use crate::parallel::World;

/// Each kind of event is told this many times per invocation, then only counted.
const TOLD_PER_KIND: u64 = 10;

/// Rank 0's duties: the run directory (held locked while the run is open), its metrics log, its
/// checkpoints, metrics.csv, the plots, the final weights and summary.json.
pub(super) struct RunFiles {
    dir: PathBuf,
    _lock: DirLock,
    log: MetricsLog,
}

impl RunFiles {
    fn checkpoint_path(&self, name: &str) -> PathBuf {
        self.dir.join("checkpoints").join(format!("{name}.safetensors"))
    }

    /// Writes checkpoint `name` (`last`, `best`, `epoch_K`).
    fn checkpoint(&self, name: &str, trainer: &Trainer, state: &TrainState) -> Result<()> {
        checkpoint::save(&self.checkpoint_path(name), trainer, state)
    }
}

/// How a run's start was settled on rank 0, for every rank.
#[derive(Serialize, Deserialize)]
enum Start {
    /// From the initial weights.
    Fresh,
    /// From this checkpoint of the run.
    Resume(PathBuf),
    /// Nothing to train: the run ended already (its summary), or ran out of memory before its
    /// first step (the summary of that crash).
    Ended(Box<Summary>),
}

pub(super) enum Opened<'a> {
    Run(Box<Run<'a>>),
    /// The run has nothing to do (finished already, or out of memory before training).
    Ended(Box<Summary>),
}

/// An open run: everything the epochs and the finish need.
pub(super) struct Run<'a> {
    cfg: &'a Config,
    opts: &'a RunOptions,
    world: World,
    started: Instant,
    dev: Device,
    ds: RunData,
    train_idx: Vec<usize>,
    val_idx: Vec<usize>,
    neighbours: Option<Neighbours>,
    trainer: Trainer,
    state: TrainState,
    /// The metrics so far (rank 0's, for metrics.csv and the plots; empty on the others).
    records: Vec<serde_json::Value>,
    preset: Option<String>,
    batches_per_epoch: usize,
    /// Training time before this invocation.
    base_wall: f64,
    files: Option<RunFiles>,
}

impl<'a> Run<'a> {
    /// Checks the config and the machine, loads the data, takes the run directory (rank 0),
    /// builds the trainer and continues a resumed or forked run. Nothing is written before the
    /// config, the device and the data are known to be good.
    pub(super) fn open(cfg: &'a Config, opts: &'a RunOptions, say: &mut dyn FnMut(&str)) -> Result<Opened<'a>> {
        let started = Instant::now();
        let world = opts.world.clone();
        let root = world.is_root();
        cfg.validate()?;
        // The device first: a GPU that is not there fails before anything is written. On several
        // ranks, each takes the GPU of its rank on its node (the config's, counted from there).
        let kind = match (cfg.train.device_kind()?, world.size()) {
            (DeviceKind::Cuda(i), n) if n > 1 => {
                let local = crate::parallel::Launch::from_env()?.and_then(|l| l.local_rank).unwrap_or(world.rank());
                let count = crate::backend::gpu::device_count()?.max(1);
                DeviceKind::Cuda((i + local) % count)
            }
            (k, _) => k,
        };
        let dev = Device::of_kind(kind)?;
        // On GPUs the ranks' gradients go through NCCL.
        if dev.kind().is_gpu() {
            world.attach_gpu(&dev)?;
        }
        // A config no machine could train is refused before anything is written.
        check_fits(cfg, &dev)?;
        // The data (rank 0 first: it may write the data cache the others read), and whether the
        // final evaluation can use it, before the directory is touched.
        let ds = world.root_first(|| {
            RunData::load(cfg, &mut |m| {
                if root {
                    say(m)
                }
            })
        })?;
        let train_idx = subset(ds.train_len(), cfg.train.train_patterns);
        let val_idx = subset(ds.test_len(), cfg.train.test_patterns);
        if train_idx.is_empty() || val_idx.is_empty() {
            return Err(Error::invalid(
                "train",
                format!("the data has {} training and {} test patterns: each split needs at least one", train_idx.len(), val_idx.len()),
            ));
        }
        if root && cfg.train.evaluate && !cfg.train.eval_seeds.is_empty() {
            eval_splits(cfg, &mut |m| say(m))?;
        }
        if let RunData::Gridlines(d) = &ds {
            if cfg.train.evaluate && cfg.train.eval_seeds.is_empty() && d.test.centres.is_some() && d.test.ground_truth.is_some() {
                eval::check_stitchable(&d.test).map_err(|e| {
                    Error::invalid(
                        "train",
                        format!("the test split cannot be stitched for the final evaluation ({e}); set train.evaluate = false to train without it"),
                    )
                })?;
            }
        }
        let dir = &opts.out_dir;
        let metrics_path = dir.join("metrics.jsonl");
        let last_path = dir.join("checkpoints/last.safetensors");
        let config_toml = toml::to_string(cfg).map_err(|e| Error::invalid("train", e.to_string()))?;
        // The preset the run started from: given, or (resumed by its directory alone) the one its
        // config.toml names, so that a resumed run's summary is the straight run's.
        let preset = opts.preset.clone().or_else(|| if opts.resume { run_dir::preset_of(dir) } else { None });
        let config_file = run_dir::config_file(&config_toml, preset.as_deref());
        // Rank 0 takes the directory; the others wait for it to be ready (or for the job to end).
        let lock = world.root_first(|| {
            if !root {
                return Ok(None);
            }
            run_dir::refuse_foreign(dir)?;
            let lock = DirLock::take(dir, "run")?;
            fs::create_dir_all(dir.join("checkpoints"))
                .map_err(|source| Error::Io { path: format!("cannot create the run directory {}", dir.display()), source })?;
            // Holding the lock, any temporary file here is a killed writer's.
            let stale = crate::io::remove_stale_temps(dir) + crate::io::remove_stale_temps(&dir.join("checkpoints"));
            if stale > 0 {
                say(&format!("removed {stale} temporary file(s) that a killed run left"));
            }
            if !opts.resume && (metrics_path.exists() || !checkpoint::candidates(dir).is_empty()) {
                return Err(Error::invalid("train", format!("{} already holds a run: continue it with --resume, or choose another --out", dir.display())));
            }
            if !opts.resume {
                // At once, so that a run killed before its first checkpoint can be resumed by its
                // directory alone.
                crate::io::write_atomic(&dir.join("config.toml"), config_file.as_bytes())?;
            }
            Ok(Some(lock))
        })?;

        dev.set_memory_limit(cfg.train.memory_limit_bytes()?);
        // `train.accumulate` is each rank's: an update takes that many micro-batches of every rank.
        let mut group_cfg = cfg.clone();
        group_cfg.train.accumulate = cfg.train.accumulate * world.size();
        let batches_per_epoch = train_idx.len().div_ceil(cfg.train.batch_size);
        let updates_per_epoch = batches_per_epoch.div_ceil(group_cfg.train.accumulate);
        let total_updates = (cfg.train.epochs * updates_per_epoch) as u64;
        // An allocation over the memory budget while the run is set up (the model, the probe, the
        // optimiser's state, a checkpoint's tensors) is an `oom` crash before the first step, with
        // its summary, as it is during training.
        let oom_before_training = |e: Error, say: &mut dyn FnMut(&str)| -> Result<Summary> {
            say(&format!("run crashed: {e}"));
            let summary = Summary {
                preset: preset.clone(),
                crashed: true,
                crash_kind: Some(Crash::Oom),
                reason: Some(e.to_string()),
                wall_seconds: started.elapsed().as_secs_f64(),
                ..Summary::default()
            };
            if root {
                write_summary(dir, &summary)?;
            }
            Ok(summary)
        };
        let built = Generator::for_run(cfg, &dev).and_then(|mut g| ds.prepare(&mut g).map(|()| g)).and_then(|g| {
            let probe = ds.probe(&dev)?;
            Trainer::new(&group_cfg, g, probe.as_ref(), total_updates)
        });
        let mut trainer = match built {
            Ok(t) => t,
            Err(e @ Error::OutOfMemory { .. }) => return Ok(Opened::Ended(Box::new(oom_before_training(e, say)?))),
            Err(e) => return Err(e),
        };
        // The overlap term's batches pair each pattern with a neighbour.
        let neighbours = (cfg.train.aux_loss == crate::config::AuxLoss::Overlap).then(|| ds.neighbours()).transpose()?;
        let mut state = TrainState {
            epochs_done: 0,
            trainer: trainer.state(),
            best_val: None,
            best_epoch: None,
            first_val: None,
            last_val: None,
            epoch_steps: 0,
            epoch_loss_sum: 0.0,
            epoch_loss_count: 0,
            good_optimizer_updates: None,
            good_points: None,
            wall_seconds: 0.0,
            epochs_without_improvement: 0,
            stopped_early: false,
            config: config_toml.clone(),
            world_size: (world.size() > 1).then_some(world.size()),
        };
        let mut records = Vec::new();
        if opts.resume {
            // Rank 0 chooses the checkpoint (it may have just repaired `last`); the others load
            // the one it chose.
            let mut chosen = None;
            let start = if root {
                let start = Run::resume_start(dir, cfg, &trainer, world.size(), say, &mut chosen);
                let start = match start {
                    Err(e @ Error::OutOfMemory { .. }) => Start::Ended(Box::new(oom_before_training(e, say)?)),
                    other => other?,
                };
                let text = serde_json::to_vec(&start).map_err(|e| Error::invalid("resume", e.to_string()))?;
                world.broadcast(0, &text)?;
                start
            } else {
                let text = world.broadcast(0, &[])?;
                serde_json::from_slice(&text).map_err(|e| Error::invalid("resume", format!("rank 0's resume point is unreadable: {e}")))?
            };
            match start {
                Start::Ended(s) => return Ok(Opened::Ended(s)),
                Start::Fresh => {
                    say(&format!("no complete checkpoint in {}: starting the run from its beginning", dir.display()));
                    if root {
                        run_dir::truncate_metrics(&metrics_path, 0, 0)?;
                    }
                }
                Start::Resume(ck_path) => {
                    let ck = match chosen.take() {
                        Some(ck) => ck,
                        None => checkpoint::load(&ck_path, &trainer.model().params)?,
                    };
                    let run_cfg = run_config(&ck.state, cfg, dir, world.size())?;
                    let ranks_then = ck.state.world_size.unwrap_or(1);
                    if ranks_then != world.size() {
                        say(&format!(
                            "the run trained on {ranks_then} rank(s) and goes on on {}: each update still takes {} micro-batches, in the same order",
                            world.size(),
                            group_cfg.train.accumulate
                        ));
                    }
                    trainer.restore(ck.state.trainer.clone(), ck.params, ck.optimizer, ck.good, ck.newest_is_current);
                    if root && ck_path != last_path {
                        // `last` is damaged or older than the checkpoint the run goes on from: it
                        // becomes that checkpoint, as the straight run's `last` was at that point.
                        crate::io::copy_atomic(&ck_path, &last_path)?;
                    }
                    if run_cfg.train.epochs != cfg.train.epochs {
                        trainer.set_horizon(total_updates);
                        say(&format!(
                            "extending the run from {} to {} epochs: the schedule now spans {total_updates} updates",
                            run_cfg.train.epochs, cfg.train.epochs
                        ));
                    }
                    state = TrainState { config: config_toml.clone(), world_size: (world.size() > 1).then_some(world.size()), ..ck.state };
                    if root {
                        let (kept, dropped) = run_dir::truncate_metrics(&metrics_path, trainer.steps(), state.epochs_done)?;
                        records = kept;
                        if dropped > 0 {
                            say(&format!("warning: dropped {dropped} unreadable line(s) of {}", metrics_path.display()));
                        }
                    }
                    let within = if state.epoch_steps > 0 { format!(" and {} steps of the next", state.epoch_steps) } else { String::new() };
                    say(&format!("resumed from {} after epoch {}{within} (step {})", ck_path.display(), state.epochs_done, trainer.steps()));
                }
            }
        } else if let Some(src) = &opts.fork {
            let ck = match checkpoint::load(src, &trainer.model().params) {
                Err(e @ Error::OutOfMemory { .. }) => return Ok(Opened::Ended(Box::new(oom_before_training(e, say)?))),
                other => other?,
            };
            if ck.state.epochs_done >= cfg.train.epochs {
                return Err(Error::invalid(
                    "fork",
                    format!("{} is after epoch {}: the fork's train.epochs ({}) must be more", src.display(), ck.state.epochs_done, cfg.train.epochs),
                ));
            }
            let changed = toml::from_str::<Config>(&ck.state.config).map(|c| run_dir::config_diff(&c, cfg)).unwrap_or_default();
            trainer.restore(ck.state.trainer.clone(), ck.params, ck.optimizer, ck.good, ck.newest_is_current);
            trainer.set_horizon(total_updates);
            state = TrainState {
                config: config_toml.clone(),
                stopped_early: false,
                epochs_without_improvement: 0,
                world_size: (world.size() > 1).then_some(world.size()),
                ..ck.state
            };
            // The history the fork continues: the other run's log up to its checkpoint.
            let source_log = src.parent().and_then(Path::parent).map(|d| d.join("metrics.jsonl")).filter(|p| p.is_file());
            if let (true, Some(log)) = (root, source_log) {
                crate::io::copy_atomic(&log, &metrics_path)?;
                records = run_dir::truncate_metrics(&metrics_path, trainer.steps(), state.epochs_done)?.0;
            }
            say(&format!(
                "forked from {} after epoch {} (step {}); changed: {}",
                src.display(),
                state.epochs_done,
                trainer.steps(),
                if changed.is_empty() { "nothing".to_string() } else { changed.join(", ") }
            ));
        }
        let files = match lock {
            Some(lock) => {
                crate::io::write_atomic(&dir.join("config.toml"), config_file.as_bytes())?;
                Some(RunFiles { dir: dir.clone(), _lock: lock, log: MetricsLog::open(&metrics_path)? })
            }
            None => None,
        };
        say(&format!(
            "training: {} parameters, {} train / {} validation patterns, batch {}, {} epochs, {} micro-batches per epoch{}",
            trainer.model().num_params(),
            train_idx.len(),
            val_idx.len(),
            cfg.train.batch_size,
            cfg.train.epochs,
            batches_per_epoch,
            if world.size() > 1 {
                format!(
                    ", {} ranks over {}{}: {} micro-batches per update ({} per rank)",
                    world.size(),
                    world.describe(),
                    if dev.kind().is_gpu() { format!(", gradients through NCCL, this rank on {dev}") } else { String::new() },
                    group_cfg.train.accumulate,
                    cfg.train.accumulate
                )
            } else {
                String::new()
            }
        ));
        let base_wall = state.wall_seconds;
        Ok(Opened::Run(Box::new(Run {
            cfg,
            opts,
            world,
            started,
            dev,
            ds,
            train_idx,
            val_idx,
            neighbours,
            trainer,
            state,
            records,
            preset,
            batches_per_epoch,
            base_wall,
            files,
        })))
    }

    /// Rank 0: where a resumed run starts (`chosen` gets the checkpoint it loaded).
    fn resume_start(
        dir: &Path,
        cfg: &Config,
        trainer: &Trainer,
        world_size: usize,
        say: &mut dyn FnMut(&str),
        chosen: &mut Option<checkpoint::Checkpoint>,
    ) -> Result<Start> {
        let Some((ck_path, ck)) = resume_point(dir, cfg, trainer, world_size, say)? else { return Ok(Start::Fresh) };
        let run_cfg = run_config(&ck.state, cfg, dir, world_size)?;
        if ck.state.epochs_done > cfg.train.epochs {
            return Err(Error::invalid("resume", format!("the run has done {} epochs, more than train.epochs = {}", ck.state.epochs_done, cfg.train.epochs)));
        }
        let finished = || fs::read(dir.join("summary.json")).ok().and_then(|b| serde_json::from_slice::<Summary>(&b).ok()).filter(|s| s.finished);
        if ck.state.stopped_early {
            if let Some(s) = finished() {
                say(&format!("{} stopped early after {} epochs (train.early_stopping_patience): nothing to do", dir.display(), ck.state.epochs_done));
                return Ok(Start::Ended(Box::new(s)));
            }
        }
        if ck.state.epochs_done == cfg.train.epochs && run_cfg.train.epochs == cfg.train.epochs {
            if let Some(s) = finished() {
                say(&format!("{} has finished all {} epochs: nothing to do (extend it with --set train.epochs=N)", dir.display(), cfg.train.epochs));
                return Ok(Start::Ended(Box::new(s)));
            }
        }
        *chosen = Some(ck);
        Ok(Start::Resume(ck_path))
    }

    /// Whether this process was asked to stop (a signal), or its observer asked.
    fn stop_requested(&self, observer_stop: bool) -> bool {
        observer_stop || self.opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// Saves `last` mid-epoch, after `steps_done` micro-batches of the epoch, and says the run
    /// was interrupted.
    fn interrupt_mid_epoch(&mut self, steps_done: usize, loss_sum: f64, loss_count: usize) -> Result<Ending> {
        self.state.trainer = self.trainer.state();
        self.state.epoch_steps = steps_done as u64;
        (self.state.epoch_loss_sum, self.state.epoch_loss_count) = (loss_sum, loss_count);
        self.state.wall_seconds = self.base_wall + self.started.elapsed().as_secs_f64();
        if let Some(f) = &mut self.files {
            f.log.sync()?;
            f.checkpoint("last", &self.trainer, &self.state)?;
        }
        Ok(Ending::Interrupted)
    }

    /// Trains the epochs left; an allocation over the memory budget, on any rank, ends the run
    /// as an `oom` crash.
    pub(super) fn epochs(&mut self, observer: &mut dyn StepObserver, say: &mut dyn FnMut(&str)) -> Result<Ending> {
        let total_steps = (self.cfg.train.epochs * self.batches_per_epoch) as u64;
        let bar = (self.opts.progress && self.world.is_root()).then(|| {
            let pb = indicatif::ProgressBar::new(total_steps);
            pb.set_style(
                indicatif::ProgressStyle::with_template("{pos}/{len} steps  {msg}  eta {eta} {wide_bar}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.set_position(self.trainer.steps());
            pb
        });
        observer.start(&mut self.trainer)?;
        // Lines on the terminal above the progress bar, or through `say` without one.
        let mut tell = |line: &str| match &bar {
            Some(pb) if !pb.is_hidden() => pb.println(line),
            _ => say(line),
        };
        let ending = match self.run_epochs(observer, &bar, &mut tell) {
            Ok(e) => Ok(e),
            Err(e @ Error::OutOfMemory { .. }) => Ok(Ending::Crashed(Crash::Oom, e.to_string())),
            Err(e) => Err(e),
        };
        if let Some(pb) = &bar {
            pb.finish_and_clear();
        }
        ending
    }

    fn run_epochs(&mut self, observer: &mut dyn StepObserver, bar: &Option<indicatif::ProgressBar>, tell: &mut dyn FnMut(&str)) -> Result<Ending> {
        let cfg = self.cfg;
        let (rank, size) = (self.world.rank(), self.world.size());
        let mut told: BTreeMap<StepOutcome, u64> = BTreeMap::new();
        let mut observer_stop = false;
        let mut ran_epochs = 0;
        let first_step = self.trainer.steps();
        let batches = self.batches_per_epoch;
        // A run that stopped early and was killed before it had finished resumes to its finish.
        if self.state.stopped_early {
            return Ok(Ending::EarlyStopped);
        }
        while self.state.epochs_done < cfg.train.epochs {
            let epoch = self.state.epochs_done;
            let mut order = self.train_idx.clone();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.train.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9)));
            let chunks: Vec<&[usize]> = order.chunks(cfg.train.batch_size).collect();
            // An interrupted epoch continues where it stopped.
            let mut bi = std::mem::take(&mut self.state.epoch_steps) as usize;
            let (mut loss_sum, mut loss_count) = (std::mem::take(&mut self.state.epoch_loss_sum), std::mem::take(&mut self.state.epoch_loss_count));
            let updates_before = self.trainer.updates();
            let outcomes_before = self.trainer.outcomes().clone();
            // Rounds of one micro-batch per rank; a round that ends early (an update or a
            // rollback before its last position) leaves the rest to the next.
            while bi < batches {
                let n = size.min(batches - bi);
                let mine = if rank < n {
                    let chunk = chunks[bi + rank];
                    Some(match &self.neighbours {
                        Some(nb) => self.ds.paired_batch(nb, chunk, &self.dev)?,
                        None => self.ds.batch(true, chunk, &self.dev)?,
                    })
                } else {
                    None
                };
                if size == 1 {
                    let (ds, dev) = (&self.ds, &self.dev);
                    let batch_of = |idx: &[usize]| ds.batch(true, idx, dev);
                    let at = StepAt { step: self.trainer.steps(), epoch, patterns: chunks[bi], batch_of: &batch_of };
                    observer.before_step(&mut self.trainer, &at)?;
                }
                let epoch_last = (batches - bi <= n).then(|| batches - bi - 1);
                let stop_here = self.stop_requested(observer_stop);
                let round = self.trainer.round(mine, n, epoch_last, &self.world, stop_here, &mut |p| observer.point(p))?;
                for r in &round.reports {
                    bi += 1;
                    if !observer.after_step(&self.trainer, r)? {
                        observer_stop = true;
                    }
                    if let Some(line) = event_line(r, epoch, &self.trainer) {
                        let k = told.entry(r.outcome).or_default();
                        *k += 1;
                        if *k <= TOLD_PER_KIND {
                            tell(&line);
                        }
                        if *k == TOLD_PER_KIND {
                            tell(&format!("({TOLD_PER_KIND} {} events told: more are counted in the epoch lines only)", r.outcome));
                        }
                    }
                    if let (Some(before), Some(after)) = (r.loss_scale, r.loss_scale_after) {
                        warn_scale(before, after, tell);
                    }
                    if let (true, Some(l)) = (r.outcome.backpropagated(), r.loss) {
                        loss_sum += l;
                        loss_count += 1;
                    }
                    if let Some(f) = &mut self.files {
                        let rec = r.record(epoch);
                        f.log.write(&rec)?;
                        self.records.push(rec);
                    }
                }
                if let Some(pb) = bar {
                    pb.set_position(self.trainer.steps());
                    let rate = (self.trainer.steps() - first_step) as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
                    let val = self.state.last_val.map_or(String::new(), |v| format!("  val {v:.4}"));
                    pb.set_message(format!(
                        "{rate:.2} steps/s  epoch {}/{}  loss {:.4}{val}",
                        epoch + 1,
                        cfg.train.epochs,
                        if loss_count > 0 { loss_sum / loss_count as f64 } else { f64::NAN }
                    ));
                }
                let failures = self.trainer.consecutive_failures();
                if failures >= cfg.train.max_consecutive_failures {
                    let last = round.reports.last().map_or(StepOutcome::SkippedBadInput, |r| r.outcome);
                    let kind = if last.is_spike() { Crash::Spike } else { Crash::Nonfinite };
                    return Ok(Ending::Crashed(kind, format!("{failures} failed steps in a row (last: {last})")));
                }
                // A stop waits for the group's update, then checkpoints mid-epoch (with the
                // rollback point, which is then not the checkpoint's own state).
                // One process sees a request made during the step at once (the autopsy's observer
                // ends its replay right after its window); ranks agree on it at the next round.
                let stop = round.stop || (size == 1 && self.stop_requested(observer_stop));
                if stop && !self.trainer.mid_group() && bi < batches {
                    return self.interrupt_mid_epoch(bi, loss_sum, loss_count);
                }
            }
            if let Some(ending) = self.end_epoch(epoch, updates_before, &outcomes_before, loss_sum, loss_count, tell)? {
                return Ok(ending);
            }
            ran_epochs += 1;
            if self.opts.stop_after_epochs.is_some_and(|k| ran_epochs >= k) {
                break;
            }
            let stop = self.world.any(self.stop_requested(observer_stop))?;
            if stop && self.state.epochs_done < cfg.train.epochs {
                return Ok(Ending::Interrupted);
            }
        }
        Ok(Ending::Done)
    }

    /// An epoch's end: the weights' check, validation, the schedule, the log, the checkpoints,
    /// early stopping. Returns how the run ends, if it ends here.
    fn end_epoch(
        &mut self,
        epoch: usize,
        updates_before: u64,
        outcomes_before: &BTreeMap<StepOutcome, u64>,
        loss_sum: f64,
        loss_count: usize,
        tell: &mut dyn FnMut(&str),
    ) -> Result<Option<Ending>> {
        let cfg = self.cfg;
        let model = self.trainer.model();
        let finite_weights = optim::sumsq_each(&model.params.values().iter().collect::<Vec<_>>())?.iter().all(|s| s.is_finite());
        if !finite_weights {
            return Ok(Some(Ending::Crashed(Crash::Nonfinite, "non-finite weights".into())));
        }
        if self.trainer.updates() == updates_before {
            return Ok(Some(Ending::Crashed(Crash::Nonfinite, format!("epoch {} made no update (every gradient was non-finite or skipped)", epoch + 1))));
        }
        let (ds, dev) = (&self.ds, &self.dev);
        let val = validate_sharded(model, &self.trainer.objective(), cfg.train.batch_size, &self.val_idx, &|chunk| ds.batch(false, chunk, dev), &self.world)?;
        if !val.is_finite() {
            return Ok(Some(Ending::Crashed(Crash::Nonfinite, "non-finite validation loss".into())));
        }
        let state = &mut self.state;
        let (good, bound) = self.trainer.end_epoch(val, epoch + 1, state.best_val);
        let rollbacks = cfg.train.spike_action == crate::config::SpikeAction::Rollback;
        state.first_val.get_or_insert(val);
        state.last_val = Some(val);
        state.epochs_done += 1;
        let train_loss = if loss_count > 0 { loss_sum / loss_count as f64 } else { f64::NAN };
        let events = event_counts(outcomes_before, self.trainer.outcomes());
        tell(&format!(
            "epoch {:>3}/{}: train loss {train_loss:.5}  val loss {val:.5}  lr {:.2e}  ({:.0} s){}",
            epoch + 1,
            cfg.train.epochs,
            self.trainer.lr(),
            self.started.elapsed().as_secs_f64(),
            if events.is_empty() { String::new() } else { format!("  events: {events}") }
        ));
        if rollbacks && !good {
            tell(&format!(
                "epoch {}'s end is not a rollback point: validation loss {val:.5} > {:.5} (train.good_point_factor x the best so far); \
                 a rollback goes to epoch {}'s end",
                epoch + 1,
                bound.unwrap_or(f64::NAN),
                self.trainer.rollback_target().map_or(0, |p| p.epoch)
            ));
        }
        state.trainer = self.trainer.state();
        state.wall_seconds = self.base_wall + self.started.elapsed().as_secs_f64();
        let patience = cfg.train.early_stopping_patience;
        if patience > 0 {
            let improved = state.best_val.is_none_or(|b| val < b - cfg.train.early_stopping_min_delta);
            state.epochs_without_improvement = if improved { 0 } else { state.epochs_without_improvement + 1 };
            state.stopped_early = state.epochs_without_improvement >= patience && state.epochs_done < cfg.train.epochs;
        }
        let best = state.best_val.is_none_or(|b| val < b);
        if best {
            state.best_val = Some(val);
            state.best_epoch = Some(state.epochs_done);
        }
        if let Some(f) = &mut self.files {
            let mut rec = json!({
                "kind": "epoch", "epoch": epoch, "steps_end": self.trainer.steps(), "train_loss": train_loss,
                "val_loss": val, "lr": self.trainer.lr(), "outcomes": self.trainer.outcomes(),
            });
            if rollbacks {
                rec["rollback_point"] = json!(good);
            }
            f.log.write(&rec)?;
            f.log.sync()?;
            self.records.push(rec);
            if best {
                f.checkpoint("best", &self.trainer, state)?;
            }
            if cfg.train.checkpoint_every > 0 && state.epochs_done.is_multiple_of(cfg.train.checkpoint_every) {
                f.checkpoint(&format!("epoch_{}", state.epochs_done), &self.trainer, state)?;
            }
            f.checkpoint("last", &self.trainer, state)?;
            if let Err(e) = write_csv(&f.dir, &self.records) {
                tell(&format!("warning: metrics.csv was not written: {e}"));
            }
        }
        Ok(state.stopped_early.then_some(Ending::EarlyStopped))
    }

    /// Ends the invocation as `ending` says: the final weights, the evaluation, metrics.csv, the
    /// plots and the summary (rank 0 writes them; every rank returns the summary).
    pub(super) fn finish(mut self, ending: Ending, say: &mut dyn FnMut(&str)) -> Result<Summary> {
        let cfg = self.cfg;
        let root = self.files.is_some();
        let dir = self.opts.out_dir.clone();
        let state = &self.state;
        let (crash, interrupted) = match ending {
            Ending::Done => (None, false),
            Ending::EarlyStopped => {
                say(&format!(
                    "early stopping after epoch {}: no validation loss below the best ({:.5}, epoch {}) by more than {} for {} epochs",
                    state.epochs_done,
                    state.best_val.unwrap_or(f64::NAN),
                    state.best_epoch.unwrap_or(0),
                    cfg.train.early_stopping_min_delta,
                    state.epochs_without_improvement
                ));
                if root && cfg.train.early_stopping_restore_best {
                    let best = dir.join("checkpoints/best.safetensors");
                    let ck = checkpoint::load(&best, &self.trainer.model().params)?;
                    self.trainer.set_params(ck.params);
                    say(&format!("restored the best epoch's weights (epoch {}) from {}", state.best_epoch.unwrap_or(0), best.display()));
                }
                (None, false)
            }
            Ending::Crashed(kind, why) => {
                say(&format!("run crashed: {why}"));
                (Some((kind, why)), false)
            }
            Ending::Interrupted => {
                say(&format!("interrupted at step {}: checkpointed; continue it with --resume", self.trainer.steps()));
                (None, true)
            }
        };
        let finished = crash.is_none() && !interrupted && (state.epochs_done >= cfg.train.epochs || state.stopped_early);
        // The epoch whose weights the evaluation scores.
        let mut evaluated_epoch =
            Some(if state.stopped_early && cfg.train.early_stopping_restore_best { state.best_epoch.unwrap_or(0) } else { state.epochs_done });
        // The results first, then what is optional: the final weights are on disk before the
        // evaluation and the plots, whose failures are warnings. The summary says `finished` only
        // once all of them are written: until then it says `finishing`, and a resume completes them.
        if root && finished {
            weights::save_model(&dir.join("weights.safetensors"), self.trainer.model())?;
            if cfg.train.evaluate && cfg.train.evaluate_best && state.best_epoch.is_some() && evaluated_epoch != state.best_epoch {
                let best = dir.join("checkpoints/best.safetensors");
                let ck = checkpoint::load(&best, &self.trainer.model().params)?;
                self.trainer.set_params(ck.params);
                evaluated_epoch = state.best_epoch;
                say(&format!(
                    "evaluating the best epoch's weights (epoch {}, validation loss {:.5})",
                    state.best_epoch.unwrap_or(0),
                    state.best_val.unwrap_or(f64::NAN)
                ));
            }
        }
        let g = self.trainer.model();
        let mut summary = Summary {
            preset: self.preset.clone(),
            finished: false,
            finishing: finished,
            crashed: crash.is_some(),
            crash_kind: crash.as_ref().map(|c| c.0),
            interrupted,
            early_stopped: state.stopped_early,
            reason: crash.map(|c| c.1).or_else(|| interrupted.then(|| format!("interrupted at step {}", self.trainer.steps()))),
            epochs_done: state.epochs_done,
            steps: self.trainer.steps(),
            updates: self.trainer.updates(),
            first_val_loss: state.first_val,
            best_val_loss: state.best_val,
            final_val_loss: state.last_val,
            outcomes: self.trainer.outcomes().clone(),
            metrics: None,
            evaluated_epoch: evaluated_epoch.filter(|_| finished && cfg.train.evaluate),
            parameters: g.num_params(),
            wall_seconds: self.base_wall + self.started.elapsed().as_secs_f64(),
            collective_seconds: (self.world.size() > 1).then(|| self.world.collective_seconds()),
        };
        if !root {
            summary.finished = finished;
            summary.finishing = false;
            return Ok(summary);
        }
        if finished {
            write_summary(&dir, &summary)?;
        }
        if finished && cfg.train.evaluate {
            let scored = match &self.ds {
                RunData::Gridlines(d) => {
                    match cfg.train.eval_seeds.len() {
                        0 => say("evaluating: stitching the test object"),
                        k => say(&format!("evaluating: stitching {k} test objects no choice has seen (data seeds {:?})", cfg.train.eval_seeds)),
                    }
                    evaluate(g, cfg, &d.test, &self.dev, &dir, &mut |m| say(m))
                }
                RunData::Darcy(d) => {
                    say(&format!("evaluating: the {} test samples", d.test.len()));
                    let m = workload::evaluate_darcy(g, d, cfg, &self.dev, &dir)?;
                    say(&format!(
                        "test: relative L2 {:.5}, relative H1 {:.5} (darcy.png)",
                        m["test_rel_l2"].as_f64().unwrap_or(f64::NAN),
                        m["test_h1"].as_f64().unwrap_or(f64::NAN)
                    ));
                    Ok(Some(m))
                }
            };
            match scored {
                Ok(m) => summary.metrics = m,
                Err(e) => say(&format!("warning: the final evaluation failed: {e}")),
            }
        }
        if let Err(e) = write_csv(&dir, &self.records) {
            say(&format!("warning: metrics.csv was not written: {e}"));
        }
        if let Err(e) = plots(&dir, &self.records) {
            say(&format!("warning: the plots were not written: {e}"));
        }
        // The summary last: a run that says it finished (or crashed, or was interrupted) has every
        // file it will have.
        summary.finished = finished;
        summary.finishing = false;
        summary.wall_seconds = self.base_wall + self.started.elapsed().as_secs_f64();
        write_summary(&dir, &summary)?;
        Ok(summary)
    }
}
