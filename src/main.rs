//! The `fnokern` command line: thin; it parses arguments and calls the library.

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use fnokern::config::Config;

#[derive(Parser)]
#[command(
    name = "fnokern",
    version,
    about = "Train deep Fourier Neural Operators robustly and fast",
    after_help = "Exit status: 0 success; 1 error (bad input, an unreadable file, a directory in use: one line saying which); 2 bad \
command-line arguments (the usage is printed); 130 interrupted (SIGINT or SIGTERM; the same command, or train --resume, continues). \
`fnokern train --help` lists the statuses of a crashed run (3, 4, 5)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the config comes from: a TOML file (or a preset), then the shorthand flags, then `--set`.
#[derive(Args, Clone)]
struct SourceArgs {
    /// TOML config file (sections [model], [data], [loss], [train], [faults], [darcy]); defaults
    /// apply to what it leaves out.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Start from a named preset: cpu, sweep, map, study or darcy (see README "Presets").
    #[arg(long)]
    preset: Option<String>,
    /// Shorthand for --set train.precision=P: fp32, bf16 or fp16 (activations and GEMMs).
    #[arg(long)]
    precision: Option<String>,
    /// Shorthand for --set train.memory_limit=SIZE: a device memory budget such as 24GiB; a run
    /// that needs more stops cleanly as out of memory, as a card of that size would.
    #[arg(long, value_name = "SIZE")]
    mem_limit: Option<String>,
    /// Shorthand for --set train.device=DEV: cpu, cuda, cuda:N or auto (GPU 0 when one is
    /// usable, else the CPU; a GPU needs the CUDA kernels built in and the driver, cuBLAS and
    /// cuFFT at run time; `fnokern info` says what is there).
    #[arg(long, value_name = "DEV")]
    device: Option<String>,
    /// Override one field, e.g. --set model.width=16 --set data.n=32 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
}

/// [`SourceArgs`] and `--depth`.
#[derive(Args, Clone)]
struct ConfigArgs {
    #[command(flatten)]
    src: SourceArgs,
    /// Shorthand for --set model.depth=D.
    #[arg(long)]
    depth: Option<usize>,
}

impl SourceArgs {
    /// The config; with neither --config nor --preset, the preset `bare` stands in and a line
    /// says so (every command a user runs bare names the preset it uses).
    fn resolve(&self, depth: Option<usize>, bare: Option<&str>) -> fnokern::Result<Config> {
        let mut cfg = match (&self.config, &self.preset, bare) {
            (Some(p), _, _) => Config::load(p)?,
            (None, Some(name), _) => fnokern::config::presets::get(name)?,
            (None, None, Some(name)) => {
                println!("preset {name} (no --config or --preset given): {}", fnokern::config::presets::describe(name));
                fnokern::config::presets::get(name)?
            }
            (None, None, None) => Config::default(),
        };
        if let Some(d) = depth {
            cfg.set(&format!("model.depth={d}"))?;
        }
        // set() rejects an unknown precision and validate() a malformed size, naming the field.
        if let Some(p) = &self.precision {
            cfg.set(&format!("train.precision=\"{p}\""))?;
        }
        if let Some(m) = &self.mem_limit {
            cfg.set(&format!("train.memory_limit=\"{m}\""))?;
        }
        if let Some(d) = &self.device {
            cfg.set(&format!("train.device=\"{d}\""))?;
        }
        for s in &self.set {
            cfg.set(s)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The preset a bare command uses: `study` when the device is a GPU, else `cpu`.
    fn bare_preset(&self) -> &'static str {
        let dev = self.device.as_deref().or_else(|| self.set.iter().rev().find_map(|s| s.strip_prefix("train.device=")).map(|v| v.trim_matches('"')));
        let gpu = match dev {
            Some("auto") => fnokern::device::auto_kind().0.is_gpu(),
            Some(d) => fnokern::DeviceKind::parse(d).is_ok_and(|k| k.is_gpu()),
            None => false,
        };
        if gpu {
            "study"
        } else {
            "cpu"
        }
    }
}

impl ConfigArgs {
    /// The config of a command that trains or describes one model: bare, the `cpu` preset
    /// (`study` on a GPU), as `fnokern train` uses.
    fn resolve(&self) -> fnokern::Result<Config> {
        self.src.resolve(self.depth, Some(self.src.bare_preset()))
    }
}

/// What every sweep takes besides its config.
#[derive(Args, Clone)]
struct SweepArgs {
    /// Seeds per cell: 0, 1, ..., SEEDS-1 (each sets model.seed and train.seed).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Runs at once (default: one per CPU core; the cores are shared among them).
    #[arg(long)]
    jobs: Option<usize>,
    /// Sweep directory (default: sweeps/<command>-<arm or depth>); an existing one is continued.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A finished run whose final validation loss is above this has crashed.
    #[arg(long, default_value_t = 0.15)]
    max_val_loss: f64,
    /// A finished run whose test amplitude SSIM is below this has collapsed.
    #[arg(long, default_value_t = 0.5)]
    min_amp_ssim: f64,
    /// A training or validation loss above this multiple of the first step's loss is a loss
    /// explosion (a crash, even if the guard rescued the run).
    #[arg(long, default_value_t = 3.0)]
    explosion_factor: f64,
    /// A test amplitude contrast (sd of the prediction / sd of the truth) below this is a flat
    /// output: a collapse.
    #[arg(long, default_value_t = 0.1)]
    min_amp_contrast: f64,
    /// A finished run whose best validation loss is above this fraction of its first step's loss
    /// did not train (reported apart, not a crash).
    #[arg(long, default_value_t = 0.9)]
    did_not_train_above: f64,
    /// Run only shard INDEX of COUNT (runs i with i % COUNT == INDEX), beside the other shards'
    /// processes in the same --out: one per GPU, or a Slurm job array
    /// (--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; scripts/study-slurm.sh).
    #[arg(long, value_name = "INDEX/COUNT")]
    shard: Option<fnokern::experiments::Shard>,
    /// Train nothing: print the runs, each cell's parameters, step memory and steps, and (with
    /// --step-ms) the device-hours.
    #[arg(long, conflicts_with = "report_only")]
    dry_run: bool,
    /// Train nothing: write the report (report.md, results.json, plots) of the runs that have
    /// ended, judged under the criteria given now.
    #[arg(long)]
    report_only: bool,
    /// With --dry-run, the milliseconds of one training step on the target device, as
    /// `fnokern bench-step` measures it there: MS for every cell, or DEPTH=MS per depth
    /// (comma-separated); every arm at a depth is assumed to cost the same.
    #[arg(long, value_name = "MS|DEPTH=MS", value_delimiter = ',', requires = "dry_run", conflicts_with = "measure")]
    step_ms: Vec<String>,
    /// With --dry-run, time N training steps of every cell on the config's device (--device)
    /// instead, as bench-step does (the median).
    #[arg(long, value_name = "N", requires = "dry_run")]
    measure: Option<usize>,
}

/// The exit statuses of the sweeps, for their --help.
const SWEEP_EXIT: &str = "Exit status: 0 every run has ended (a run that crashed is a result, not an error); 1 error (bad input, \
a sweep directory in use or of another sweep); 2 bad command-line arguments; 130 interrupted (SIGINT or SIGTERM: the running runs \
checkpoint, and the same command continues the sweep).";

#[derive(Subcommand)]
enum Command {
    /// Train the generator (or, with a Darcy config, the FNO-2D): simulate or load the data, train,
    /// evaluate, write the run directory. Without --config or --preset it uses the `cpu` preset
    /// (`study` on a GPU); with
    /// --resume, the run's own config.toml (flags and --set apply on top: --set train.epochs=N
    /// extends a run).
    #[command(after_help = "Exit status: 0 finished (or stopped by --stop-after-epochs); 1 error (bad input, unreadable file, \
a directory in use); 2 bad command-line arguments (the usage is printed); 3 crashed on non-finite values; 4 crashed on repeated loss spikes; 5 crashed out of memory; 130 interrupted \
(SIGINT or SIGTERM: checkpointed where it stopped, --resume continues it; a second SIGINT exits at once).

Several ranks train one run when a launcher starts them: `mpiexec -n N` or `srun` (a build with --features mpi; GPUs \
exchange gradients through NCCL), or torchrun on GPUs (NCCL alone). train.accumulate is each rank's: N ranks train as \
one process with N x accumulate, bit for bit on the CPU. README: \"Training on several GPUs or nodes\".")]
    Train {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Run directory (default: runs/depth<D>-<preset or config name>, never overwritten).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out from its newest checkpoint that loads, exactly where it stopped.
        #[arg(long, requires = "out")]
        resume: bool,
        /// Stop after this many epochs of this invocation (resume later with --resume).
        #[arg(long)]
        stop_after_epochs: Option<usize>,
        /// Start from this checkpoint of another run (weights, optimiser and trainer state, its
        /// metrics up to the checkpoint) under this config, which may change anything but the model (e.g.
        /// --set train.beta2=0.99): the same state, trained on with one thing changed.
        #[arg(long, value_name = "CHECKPOINT", conflicts_with = "resume")]
        fork: Option<PathBuf>,
    },
    /// Replay a run's steps bit for bit and show where a blow-up starts: the run restarts from
    /// its newest checkpoint at or before the window (its initial weights if none: keep one per
    /// epoch with train.checkpoint_every = 1), every replayed loss is checked against its
    /// metrics.jsonl (the first that differs is an error, and nothing is reported), and each step
    /// of the window is recorded per part and per parameter tensor: activation RMS and largest
    /// magnitude of each part's output and each block's branch and output, gradient norms before
    /// and after clipping, update-to-weight ratios, Adam's sqrt(v) (smallest, median, share near
    /// eps) and per-entry rate, the batch's patterns and each one's loss.
    #[command(
        after_help = "Writes OUT/autopsy.jsonl (a header, then one record per step), OUT/autopsy.json and OUT/verdict.txt (the first part and quantity to leave its baseline, the median of the window's calm steps, by --factor, and when the loss moved), OUT/grad_norm.png and OUT/update_ratio.png (part x step heat maps relative to the baselines), OUT/activations.png (each part's output RMS at the calm median, the first departure and the loss's move) and OUT/loss.png. Run it again with another --factor or --baseline and it re-judges autopsy.jsonl without a replay. Exit status: 0 done; 1 error (including a replay that differs from the run); 2 bad command-line arguments; 130 interrupted (the replay checkpointed: the same command continues it)."
    )]
    Autopsy {
        /// The run directory (of `fnokern train` or a sweep's run).
        run: PathBuf,
        /// The steps to record, A..B (both included); a dozen or more calm steps before the
        /// blow-up make the baselines.
        #[arg(long, value_name = "A..B", required_unless_present = "around", conflicts_with = "around")]
        steps: Option<String>,
        /// Record steps K-40..K+10 (e.g. K: the step of a logged spike).
        #[arg(long, value_name = "K")]
        around: Option<u64>,
        /// Output directory (default RUN/autopsy-A-B).
        #[arg(long)]
        out: Option<PathBuf>,
        /// How far above its baseline a quantity (below it, for the smallest sqrt(v)) or the
        /// loss must go, as a ratio.
        #[arg(long, default_value_t = 3.0)]
        factor: f64,
        /// At most this many calm steps at the window's start make the baselines.
        #[arg(long, default_value_t = 20)]
        baseline: usize,
    },
    /// Reconstruct objects with a trained run's model: diffraction patterns in (an NPZ file, or
    /// the run's own test split), object patches out (prediction.npz: amplitude, phase, object),
    /// stitched into the first object's canvas where the file holds patch positions (xcoords,
    /// ycoords), scored against the ground truth where it holds one (YY_ground_truth).
    #[command(
        after_help = "Writes DIR/prediction.npz (amplitude, phase: f32 [n, N, N]; object: complex64 [n, N, N]; canvas_amplitude, canvas_phase, canvas_top_left when stitched), DIR/reconstruction.png and DIR/metrics.json (the run's loss on the patterns when the file holds Y_I, Y_phi and probeGuess; amplitude and phase SSIM, MAE, PSNR and FRC when it holds the ground truth)."
    )]
    Predict {
        /// The run directory `fnokern train` wrote (its config.toml names the model).
        run: PathBuf,
        /// Diffraction patterns: an NPZ file in the reference layout (only `diffraction` is
        /// required). Default: the run's test split.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Weights (safetensors) or a checkpoint of the run. Default: RUN/weights.safetensors,
        /// else the run's best checkpoint, else its last.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Output directory (default: RUN/prediction, or RUN/prediction-<input name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// cpu, cuda, cuda:N or auto (GPU 0 when usable, else the CPU).
        #[arg(long, value_name = "DEV", default_value = "auto")]
        device: String,
        /// Patterns per forward pass (default: the run's train.batch_size).
        #[arg(long)]
        batch_size: Option<usize>,
    },
    /// Print the model's parts (resolution, width, kept modes, parameters, bytes) and total.
    /// Without --config or --preset it describes the `cpu` preset's model, as `fnokern train`
    /// trains it (`study` on a GPU).
    Model {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Also write the freshly initialised weights (seed model.seed) to this safetensors file.
        #[arg(long)]
        save_weights: Option<PathBuf>,
    },
    /// Simulate the grid-lines data set (or generate the Darcy flow data set) into data.cache_dir
    /// (default ./data-cache), or read it from there or from the configured NPZ files, and print
    /// what it holds and where. Without --config or --preset: the `cpu` preset's data, as
    /// `fnokern train` uses them (with --workload darcy: the `darcy` preset's).
    Data {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// gridlines or darcy: without --config or --preset, darcy takes the `darcy` preset
        /// (the FNO paper's Darcy benchmark at s = 85); with one, its data.workload must match.
        #[arg(long)]
        workload: Option<String>,
        /// Also write the splits as NPZ files (reference layout; Darcy: arrays coeff and sol)
        /// into this directory.
        #[arg(long)]
        export: Option<PathBuf>,
    },
    /// Loss, output and every parameter gradient of one batch, for parity checks with other
    /// frameworks (safetensors in, safetensors out; see README).
    Grad {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Generator weights (safetensors, PyTorch names and layouts).
        #[arg(long)]
        weights: PathBuf,
        /// The batch (safetensors: diffraction, probe, and Y_I/Y_phi for the supervised loss).
        #[arg(long)]
        batch: PathBuf,
        /// Where to write loss, output and grad.<name> (safetensors).
        #[arg(long)]
        out: PathBuf,
    },
    /// Find the shallowest depth where training crashes: the control arm (or --arm) at every depth
    /// and seed. A crash is counted per kind whatever a guard did (non-finite values, a loss
    /// explosion, out of memory, a collapse, a high final validation loss; "did not train" apart);
    /// the spike guard is off (train.spike_action = log) unless the arm turns it on (`guard`) or
    /// --set train.spike_action=... names it.
    /// Resumable: run the same command again to continue a killed sweep. Without --config or
    /// --preset it uses the `sweep` preset.
    #[command(after_help = SWEEP_EXIT)]
    CrashHunt {
        #[command(flatten)]
        cfg: SourceArgs,
        /// Depths to try.
        #[arg(long, value_delimiter = ',', default_value = "4,6,8")]
        depths: Vec<usize>,
        /// Arm to train (a name in configs/arms/, a built-in arm, or a .toml overlay).
        #[arg(long, default_value = "control")]
        arm: String,
        #[command(flatten)]
        sweep: SweepArgs,
    },
    /// Every arm at every seed at one depth (--depth, default the config's): which fix makes deep
    /// FNOs train? Crashes counted and the guard set as in crash-hunt. Resumable like crash-hunt.
    /// Without --config or --preset it uses `sweep`.
    #[command(after_help = SWEEP_EXIT)]
    Shootout {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Depths, comma-separated, each with every arm (default: --depth, or the config's).
        #[arg(long, value_delimiter = ',', conflicts_with = "depth")]
        depths: Vec<usize>,
        /// Arms (names in configs/arms/, built-in arms, or .toml overlays), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "control,layerscale,agc")]
        arms: Vec<String>,
        #[command(flatten)]
        sweep: SweepArgs,
    },
    /// Map the stable learning rates: every arm at every depth, peak learning rate and seed. A run
    /// is unstable on non-finite values, a loss explosion, the guard giving up or out of memory
    /// (each counted whatever a guard did; the guard is off unless an arm turns it on); quality
    /// is scored apart, on the best epoch's weights. Writes report.md (the largest stable rate
    /// per arm and depth), results.json and a heat map per arm. Resumable like crash-hunt.
    /// Without --config or --preset it uses the `map` preset.
    #[command(after_help = SWEEP_EXIT)]
    StabilityMap {
        #[command(flatten)]
        cfg: SourceArgs,
        /// Depths to try.
        #[arg(long, value_delimiter = ',', default_value = "4,6,8")]
        depths: Vec<usize>,
        /// Peak learning rates (train.lr), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1e-3,3e-3,1e-2,3e-2,1e-1")]
        lrs: Vec<f64>,
        /// Arms (names in configs/arms/, built-in arms, or .toml overlays), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "control,layerscale,agc0.01,agc,prenorm,warmup_cosine")]
        arms: Vec<String>,
        #[command(flatten)]
        sweep: SweepArgs,
    },
    /// Plan the memory of one training step on the meta device: per level, parameters,
    /// gradients, optimizer state and the activations kept, and the peak with and without
    /// activation checkpointing (--mem-limit adds a fits / exceeds verdict). Without --config or
    /// --preset: the `cpu` preset's step (`study` with --device cuda).
    Plan {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Shorthand for --set train.batch_size=B.
        #[arg(long)]
        batch: Option<usize>,
        /// Shorthand for --set data.n=N (the patch size).
        #[arg(long)]
        n: Option<usize>,
        /// The checkpointing policy to compare with none: every_level (default) or every_K.
        #[arg(long)]
        checkpoint: Option<String>,
    },
    /// Time the trainer's step (forward, loss, guards, backward, clipping, update: the step
    /// `fnokern train` runs) in its steady state, on --device (default cpu): the median and the
    /// fastest of --steps steps, in milliseconds. Without --config or --preset: the `cpu` preset.
    BenchStep {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Steps to time (after the steady state's warm-up updates).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Also print where the timed steps' time went: wall time per backend op (calls and
        /// milliseconds per step, slowest first), and the rest (the tape, allocation, the
        /// trainer's bookkeeping). Timing each op adds a little to the step.
        #[arg(long)]
        profile: bool,
    },
    /// Print the build (CUDA kernels embedded or not, nvcc, targets) and the devices.
    Info,
    /// Check every differentiable op's gradient against central finite differences (f64, CPU).
    Gradcheck {
        /// Only ops whose name contains this text.
        #[arg(long)]
        only: Option<String>,
    },
}

/// glibc hands every buffer over 128 KiB back to the kernel when it is freed, and the kernel
/// zero-fills fresh pages for the next one: a training step allocates and frees the same large
/// activations every time (a fifth of the study step went to page faults and zeroing). Raising
/// the thresholds keeps up to 32 MiB buffers in the heap for reuse.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Output into a closed pipe (`fnokern info | head -1`) ends the process quietly, as it ends
/// other command-line tools, instead of a panic with a backtrace: Rust ignores SIGPIPE by default.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    keep_freed_buffers();
    default_sigpipe();
    let cli = Cli::parse();
    // Several processes started by a launcher (mpirun, srun) train one run together; MPI joins
    // them before any other thread starts. Only `train` runs on several ranks.
    // A GPU run on several ranks needs NCCL, which installs as libnccl.so.2: made findable by
    // cudarc's names first (this may run fnokern again, before anything else starts).
    if let (Command::Train { .. }, Ok(Some(_))) = (&cli.command, fnokern::parallel::Launch::from_env()) {
        if let Err(e) = fnokern::parallel::nccl::make_findable() {
            eprintln!("error: {e}");
            return ExitCode::from(fnokern::train::exit::ERROR);
        }
    }
    let world = match (&cli.command, fnokern::parallel::Launch::from_env()) {
        (Command::Train { .. }, Ok(Some(_))) => fnokern::parallel::World::from_launch(),
        // A sweep's ranks each take a shard of its runs (see `sweep`).
        (Command::CrashHunt { .. } | Command::StabilityMap { .. } | Command::Shootout { .. }, Ok(Some(_))) => Ok(fnokern::parallel::World::solo()),
        (_, Ok(None)) => Ok(fnokern::parallel::World::solo()),
        (_, Ok(Some(l))) => Err(fnokern::Error::InvalidArgument {
            op: "launch",
            why: format!("{} started this process as rank {} of {}: only `fnokern train` (one run together) and the sweeps (a shard each) run on several ranks; run this command as one process", l.launcher, l.rank, l.size),
        }),
        (_, Err(e)) => Err(e),
    };
    let world = match world {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(fnokern::train::exit::ERROR);
        }
    };
    // The main thread runs the command as worker 0 of rayon's pool: a parallel op called from a
    // worker splits its work there and joins it at once, while one called from outside the pool
    // is queued to the pool and the caller sleeps until it is done, a sleep and wake-up of two
    // threads per op (about a fifth of the `cpu` preset's step). The buffers the step allocates
    // stay in the main thread's heap, which `keep_freed_buffers` keeps from being returned to
    // the system between steps. Built after MPI's initialisation: no thread starts before it.
    if let Err(e) = rayon::ThreadPoolBuilder::new().use_current_thread().build_global() {
        eprintln!("error: cannot start the thread pool: {e}");
        return ExitCode::from(fnokern::train::exit::ERROR);
    }
    let ok = |r: fnokern::Result<()>| r.map(|()| fnokern::train::exit::OK);
    let result = match cli.command {
        Command::Info => {
            info();
            Ok(fnokern::train::exit::OK)
        }
        Command::Gradcheck { only } => ok(gradcheck(only.as_deref())),
        Command::Train { cfg, out, resume, stop_after_epochs, fork } => train(cfg, out, resume, stop_after_epochs, fork, &world),
        Command::Autopsy { run, steps, around, out, factor, baseline } => autopsy(run, steps, around, out, factor, baseline),
        Command::Predict { run, input, weights, out, device, batch_size } => ok(predict(run, input, weights, out, &device, batch_size)),
        Command::Model { cfg, save_weights } => ok(model(&cfg, save_weights.as_deref())),
        Command::Grad { cfg, weights, batch, out } => ok(grad(&cfg, &weights, &batch, &out)),
        Command::Data { cfg, workload, export } => ok(data(&cfg, workload.as_deref(), export.as_deref())),
        Command::CrashHunt { cfg, depths, arm, sweep: sw } => sweep(fnokern::experiments::SweepKind::CrashHunt, cfg, None, depths, Vec::new(), vec![arm], sw),
        Command::StabilityMap { cfg, depths, lrs, arms, sweep: sw } => sweep(fnokern::experiments::SweepKind::StabilityMap, cfg, None, depths, lrs, arms, sw),
        Command::Plan { cfg, batch, n, checkpoint } => ok(plan(&cfg, batch, n, checkpoint)),
        Command::BenchStep { cfg, steps, profile } => ok(bench_step(&cfg, steps, profile)),
        Command::Shootout { cfg, depths, arms, sweep: sw } => {
            sweep(fnokern::experiments::SweepKind::Shootout, cfg.src, cfg.depth, depths, Vec::new(), arms, sw)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) if world.size() > 1 => end_job(&world, &e),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(fnokern::train::exit::ERROR)
        }
    }
}

/// A rank's error ends the whole job (no rank is left waiting in a collective): the rank that
/// failed says why and aborts every rank; a rank that only learnt of another's failure waits a
/// moment for that abort, so that the message that says why is the one printed.
fn end_job(world: &fnokern::parallel::World, e: &fnokern::Error) -> ExitCode {
    if let fnokern::Error::RankFailed { .. } = e {
        std::thread::sleep(std::time::Duration::from_secs(20));
    }
    eprintln!("error (rank {} of {}): {e}", world.rank(), world.size());
    // The launcher forwards a rank's output through a pipe that the abort can close before it is
    // read: a moment first, so that the reason reaches the user.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::thread::sleep(std::time::Duration::from_secs(1));
    world.abort(fnokern::train::exit::ERROR as i32)
}

/// A flag that SIGINT and SIGTERM set, so that training stops cleanly at its next group
/// boundary; a second SIGINT or SIGTERM, once the flag is set, exits at once.
fn autopsy(run: PathBuf, steps: Option<String>, around: Option<u64>, out: Option<PathBuf>, factor: f64, baseline: usize) -> fnokern::Result<u8> {
    use fnokern::autopsy::{autopsy, Options};
    use std::io::IsTerminal;
    let steps = match (steps, around) {
        (Some(s), _) => Options::parse_steps(&s)?,
        (None, Some(k)) => Options::around(k),
        (None, None) => return Err(fnokern::Error::InvalidArgument { op: "autopsy", why: "give --steps A..B or --around K".into() }),
    };
    let stop = stop_flag();
    let opts = Options { run, steps, out, factor, baseline_steps: baseline, progress: std::io::stderr().is_terminal(), stop: Some(stop.clone()) };
    let r = match autopsy(&opts, &mut |m| println!("{m}")) {
        Err(e) if stop.load(std::sync::atomic::Ordering::SeqCst) => {
            eprintln!("error: {e}");
            println!("interrupted: the replay checkpointed; the same command continues it");
            return Ok(130);
        }
        other => other?,
    };
    println!("recorded steps {}..{} ({} parts, replayed from step {})", r.header.steps.0, r.header.steps.1, r.header.parts.len(), r.header.from_step);
    println!("verdict: {}", r.verdict.line);
    for d in r.verdict.departures.iter().skip(1).take(5) {
        println!("  then: {}", d.describe());
    }
    println!("wrote {} (autopsy.jsonl, autopsy.json, verdict.txt, grad_norm.png, update_ratio.png, activations.png, loss.png)", r.out.display());
    Ok(0)
}

fn stop_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // Registration fails only for forbidden signals, which these are not; without it the
        // default action (terminate) stays, and the run resumes from its last checkpoint.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, fnokern::train::exit::INTERRUPTED as i32, flag.clone());
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    flag
}

fn train(
    mut args: ConfigArgs,
    out: Option<PathBuf>,
    resume: bool,
    stop_after: Option<usize>,
    fork: Option<PathBuf>,
    world: &fnokern::parallel::World,
) -> fnokern::Result<u8> {
    // Rank 0 speaks for a run on several ranks.
    macro_rules! tell {
        ($($t:tt)*) => {
            if world.is_root() {
                println!($($t)*)
            }
        };
    }
    use std::io::IsTerminal;
    if stop_after == Some(0) {
        return Err(fnokern::Error::InvalidArgument { op: "train", why: "--stop-after-epochs must be at least 1".into() });
    }
    // --device auto is resolved once, now, and the run records what it chose.
    if let Some(d) = args.src.device.as_deref().filter(|d| d.trim() == "auto") {
        args.src.device = Some(device_said(d)?.to_string());
    }
    // A resumed run's config is its own, unless one is named; its preset is the one its
    // config.toml names (the library reads it back).
    let mut own_config = false;
    if let (true, None, None, Some(dir)) = (resume, &args.src.config, &args.src.preset, &out) {
        let own = dir.join("config.toml");
        if !own.is_file() {
            return Err(fnokern::Error::InvalidArgument {
                op: "resume",
                why: format!("{} holds no config.toml (no run was started there): give the run's --config or --preset", dir.display()),
            });
        }
        tell!("config: {} (the run's own)", own.display());
        args.src.config = Some(own);
        own_config = true;
    }
    // An unknown preset is refused below, by the config's resolution.
    if let Some(name) = args.src.preset.as_ref().filter(|n| !fnokern::config::presets::describe(n).is_empty()) {
        tell!("preset {name}: {}", fnokern::config::presets::describe(name));
    }
    // Bare: the CPU-sized preset, or the reference study on a GPU (said by resolve()).
    let bare = (args.src.config.is_none() && args.src.preset.is_none()).then(|| args.src.bare_preset());
    let cfg = args.resolve()?;
    let preset = if own_config {
        None
    } else {
        bare.map(str::to_string)
            .or_else(|| args.src.preset.clone())
            .or_else(|| args.src.config.as_ref().and_then(|p| p.file_stem()).map(|s| s.to_string_lossy().into_owned()))
    };
    let out = match out {
        Some(o) => o,
        None => {
            let base = format!("runs/depth{}-{}", cfg.model.depth, preset.clone().unwrap_or_else(|| "custom".into()));
            let mut dir = PathBuf::from(&base);
            let mut k = 2;
            while dir.exists() {
                dir = PathBuf::from(format!("{base}-{k}"));
                k += 1;
            }
            dir
        }
    };
    // Rank 0's choice (a default directory is numbered by what exists when rank 0 looks).
    let out = if world.size() > 1 { PathBuf::from(String::from_utf8_lossy(&world.broadcast(0, out.to_string_lossy().as_bytes())?).into_owned()) } else { out };
    tell!("run directory: {}", out.display());
    let opts = fnokern::train::RunOptions {
        out_dir: out.clone(),
        resume,
        stop_after_epochs: stop_after,
        progress: std::io::stderr().is_terminal(),
        preset,
        stop: Some(stop_flag()),
        fork,
        world: world.clone(),
    };
    let s = fnokern::train::train(&cfg, &opts, &mut |m| println!("{m}"))?;
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.5}"));
    tell!(
        "{}: {} epochs, {} steps; validation loss first {} best {} final {}",
        if s.crashed {
            "CRASHED"
        } else if s.interrupted {
            "interrupted"
        } else if s.finished {
            "finished"
        } else {
            "stopped"
        },
        s.epochs_done,
        s.steps,
        fmt(s.first_val_loss),
        fmt(s.best_val_loss),
        fmt(s.final_val_loss)
    );
    if let Some(r) = &s.reason {
        tell!("reason: {r}");
    }
    let events = fnokern::train::event_counts(&Default::default(), &s.outcomes);
    tell!("guard events: {}", if events.is_empty() { "none" } else { &events });
    if let Some(c) = s.collective_seconds {
        tell!(
            "{} ranks over {}: rank 0 spent {c:.2} s of this invocation in collectives (transfers, and waits for the slower ranks)",
            world.size(),
            world.describe()
        );
    }
    let darcy = s.metrics.as_ref().is_some_and(|m| m.get("test_rel_l2").is_some());
    match &s.metrics {
        Some(m) if darcy => tell!(
            "test split ({} samples at s = {}): relative L2 {:.5}, relative H1 {:.5}",
            m["test_samples"],
            m["s"],
            m["test_rel_l2"].as_f64().unwrap_or(f64::NAN),
            m["test_h1"].as_f64().unwrap_or(f64::NAN)
        ),
        Some(m) => {
            let num = |k: &str, d: usize| {
                let v = m[k].as_f64().unwrap_or(f64::NAN);
                match m["sd"][k].as_f64() {
                    Some(sd) => format!("{v:.d$} ± {sd:.d$}"),
                    None => format!("{v:.d$}"),
                }
            };
            let what = match m["objects"].as_array() {
                Some(o) => format!("{} test objects (mean ± sd)", o.len()),
                None => "test object".to_string(),
            };
            tell!("{what}: amplitude SSIM {} MAE {}, phase SSIM {} MAE {}", num("amp_ssim", 3), num("amp_mae", 4), num("phase_ssim", 3), num("phase_mae", 4))
        }
        None => {}
    }
    tell!(
        "wrote {}/summary.json, metrics.jsonl, metrics.csv, loss.png, grad_norm.png, lr.png{}",
        out.display(),
        match (&s.metrics, darcy) {
            (Some(_), true) => ", darcy.png",
            (Some(_), false) => ", reconstruction.png",
            (None, _) => "",
        }
    );
    if s.interrupted {
        tell!("continue it with: fnokern train --resume --out {}", out.display());
    }
    Ok(s.exit_code())
}

/// The device `dev` names; `auto` is resolved and the choice said, with its reason.
fn device_said(dev: &str) -> fnokern::Result<fnokern::DeviceKind> {
    if dev.trim() != "auto" {
        return fnokern::DeviceKind::parse(dev);
    }
    let (kind, why) = fnokern::device::auto_kind();
    println!("device auto: {why}");
    Ok(kind)
}

fn predict(
    run: PathBuf,
    input: Option<PathBuf>,
    weights: Option<PathBuf>,
    out: Option<PathBuf>,
    device: &str,
    batch_size: Option<usize>,
) -> fnokern::Result<()> {
    let kind = device_said(device)?;
    if batch_size == Some(0) {
        return Err(fnokern::Error::InvalidArgument { op: "predict", why: "--batch-size must be at least 1".into() });
    }
    let dev = fnokern::Device::of_kind(kind)?;
    let out = out.unwrap_or_else(|| match &input {
        Some(p) => run.join(format!("prediction-{}", p.file_stem().map_or("input".into(), |s| s.to_string_lossy().into_owned()))),
        None => run.join("prediction"),
    });
    let opts = fnokern::predict::PredictOptions { run, input, weights, out: out.clone(), batch_size };
    let r = fnokern::predict::predict(&opts, &dev, &mut |m| println!("{m}"))?;
    if let Some(l) = r.loss {
        println!("loss on these patterns: {l:.5}");
    }
    if let Some(c) = r.canvas {
        println!("stitched object 0: {} x {} pixels from ({}, {})", c.rows, c.cols, c.top, c.left);
    }
    if let Some(m) = &r.metrics {
        println!(
            "against the ground truth: amplitude SSIM {:.3} MAE {:.4} PSNR {:.2} dB, phase SSIM {:.3} MAE {:.4} PSNR {:.2} dB",
            m.amp_ssim, m.amp_mae, m.amp_psnr, m.phase_ssim, m.phase_mae, m.phase_psnr
        );
    }
    println!("wrote {}/prediction.npz, reconstruction.png, metrics.json ({:.1} s)", out.display(), r.seconds);
    Ok(())
}

fn sweep(
    kind: fnokern::experiments::SweepKind,
    args: SourceArgs,
    depth: Option<usize>,
    depths: Vec<usize>,
    lrs: Vec<f64>,
    arms: Vec<String>,
    sw: SweepArgs,
) -> fnokern::Result<u8> {
    use fnokern::experiments::{self as ex, SweepKind};
    // What happens to a model, not what a guard hides: the guard is an arm (`guard`), or the
    // command line names it for every arm.
    let guard_named = args.set.iter().any(|s| s.split('=').next().is_some_and(|k| k.trim() == "train.spike_action"));
    let mut base = args.resolve(depth, Some(if kind == SweepKind::StabilityMap { "map" } else { "sweep" }))?;
    // Under a launcher each rank runs a shard (below), on its own GPU when the runs train on one:
    // the config's, counted from the rank's local rank on its node.
    let launch = fnokern::parallel::Launch::from_env()?;
    if let (Some(l), fnokern::DeviceKind::Cuda(i)) = (&launch, base.train.device_kind()?) {
        let count = fnokern::backend::gpu::device_count()?.max(1);
        base.train.device = format!("cuda:{}", (i + l.local_rank.unwrap_or(l.rank)) % count);
    }
    if !guard_named {
        base.train.spike_action = fnokern::config::SpikeAction::Log;
    }
    let depths = if kind == SweepKind::Shootout && depths.is_empty() { vec![base.model.depth] } else { depths };
    let arms = arms.iter().map(|a| ex::Arm::load(a)).collect::<fnokern::Result<Vec<_>>>()?;
    let bad = |why: String| fnokern::Error::InvalidArgument { op: "sweep", why };
    if sw.seeds == 0 {
        return Err(bad("--seeds must be at least 1".into()));
    }
    let criteria = ex::Criteria {
        max_val_loss: sw.max_val_loss,
        min_amp_ssim: sw.min_amp_ssim,
        explosion_factor: sw.explosion_factor,
        min_amp_contrast: sw.min_amp_contrast,
        did_not_train_above: sw.did_not_train_above,
    };
    criteria.check()?;
    let out = sw.out.unwrap_or_else(|| match kind {
        SweepKind::CrashHunt => PathBuf::from(format!("sweeps/crash-hunt-{}", arms[0].name)),
        SweepKind::Shootout => PathBuf::from(format!("sweeps/shootout-d{}", depths.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","))),
        SweepKind::StabilityMap => PathBuf::from("sweeps/stability-map"),
    });
    let seeds: Vec<u64> = (0..sw.seeds).collect();
    let plan = match kind {
        SweepKind::StabilityMap => ex::Plan::map(&base, arms, depths, lrs, seeds)?,
        _ => ex::Plan::new(kind, &base, arms, depths, seeds)?,
    };
    // Under a launcher (mpirun, srun), each process takes the shard of its rank: the runs are
    // independent, so the ranks need no MPI, only their numbers.
    let shard = match (sw.shard, launch) {
        (Some(_), Some(l)) => {
            return Err(fnokern::Error::InvalidArgument {
                op: "shard",
                why: format!("{} started this process as rank {} of {}, which picks its shard: drop --shard", l.launcher, l.rank, l.size),
            })
        }
        (None, Some(l)) => {
            println!("{}: rank {} of {} runs shard {}/{} of the sweep", l.launcher, l.rank, l.size, l.rank, l.size);
            Some(ex::Shard { index: l.rank, count: l.size })
        }
        (s, None) => s,
    };
    if sw.dry_run {
        return dry_run(&plan, shard, &sw.step_ms, sw.measure);
    }
    let opts = ex::SweepOptions {
        out_dir: out.clone(),
        jobs: sw.jobs.unwrap_or_else(ex::cores).max(1),
        threads: None,
        max_runs: sw.report_only.then_some(0),
        criteria,
        command: std::iter::once("fnokern".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" "),
        stop: Some(stop_flag()),
        shard,
    };
    println!("sweep directory: {}", out.display());
    let o = ex::run_sweep(&plan, &opts, &|m| println!("{m}"))?;
    let interrupted = !o.complete() && opts.stop.as_ref().is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
    for (arm, d) in plan.arms.iter().map(|a| (a.name.as_str(), ex::report::shallowest_failing_depth(&plan, &o.results, &a.name))) {
        let rs: Vec<&ex::RunResult> = o.results.iter().filter(|r| r.arm == arm).collect();
        let crashed = rs.iter().filter(|r| r.crashed_any()).count();
        let kinds = ex::report::kinds_text(&ex::report::kind_counts(rs.iter().copied()));
        let p = ex::report::interval_text(crashed, rs.len());
        match (kind, d) {
            (SweepKind::CrashHunt, Some(d)) => println!("{arm}: shallowest depth with a crashed run: {d}; P_crash {p} ({kinds})"),
            (SweepKind::CrashHunt, None) => println!("{arm}: no run crashed at depths {:?} ({} runs)", plan.depths, rs.len()),
            (SweepKind::Shootout, _) => println!("{arm}: P_crash {p} ({kinds})"),
            (SweepKind::StabilityMap, _) => {}
        }
    }
    if kind == SweepKind::StabilityMap {
        let cells = ex::map::cells(&plan, &o.results);
        for e in ex::map::edges(&plan, &cells) {
            let l = |v: Option<f64>| v.map_or("-".to_string(), ex::lr_label);
            println!("{} depth {}: largest stable lr {} (first unstable {})", e.arm, e.depth, l(e.largest_stable_lr), l(e.first_unstable_lr));
        }
        println!("wrote {}/report.md, results.json, map_<arm>.png ({} runs this time, {} kept)", out.display(), o.ran, o.reused);
    } else {
        println!("wrote {}/report.md, results.json, p_crash.png, val_curves.png ({} runs this time, {} kept)", out.display(), o.ran, o.reused);
    }
    if interrupted {
        println!("interrupted: {} of {} runs have ended; the same command continues the sweep", o.results.len(), o.planned);
        return Ok(fnokern::train::exit::INTERRUPTED);
    }
    Ok(fnokern::train::exit::OK)
}

/// A sweep's --dry-run: what it would train and what that costs.
fn dry_run(plan: &fnokern::experiments::Plan, shard: Option<fnokern::experiments::Shard>, step_ms: &[String], measure: Option<usize>) -> fnokern::Result<u8> {
    use fnokern::experiments as ex;
    let bad = |why: String| fnokern::Error::InvalidArgument { op: "dry-run", why };
    // MS, or DEPTH=MS.
    let mut given: Vec<(Option<usize>, f64)> = Vec::new();
    for item in step_ms {
        let (d, ms) = match item.split_once('=') {
            Some((d, ms)) => (Some(d.trim().parse::<usize>().map_err(|_| bad(format!("--step-ms {item}: the depth is not a whole number")))?), ms),
            None => (None, item.as_str()),
        };
        let ms: f64 = ms
            .trim()
            .parse()
            .ok()
            .filter(|m: &f64| m.is_finite() && *m > 0.0)
            .ok_or_else(|| bad(format!("--step-ms {item}: not a positive number of milliseconds")))?;
        given.push((d, ms));
    }
    if measure == Some(0) {
        return Err(bad("--measure must be at least 1".into()));
    }
    let costs = ex::costs(plan, shard)?;
    let planned = plan.runs()?.len();
    let runs: usize = costs.iter().map(|c| c.runs).sum();
    println!(
        "dry run: {runs} runs{} ({} arms x {} depths x {} rates x {} seeds = {planned} in the plan); nothing is trained",
        shard.map_or(String::new(), |s| format!(" in shard {}/{}", s.index, s.count)),
        plan.arms.len(),
        plan.depths.len(),
        plan.lrs.len().max(1),
        plan.seeds.len()
    );
    println!(
        "{:<18} {:>5} {:>7} {:>6} {:>12} {:>11} {:>13} {:>9} {:>10}",
        "arm", "depth", "lr", "runs", "parameters", "step peak", "steps / run", "ms / step", "hours"
    );
    let (mut hours, mut unknown) = (0.0, 0usize);
    for c in &costs {
        let ms = match measure {
            Some(n) => {
                let spec = plan.runs()?.into_iter().find(|s| s.arm == c.arm && s.depth == c.depth && s.lr == c.lr).expect("a cell comes from a run");
                let dev = fnokern::Device::of_kind(spec.config.train.device_kind()?)?;
                let mut st = fnokern::plan::SteadyState::new(&spec.config, &dev)?;
                let t = timed_steps(&mut st, &dev, n)?;
                Some(t[n / 2])
            }
            None => given.iter().find(|g| g.0 == Some(c.depth)).or_else(|| given.iter().find(|g| g.0.is_none())).map(|g| g.1),
        };
        let h = ms.zip(c.steps_per_run).map(|(ms, steps)| ms * steps as f64 * c.runs as f64 / 3.6e6);
        match h {
            Some(h) => hours += h,
            None => unknown += c.runs,
        }
        let f = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "{:<18} {:>5} {:>7} {:>6} {:>12} {:>12} {:>13} {:>9} {:>10}",
            c.arm,
            c.depth,
            f(c.lr.map(ex::lr_label)),
            c.runs,
            c.parameters,
            format!("{:.1} MiB", c.peak_bytes as f64 / (1u64 << 20) as f64),
            f(c.steps_per_run.map(|s| s.to_string())),
            f(ms.map(|m| format!("{m:.1}"))),
            f(h.map(|h| format!("{h:.1}")))
        );
    }
    if unknown == runs {
        println!("device-hours: give --step-ms (from `fnokern bench-step` on the target device) or --measure N");
    } else {
        println!(
            "device-hours: {hours:.1} of training steps{} (validation passes and evaluation add a few percent)",
            if unknown > 0 { format!(", without {unknown} runs whose step time or length is unknown") } else { String::new() }
        );
    }
    Ok(0)
}

/// The milliseconds of `n` training steps of `s` on `dev` (a GPU synchronised after each),
/// sorted ascending: what bench-step and a sweep's `--dry-run --measure` report.
fn timed_steps(s: &mut fnokern::plan::SteadyState, dev: &fnokern::Device, n: usize) -> fnokern::Result<Vec<f64>> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        s.trainer.step(s.batch.clone(), true)?;
        if dev.kind().is_gpu() {
            dev.synchronize()?;
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

fn bench_step(args: &ConfigArgs, steps: usize, profile: bool) -> fnokern::Result<()> {
    if steps == 0 {
        return Err(fnokern::Error::InvalidArgument { op: "bench-step", why: "--steps must be at least 1".into() });
    }
    let cfg = args.resolve()?;
    let dev = fnokern::Device::of_kind(cfg.train.device_kind()?)?;
    let mut s = fnokern::plan::SteadyState::new(&cfg, &dev)?;
    fnokern::backend::profile::set_enabled(profile);
    let ms = timed_steps(&mut s, &dev, steps)?;
    println!(
        "step: median {:.2} ms, fastest {:.2} ms over {steps} steps ({} parameters, batch {}, N {}, {}, {} threads)",
        ms[steps / 2],
        ms[0],
        s.trainer.model().num_params(),
        cfg.train.batch_size,
        cfg.input_size(),
        dev.kind(),
        rayon::current_num_threads()
    );
    if profile {
        fnokern::backend::profile::set_enabled(false);
        print_profile(&fnokern::backend::profile::take(), ms.iter().sum::<f64>(), steps);
    }
    Ok(())
}

/// The per-op table of `bench-step --profile`: per step, slowest first.
fn print_profile(rows: &[fnokern::backend::profile::OpTime], total_ms: f64, steps: usize) {
    let per = |ms: f64| ms / steps as f64;
    let step = per(total_ms);
    println!("{:<26} {:>8} {:>10} {:>7}", "op", "calls", "ms/step", "share");
    let mut counted = 0.0;
    for r in rows {
        let ms = r.time.as_secs_f64() * 1e3;
        counted += ms;
        println!("{:<26} {:>8} {:>10.2} {:>6.1}%", r.op, r.calls / steps as u64, per(ms), 100.0 * per(ms) / step);
    }
    let rest = per(total_ms - counted);
    println!("{:<26} {:>8} {:>10.2} {:>6.1}%", "(outside the ops)", "", rest, 100.0 * rest / step);
    println!("{:<26} {:>8} {:>10.2}", "step (mean)", "", step);
}

fn plan(args: &ConfigArgs, batch: Option<usize>, n: Option<usize>, checkpoint: Option<String>) -> fnokern::Result<()> {
    let mut cfg = args.resolve()?;
    if let Some(b) = batch {
        cfg.set(&format!("train.batch_size={b}"))?;
    }
    if let Some(n) = n {
        cfg.set(&format!("data.n={n}"))?;
    }
    if let Some(c) = checkpoint {
        cfg.model.checkpoint = c.parse()?;
    }
    cfg.validate()?;
    println!(
        "plan: depth {}, width {}, max_channels {}, modes {}, N {}, block {:?}, optimizer {:?}, spike action {:?}",
        cfg.model.depth, cfg.model.width, cfg.model.max_channels, cfg.model.modes, cfg.data.n, cfg.model.block, cfg.train.optimizer, cfg.train.spike_action
    );
    let p = fnokern::plan::plan(&cfg)?;
    print!("{}", p.render(cfg.train.memory_limit_bytes()?));
    let kind = cfg.train.device_kind()?;
    if kind.is_gpu() {
        // The same step, really run on the GPU: its ledger (the tensors) and the memory pool's
        // high-water mark (the tensors plus cuFFT work areas, im2col columns and reduction
        // partials, and the pool's rounding) against the plan.
        for (policy, planned) in [(fnokern::config::CheckpointPolicy::None, &p.plain), (p.policy, &p.checkpointed)] {
            let mut c = cfg.clone();
            c.model.checkpoint = policy;
            c.train.memory_limit = None;
            let dev = fnokern::Device::of_kind(kind)?;
            let m = fnokern::plan::step_memory(&c, &dev)?;
            let pool = dev.gpu_pool_peak()?.unwrap_or(0);
            let pct = |v: u64| 100.0 * (v as f64 - planned.peak as f64) / planned.peak.max(1) as f64;
            println!(
                "measured on {kind}, checkpoint {policy}: ledger peak {} B ({:+.2}% of the plan), memory pool peak {} B ({:+.2}%)",
                m.peak,
                pct(m.peak),
                pool,
                pct(pool)
            );
        }
    }
    Ok(())
}

fn data(args: &ConfigArgs, workload: Option<&str>, export: Option<&std::path::Path>) -> fnokern::Result<()> {
    use fnokern::config::Workload;
    let wanted = match workload {
        None => None,
        Some("gridlines") => Some(Workload::Gridlines),
        Some("darcy") => Some(Workload::Darcy),
        Some(other) => return Err(fnokern::Error::InvalidArgument { op: "--workload", why: format!("`{other}`: use gridlines or darcy") }),
    };
    let cfg = match wanted {
        Some(Workload::Darcy) => args.src.resolve(args.depth, Some("darcy"))?,
        _ => args.resolve()?,
    };
    if let Some(w) = wanted {
        if cfg.data.workload != w {
            return Err(fnokern::Error::InvalidArgument { op: "--workload", why: format!("the config's data.workload is {:?}, not {w:?}", cfg.data.workload) });
        }
    }
    if cfg.data.workload == Workload::Darcy {
        return darcy_data(&cfg, export);
    }
    let start = std::time::Instant::now();
    let ds = fnokern::data::load_or_simulate(&cfg.data, &mut |m| eprintln!("{m}"))?;
    for (name, s) in [("train", &ds.train), ("test", &ds.test)] {
        let mean = s.diffraction.iter().map(|&v| v as f64).sum::<f64>() / s.diffraction.len().max(1) as f64;
        println!(
            "{name}: {} patterns of {}x{}, mean diffraction amplitude {mean:.4e}, stitchable: {}",
            s.len(),
            s.n,
            s.n,
            s.centres.is_some() && s.ground_truth.is_some()
        );
    }
    say_source(&ds.source, cfg.data.npz.is_some(), ds.from_cache, "simulated", start);
    if let Some(dir) = export {
        std::fs::create_dir_all(dir).map_err(|source| fnokern::Error::Io { path: dir.display().to_string(), source })?;
        for (name, s) in [("train.npz", &ds.train), ("test.npz", &ds.test)] {
            fnokern::data::npz::save(&dir.join(name), s)?;
        }
        println!("exported train.npz and test.npz to {}", dir.display());
    }
    Ok(())
}

/// The `source:` line of `fnokern data`: where the data came from and its size on disk.
fn say_source(source: &str, from_files: bool, from_cache: bool, made: &str, start: std::time::Instant) {
    let size: u64 = std::fs::read_dir(source).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    let mib = size as f64 / 1048576.0;
    let how = if from_files {
        "read from the NPZ files".to_string()
    } else if from_cache {
        format!("read from the cache, {mib:.1} MiB on disk (data.cache_dir)")
    } else {
        format!("{made} and cached there: {mib:.1} MiB written (data.cache_dir)")
    };
    println!("source: {source} ({how}; {:.1} s)", start.elapsed().as_secs_f64());
}

fn darcy_data(cfg: &Config, export: Option<&std::path::Path>) -> fnokern::Result<()> {
    let start = std::time::Instant::now();
    let d = &cfg.darcy;
    let ds = fnokern::data::darcy::load_or_generate(d, &cfg.data.cache_dir, &mut |m| eprintln!("{m}"))?;
    for (name, s) in [("train", &ds.train), ("test", &ds.test)] {
        let frac_high = s.coeff.iter().filter(|&&a| a as f64 >= (d.high + d.low) / 2.0).count() as f64 / s.coeff.len().max(1) as f64;
        let umax = s.sol.iter().fold(0.0f32, |m, &u| m.max(u));
        println!(
            "{name}: {} samples of {}x{}, coefficient {} on {:.1}% of the points (else {}), max u {umax:.4e}",
            s.len(),
            s.s,
            s.s,
            d.high,
            100.0 * frac_high,
            d.low
        );
    }
    say_source(&ds.source, d.npz.is_some(), ds.from_cache, "generated", start);
    if let Some(dir) = export {
        std::fs::create_dir_all(dir).map_err(|source| fnokern::Error::Io { path: dir.display().to_string(), source })?;
        for (name, s) in [("train.npz", &ds.train), ("test.npz", &ds.test)] {
            fnokern::data::darcy::save_split(&dir.join(name), s)?;
        }
        println!("exported train.npz and test.npz (arrays coeff and sol) to {}", dir.display());
    }
    Ok(())
}

fn grad(args: &ConfigArgs, weights: &std::path::Path, batch: &std::path::Path, out: &std::path::Path) -> fnokern::Result<()> {
    let cfg = args.resolve()?;
    let loss = fnokern::train::parity::grad_to_file(&cfg, weights, batch, out)?;
    println!("loss {loss:.8e}; wrote loss, output and parameter gradients to {}", out.display());
    Ok(())
}

fn model(args: &ConfigArgs, save_weights: Option<&std::path::Path>) -> fnokern::Result<()> {
    let cfg = args.resolve()?;
    // Shapes only, unless the weights are wanted: the meta device builds parameters without data.
    let build = |dev: &fnokern::Device| fnokern::model::Generator::new(&cfg.model, cfg.input_size(), cfg.in_channels(), dev, fnokern::DType::F32);
    let mut g = build(&fnokern::Device::meta())?;
    if save_weights.is_some() {
        // The parameters in f32, and the file's bytes as they are written.
        let bytes = g.num_params() as u64 * 4;
        fnokern::device::ensure_host_fits(2 * bytes, "--save-weights (the parameters and their file)", "lower model.width, model.max_channels or model.depth")?;
        g = build(&fnokern::Device::cpu())?;
    }
    let m = &cfg.model;
    match m.kind {
        fnokern::config::ModelKind::Ufno => println!(
            "hybrid U-FNO generator: depth {}, width {}, modes {} ({:?}), max_channels {}, block {:?}, N {}",
            m.depth, m.width, m.modes, m.mode_convention, m.max_channels, m.block, cfg.data.n
        ),
        fnokern::config::ModelKind::Fno2d => println!(
            "FNO-2D: {} Fourier layers, width {}, modes {} ({:?}), projection {}, s {}",
            m.depth,
            m.width,
            m.modes,
            m.mode_convention,
            m.projection,
            cfg.input_size()
        ),
    }
    print!("{}", g.describe());
    if let Some(path) = save_weights {
        fnokern::model::weights::save_params(path, &g.params, None)?;
        println!("wrote the initial weights to {}", path.display());
    }
    Ok(())
}

fn info() {
    use fnokern::build_info as b;
    println!("fnokern {}", env!("CARGO_PKG_VERSION"));
    println!("cpu: {} threads (rayon)", rayon::current_num_threads());
    if b::KERNELS_EMBEDDED {
        println!("cuda kernels: embedded ({} bytes), nvcc: {}, targets: {}", b::FATBIN.len(), b::NVCC, b::CUDA_TARGETS);
    } else {
        println!("cuda kernels: not embedded (CPU-only build)");
    }
    match fnokern::backend::gpu::probe(0) {
        Ok(g) => {
            println!(
                "gpu 0: {} (compute capability {}.{}), driver CUDA {}.{}, memory {:.2} GiB free of {:.2} GiB",
                g.name,
                g.compute_capability.0,
                g.compute_capability.1,
                g.driver_version / 1000,
                (g.driver_version % 1000) / 10,
                g.free_bytes as f64 / (1u64 << 30) as f64,
                g.total_bytes as f64 / (1u64 << 30) as f64
            );
            match fnokern::Device::cuda(0).and_then(|d| fnokern::backend::gpu::self_test(&d)) {
                Ok(()) => println!(
                    "gpu 0: the embedded kernels load; an allocation, copies, a kernel, cuBLAS and cuFFT agree with the CPU: `--device cuda` trains on it"
                ),
                Err(e) => println!("gpu 0: not usable for training: {e}"),
            }
        }
        Err(e) => println!("gpu: none usable ({e})"),
    }
    println!("training devices: cpu (default), cuda[:N] with --device");
    println!(
        "data parallel: {}; nccl: {}",
        if cfg!(feature = "mpi") { "MPI built in (mpiexec/srun fnokern train ...)" } else { "MPI not built (cargo build --release --features mpi)" },
        fnokern::parallel::nccl::availability()
    );
}

fn gradcheck(only: Option<&str>) -> fnokern::Result<()> {
    let cases = fnokern::gradcheck::all_cases();
    let mut failed = 0;
    let mut ran = 0;
    for case in cases.iter().filter(|c| only.is_none_or(|o| c.name.contains(o))) {
        ran += 1;
        let report = (case.run)()?;
        let status = if report.passed() { "ok  " } else { "FAIL" };
        println!("{status} {:<34} {:>5} entries  max abs err {:.2e}  max rel err {:.2e}", case.name, report.checked, report.max_abs_err, report.max_rel_err);
        if !report.passed() {
            failed += 1;
            for m in report.mismatches.iter().take(5) {
                println!("       {m}");
            }
        }
    }
    if ran == 0 {
        let names: Vec<&str> = cases.iter().map(|c| c.name).collect();
        return Err(fnokern::Error::InvalidArgument {
            op: "gradcheck",
            why: format!("no check's name contains `{}`; the checks are: {}", only.unwrap_or_default(), names.join(", ")),
        });
    }
    println!("{} passed, {failed} failed", ran - failed);
    if failed > 0 {
        return Err(fnokern::Error::Autograd(format!("{failed} gradient checks failed")));
    }
    Ok(())
}
