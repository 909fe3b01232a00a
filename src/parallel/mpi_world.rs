//! The MPI world (rsmpi), for CPU ranks launched by `mpirun`, `mpiexec` or `srun`.

use ::mpi::datatype::PartitionMut;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::*;
use ::mpi::Count;

use super::Collective;
use crate::error::{Error, Result};

pub(super) struct MpiWorld {
    world: SimpleCommunicator,
    /// Finalises MPI when the process's world is dropped (at the end of `main`).
    _universe: Universe,
}

// SAFETY: MPI is initialised with `Threading::Single` and every call is made from the thread that
// runs the training (the World is handed to the run, not shared between threads that call it).
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

impl MpiWorld {
    pub(super) fn init() -> Result<MpiWorld> {
        let universe = ::mpi::initialize().ok_or_else(|| Error::invalid("launch", "MPI was initialised already"))?;
        let world = universe.world();
        Ok(MpiWorld { world, _universe: universe })
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.size();
        let len =
            Count::try_from(mine.len()).map_err(|_| Error::invalid("all_gather", format!("{} bytes are more than MPI counts in one message", mine.len())))?;
        let mut counts = vec![0 as Count; n];
        self.world.all_gather_into(&len, &mut counts[..]);
        let mut displs = Vec::with_capacity(n);
        let mut total: i64 = 0;
        for &c in &counts {
            displs
                .push(Count::try_from(total).map_err(|_| Error::invalid("all_gather", "the ranks' buffers together are more than MPI counts in one message"))?);
            total += c as i64;
        }
        let mut all = vec![0u8; total as usize];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(mine, &mut part);
        }
        Ok(counts.iter().zip(&displs).map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec()).collect())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    fn describe(&self) -> String {
        let lib = ::mpi::environment::library_version().unwrap_or_default();
        let first = lib.lines().next().unwrap_or("").split_whitespace().collect::<Vec<_>>().join(" ");
        format!("MPI ({})", if first.is_empty() { "unknown library".into() } else { first })
    }
}
