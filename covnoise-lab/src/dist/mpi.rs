//! [`MpiCollective`]: `MPI_COMM_WORLD` as a [`Collective`], with counters of
//! the time and bytes spent in all-reduces.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use ::mpi::Threading;
use ::mpi::collective::SystemOperation;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::{Communicator, CommunicatorCollectives};

use covnoise::collective::Collective;
use covnoise::error::{CovnoiseError, Result};

/// Communication spent in [`Collective::all_reduce_sum`] on this process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommStats {
    /// Number of all-reduce calls.
    pub calls: u64,
    /// Bytes this process contributed (4 per float32), summed over calls.
    pub bytes: u64,
    /// Wall-clock seconds inside the calls, waiting for slower processes
    /// included.
    pub seconds: f64,
}

/// All processes of the MPI job (`MPI_COMM_WORLD`) as a process group.
///
/// [`MpiCollective::init`] initializes MPI; clones share the MPI session and
/// the counters, and MPI is finalized when the last clone is dropped. MPI
/// calls are made from the thread that called `init` only (the tensor
/// backend's worker threads never communicate).
pub struct MpiCollective {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    stats: Rc<Cell<CommStats>>,
    // The send side of the all-reduce (the caller's buffer receives the sum).
    send: RefCell<Vec<f32>>,
    // Keeps MPI initialized; MPI_Finalize runs when the last clone drops it.
    // Last field, so that it is dropped after the communicator.
    universe: Rc<Universe>,
}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("stats", &self.stats.get())
            .finish_non_exhaustive()
    }
}

impl MpiCollective {
    /// Initializes MPI (at most once per process) and returns the world
    /// group. Outside `mpirun` this is a group of one process.
    pub fn init() -> Result<Self> {
        let (universe, _provided) = ::mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| CovnoiseError::Collective("MPI is already initialized".into()))?;
        let world = universe.world();
        let rank = usize::try_from(world.rank())
            .map_err(|_| CovnoiseError::Collective("negative MPI rank".into()))?;
        let size = usize::try_from(world.size())
            .map_err(|_| CovnoiseError::Collective("negative MPI world size".into()))?;
        Ok(Self {
            world,
            rank,
            size,
            stats: Rc::new(Cell::new(CommStats::default())),
            send: RefCell::new(Vec::new()),
            universe: Rc::new(universe),
        })
    }

    /// Time and bytes spent in all-reduces so far (shared by all clones).
    pub fn stats(&self) -> CommStats {
        self.stats.get()
    }

    /// Waits until every process has called `barrier`.
    pub fn barrier(&self) {
        self.world.barrier();
    }

    /// Ends the whole job: every process of `MPI_COMM_WORLD` is terminated
    /// and `mpirun` exits non-zero. For fatal errors on one process, which
    /// would otherwise leave the others waiting in the next all-reduce.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

impl Clone for MpiCollective {
    fn clone(&self) -> Self {
        Self {
            world: self.universe.world(),
            rank: self.rank,
            size: self.size,
            stats: Rc::clone(&self.stats),
            send: RefCell::new(Vec::new()),
            universe: Rc::clone(&self.universe),
        }
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buffer: &mut [f32]) -> Result<()> {
        if i32::try_from(buffer.len()).is_err() {
            return Err(CovnoiseError::Collective(format!(
                "all-reduce of {} floats exceeds MPI's count limit",
                buffer.len()
            )));
        }
        let mut send = self.send.borrow_mut();
        send.clear();
        send.extend_from_slice(buffer);
        let started = Instant::now();
        // MPI's default error handler aborts the job on a failed call, so
        // there is no error to return here.
        self.world
            .all_reduce_into(&send[..], buffer, SystemOperation::sum());
        let mut stats = self.stats.get();
        stats.calls += 1;
        stats.bytes += std::mem::size_of_val(buffer) as u64;
        stats.seconds += started.elapsed().as_secs_f64();
        self.stats.set(stats);
        Ok(())
    }
}
