//! Data-parallel training: the processes of one run, how they meet, and the collectives the
//! trainer needs.
//!
//! A run on N processes ("ranks") trains exactly as one process with `accumulate` N times larger:
//! the trainer goes through an epoch's micro-batches in rounds of N, rank r taking the round's
//! r-th, and every decision a step makes (input check, loss guard, spike guard, skips, rollbacks,
//! the loss scale, the update) is replayed on every rank from everyone's losses, in micro-batch
//! order, as the single process makes it ([`crate::train::Trainer::round`]). Gradients travel as
//! one flat buffer per rank and are summed in micro-batch order with the single process's own
//! addition, so that on the CPU the result is the single-process run's bit for bit (MPI's own
//! reductions do not fix an order).
//!
//! [`World`] is the run's view of its ranks: [`World::solo`] for one process, or the MPI world
//! (`--features mpi`) when `mpirun`/`mpiexec`/`srun` started the process. Rank 0 alone writes the
//! run directory.

#[cfg(feature = "mpi")]
mod mpi_world;
pub mod nccl;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::tensor::{DType, Shape, Tensor};

/// The collectives a data-parallel run needs. Every rank calls each of them, in the same order,
/// with the same lengths where they are fixed: a rank that cannot go on ends the job
/// ([`Collective::abort`]) instead of leaving the others waiting.
pub trait Collective: Send + Sync {
    /// This process's rank, 0..size.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's bytes (of any length), in rank order.
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Waits until every rank has come here.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job with `code`, now.
    fn abort(&self, code: i32) -> !;
    /// What launched the ranks, for messages ("MPI (MPICH 5.0.2)").
    fn describe(&self) -> String;
}

/// One process: every collective is the identity.
struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn describe(&self) -> String {
        "one process".into()
    }
}

/// The ranks of a run (cheap to clone; one process by default): the host collectives, the time
/// spent in them, and on GPUs the ranks' NCCL communicator ([`World::attach_gpu`]).
#[derive(Clone)]
pub struct World(Arc<dyn Collective>, Arc<AtomicU64>, Arc<std::sync::OnceLock<Arc<nccl::DeviceComm>>>);

impl Default for World {
    fn default() -> World {
        World::solo()
    }
}

impl fmt::Debug for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "World(rank {} of {})", self.rank(), self.size())
    }
}

/// What a launcher (mpirun, mpiexec, srun) tells a process it started: its rank and the world's
/// size, read from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub launcher: &'static str,
    pub rank: usize,
    pub size: usize,
    /// The rank among the job's processes on this node (it picks the GPU).
    pub local_rank: Option<usize>,
}

impl Launch {
    /// The launch described by `var` (the environment: MPICH's and Open MPI's variables, Slurm's,
    /// torchrun's), if any says there is more than one process.
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let num = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| v.trim().parse::<usize>().map_err(|_| Error::invalid("launch", format!("the environment variable {name}={v:?} is not a count"))))
                .transpose()
        };
        // (launcher, rank variable, size variable, local-rank variable)
        const KINDS: [(&str, &str, &str, &str); 5] = [
            ("MPICH (mpirun/mpiexec)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            ("Open MPI (mpirun)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("PMIx", "PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
            ("Slurm (srun)", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
            ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ];
        for (launcher, rank, size, local) in KINDS {
            let (Some(r), Some(n)) = (num(rank)?, num(size)?) else { continue };
            if n <= 1 {
                continue;
            }
            if r >= n {
                return Err(Error::invalid("launch", format!("{rank}={r} is not below {size}={n}")));
            }
            return Ok(Some(Launch { launcher, rank: r, size: n, local_rank: num(local)? }));
        }
        Ok(None)
    }

    /// [`Launch::from_vars`] on this process's environment.
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(&|k| std::env::var(k).ok())
    }
}

impl World {
    /// Ranks started without MPI (torchrun's variables): NCCL carries everything, bootstrapped by
    /// `NCCL_COMM_ID` (set, or `MASTER_ADDR`:`MASTER_PORT`+1, beside the port torchrun's own
    /// store holds); each rank on the GPU of its local rank.
    fn join_nccl(launch: &Launch) -> Result<World> {
        if std::env::var_os("NCCL_COMM_ID").is_none() {
            let addr = std::env::var("MASTER_ADDR").ok();
            let port = std::env::var("MASTER_PORT").ok().and_then(|p| p.trim().parse::<u16>().ok());
            let (Some(addr), Some(port)) = (addr, port) else {
                return Err(Error::invalid(
                    "launch",
                    format!(
                        "{} started this process as rank {} of {} without MPI: its ranks meet through NCCL's own bootstrap, which needs \
                         NCCL_COMM_ID=<host>:<port> (or MASTER_ADDR and MASTER_PORT) set alike on every rank",
                        launch.launcher, launch.rank, launch.size
                    ),
                ));
            };
            // Read by NCCL in this process only; set before any other thread starts.
            std::env::set_var("NCCL_COMM_ID", format!("{addr}:{}", port.wrapping_add(1)));
        }
        let count = crate::backend::gpu::device_count()?.max(1);
        let device = crate::device::Device::cuda(launch.local_rank.unwrap_or(launch.rank) % count)?;
        let comm = Arc::new(nccl::DeviceComm::join(&device, launch.rank, launch.size, &nccl::new_id()?)?);
        let host = nccl::NcclHost::new(comm.clone(), launch.rank, launch.size);
        let lock = std::sync::OnceLock::new();
        let _ = lock.set(comm);
        Ok(World(Arc::new(host), Arc::default(), Arc::new(lock)))
    }

    /// One process.
    pub fn solo() -> World {
        World(Arc::new(Solo), Arc::default(), Arc::default())
    }

    /// The world this process was launched into: one process unless a launcher started several,
    /// in which case MPI joins them (a build without the `mpi` feature refuses, rather than
    /// train N copies of one run). Call once, before any other thread starts.
    pub fn from_launch() -> Result<World> {
        let Some(launch) = Launch::from_env()? else { return Ok(World::solo()) };
        if launch.launcher == "torchrun" {
            return World::join_nccl(&launch);
        }
        World::join(&launch)
    }

    #[cfg(feature = "mpi")]
    fn join(launch: &Launch) -> Result<World> {
        let w = mpi_world::MpiWorld::init()?;
        if (w.rank(), w.size()) != (launch.rank, launch.size) {
            return Err(Error::invalid(
                "launch",
                format!(
                    "{} says rank {} of {}, but MPI says rank {} of {}: was fnokern started by a launcher of another MPI than the one it was built with?",
                    launch.launcher,
                    launch.rank,
                    launch.size,
                    w.rank(),
                    w.size()
                ),
            ));
        }
        Ok(World(Arc::new(w), Arc::default(), Arc::default()))
    }

    #[cfg(not(feature = "mpi"))]
    fn join(launch: &Launch) -> Result<World> {
        Err(Error::invalid(
            "launch",
            format!(
                "{} started this process as rank {} of {}, but this fnokern was built without MPI: build it with `cargo build --release --features mpi` \
                 (README, \"Training on several GPUs or nodes\"), or run one process",
                launch.launcher, launch.rank, launch.size
            ),
        ))
    }

    pub fn rank(&self) -> usize {
        self.0.rank()
    }

    pub fn size(&self) -> usize {
        self.0.size()
    }

    /// Rank 0: the one that writes the run directory and talks to the user.
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    pub fn describe(&self) -> String {
        self.0.describe()
    }

    pub fn barrier(&self) -> Result<()> {
        self.0.barrier()
    }

    pub fn abort(&self, code: i32) -> ! {
        self.0.abort(code)
    }

    /// Every rank's bytes, in rank order.
    pub fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        if self.size() == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        let t0 = Instant::now();
        let all = self.0.all_gather(mine);
        self.1.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        all
    }

    /// Opens the ranks' NCCL communicator on `device` (a GPU; rank 0 makes its id and the host
    /// world carries it to the others). Once per world; nothing for one process.
    pub fn attach_gpu(&self, device: &crate::device::Device) -> Result<()> {
        if let Some(c) = self.2.get() {
            // Ranks that meet through NCCL alone (torchrun) have their GPU from the start.
            return if c.device().kind() == device.kind() {
                Ok(())
            } else {
                Err(Error::invalid("train", format!("this rank's NCCL communicator is on {}, but the run asks for {device}", c.device())))
            };
        }
        if self.size() == 1 {
            return Ok(());
        }
        // Every rank checks, so that each says why, before rank 0 makes the id.
        let loads = nccl::check_loadable();
        if !self.all_gather(&[loads.is_ok() as u8])?.iter().all(|b| b.first() == Some(&1)) {
            return loads.and(Err(Error::invalid("nccl", "NCCL does not load on every rank (their messages say where)")));
        }
        let id = if self.is_root() { nccl::new_id()? } else { Vec::new() };
        let id = self.broadcast(0, &id)?;
        let comm = nccl::DeviceComm::join(device, self.rank(), self.size(), &id)?;
        let _ = self.2.set(Arc::new(comm));
        Ok(())
    }

    /// Every rank's gradients, in rank order: this rank's `mine` (None: it has none this round;
    /// an out-of-memory error in its backward ends every rank's run as one), shaped as
    /// `shapes`, on `device`. Host ranks exchange one flat buffer of bytes each; GPU ranks a flat
    /// device buffer through NCCL, with which slots are present sent ahead through the host.
    pub(crate) fn gather_grads(
        &self,
        mine: Option<Result<Vec<Option<Tensor>>>>,
        shapes: &[Shape],
        device: &crate::device::Device,
    ) -> Result<Vec<Option<Vec<Option<Tensor>>>>> {
        let mine = match mine {
            None => None,
            Some(Ok(g)) => Some(g),
            Some(Err(e @ Error::OutOfMemory { .. })) => {
                let packet: Vec<u8> = std::iter::once(3u8).chain(oom_bytes(&e)).collect();
                let packets = self.all_gather(&packet)?;
                check_oom(&packets, 1)?;
                return Err(e);
            }
            Some(Err(e)) => return Err(e),
        };
        if let Some(comm) = self.2.get().filter(|_| device.kind().is_gpu()) {
            // Status 2 and a byte per slot (1: present), or 0 (no gradients this round).
            let packet: Vec<u8> = match &mine {
                Some(g) => std::iter::once(2u8).chain(g.iter().map(|s| s.is_some() as u8)).collect(),
                None => vec![0u8],
            };
            let packets = self.all_gather(&packet)?;
            check_oom(&packets, 1)?;
            let present: Vec<Vec<bool>> = packets.iter().map(|p| (0..shapes.len()).map(|i| p.get(i + 1) == Some(&1)).collect()).collect();
            let all = comm.all_gather_grads(mine.as_deref(), shapes, &present, device)?;
            return Ok(all.into_iter().zip(&packets).map(|(g, p)| (p.first() == Some(&2)).then_some(g)).collect());
        }
        let packet = match &mine {
            Some(g) => std::iter::once(2u8).chain(pack_grads(g)?).collect(),
            None => vec![0u8],
        };
        let packets = self.all_gather(&packet)?;
        check_oom(&packets, 1)?;
        packets
            .iter()
            .map(|p| match p.split_first() {
                Some((2, g)) => unpack_grads(g, shapes, device).map(Some),
                _ => Ok(None),
            })
            .collect()
    }

    /// Seconds this rank has spent in collectives so far: the transfers, and the waits for the
    /// slower ranks.
    pub fn collective_seconds(&self) -> f64 {
        self.1.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Every rank's values (the same count on every rank), in rank order.
    pub fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<Vec<f64>>> {
        let all = self.all_gather(bytemuck::cast_slice(mine))?;
        all.iter()
            .enumerate()
            .map(|(r, b)| {
                if b.len() != std::mem::size_of_val(mine) {
                    return Err(Error::invalid("all_gather", format!("rank {r} sent {} bytes where {} were expected", b.len(), std::mem::size_of_val(mine))));
                }
                Ok(bytemuck::pod_collect_to_vec::<u8, f64>(b))
            })
            .collect()
    }

    /// Whether any rank says `mine` (a stop request, say).
    pub fn any(&self, mine: bool) -> Result<bool> {
        Ok(self.all_gather(&[mine as u8])?.iter().any(|b| b.first() == Some(&1)))
    }

    /// Root's bytes on every rank (the others' `data` is ignored).
    pub fn broadcast(&self, root: usize, data: &[u8]) -> Result<Vec<u8>> {
        let all = self.all_gather(if self.rank() == root { data } else { &[] })?;
        all.into_iter().nth(root).ok_or_else(|| Error::invalid("broadcast", format!("no rank {root}")))
    }

    /// Runs `f` on rank 0 first, then (once it is done) on the others: the first reader of
    /// something that the first read writes (the data cache). An error on rank 0 ends the job.
    pub fn root_first<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        if self.size() == 1 {
            return f();
        }
        let root = if self.is_root() { Some(f()) } else { None };
        let ok = self.broadcast(0, &[root.as_ref().is_some_and(|r| r.is_ok()) as u8])?;
        if ok.first() != Some(&1) {
            return match root {
                Some(r) => r,
                None => Err(Error::RankFailed { rank: 0 }),
            };
        }
        match root {
            Some(r) => r,
            None => f(),
        }
    }
}

/// A rank's gradients as one flat buffer: each parameter slot's dtype tag and elements.
pub fn pack_grads(grads: &[Option<Tensor>]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(grads.iter().flatten().map(|g| g.size_in_bytes() + 1).sum::<usize>() + grads.len());
    for g in grads {
        let Some(g) = g else {
            out.push(0);
            continue;
        };
        let (tag, bytes): (u8, &[u8]) = match g.dtype() {
            DType::F32 => (1, bytemuck::cast_slice(g.as_slice::<f32>()?)),
            DType::F64 => (2, bytemuck::cast_slice(g.as_slice::<f64>()?)),
            DType::F16 => (3, bytemuck::cast_slice(g.as_slice::<half::f16>()?)),
            DType::BF16 => (4, bytemuck::cast_slice(g.as_slice::<half::bf16>()?)),
        };
        out.push(tag);
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

/// The gradients of [`pack_grads`], shaped as `shapes` (the parameters') on `device`.
pub fn unpack_grads(mut b: &[u8], shapes: &[Shape], device: &crate::device::Device) -> Result<Vec<Option<Tensor>>> {
    let bad = |why: String| Error::invalid("gradient exchange", why);
    let mut out = Vec::with_capacity(shapes.len());
    for (i, shape) in shapes.iter().enumerate() {
        let (&tag, rest) = b.split_first().ok_or_else(|| bad(format!("the buffer ends before slot {i}")))?;
        let size = match tag {
            0 => {
                out.push(None);
                b = rest;
                continue;
            }
            1 => 4,
            2 => 8,
            3 | 4 => 2,
            t => return Err(bad(format!("slot {i} has the unknown dtype tag {t}"))),
        };
        let n = shape.numel() * size;
        if rest.len() < n {
            return Err(bad(format!("slot {i} needs {n} bytes, {} are left", rest.len())));
        }
        let (data, rest) = rest.split_at(n);
        let t = match tag {
            1 => Tensor::from_vec(bytemuck::pod_collect_to_vec::<u8, f32>(data), shape.clone(), device)?,
            2 => Tensor::from_vec(bytemuck::pod_collect_to_vec::<u8, f64>(data), shape.clone(), device)?,
            3 => Tensor::from_vec(bytemuck::pod_collect_to_vec::<u8, half::f16>(data), shape.clone(), device)?,
            _ => Tensor::from_vec(bytemuck::pod_collect_to_vec::<u8, half::bf16>(data), shape.clone(), device)?,
        };
        out.push(Some(t));
        b = rest;
    }
    if !b.is_empty() {
        return Err(bad(format!("{} bytes are left over after {} slots", b.len(), shapes.len())));
    }
    Ok(out)
}

/// An out-of-memory error as bytes, for the other ranks ([`check_oom`] reads it back).
pub(crate) fn oom_bytes(e: &Error) -> Vec<u8> {
    let v = match e {
        Error::OutOfMemory { device, what, requested, in_use, limit } => {
            serde_json::json!({"device": device, "what": what, "requested": requested, "in_use": in_use, "limit": limit})
        }
        other => serde_json::json!({"device": "?", "what": other.to_string(), "requested": 0, "in_use": 0, "limit": 0}),
    };
    v.to_string().into_bytes()
}

/// The first rank's out-of-memory error among gathered packets (a packet whose first byte is 3
/// holds [`oom_bytes`] from byte `at` on), as every rank then reports it: an allocation over
/// the budget on any rank ends the run on all of them as an `oom` crash.
pub(crate) fn check_oom(packets: &[Vec<u8>], at: usize) -> Result<()> {
    let Some((rank, p)) = packets.iter().enumerate().find(|(_, p)| p.first() == Some(&3)) else { return Ok(()) };
    let v: serde_json::Value = serde_json::from_slice(p.get(at..).unwrap_or_default()).unwrap_or_default();
    let device = v["device"].as_str().unwrap_or("?");
    Err(Error::OutOfMemory {
        device: if packets.len() > 1 { format!("{device} (rank {rank})") } else { device.to_string() },
        what: v["what"].as_str().unwrap_or("?").to_string(),
        requested: v["requested"].as_u64().unwrap_or(0),
        in_use: v["in_use"].as_u64().unwrap_or(0),
        limit: v["limit"].as_u64().unwrap_or(0),
    })
}
