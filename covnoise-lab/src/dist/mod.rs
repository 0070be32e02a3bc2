//! Data-parallel training over MPI (feature `mpi`).
//!
//! The process group is a small adapter behind
//! [`Collective`](covnoise::collective::Collective): the training step and loop
//! are the same code on one process or many, and only the all-reduce differs.
//! Run `mpirun -np K covnoise train --distributed mpi ...`; each process takes
//! a shard of B_L / K examples of every global batch.

mod mpi;

pub use self::mpi::{CommStats, MpiCollective};
