//! covnoise-lab: the `covnoise` command and everything only it needs, on
//! top of the [`covnoise`] library: the model zoo ([`zoo`]), data loaders
//! ([`data`]), the trainer and its run directories ([`train`]), studies
//! ([`study`]), reports ([`report`]), the quadratic model in closed form
//! ([`theory`]), benchmarks ([`bench`](mod@bench)), devices by name ([`device`]) and
//! the MPI adapter (`dist`, feature `mpi`).
//!
//! The zoo's models are users of the library like anyone's: plain burn
//! modules whose layers go through [`covnoise::model::Probes`].
//!
//! # Features
//!
//! `mpi`, `wgpu`, `cuda`, `ndarray`, `openblas`, `tch`, `learner`: see the
//! README.

#![warn(missing_docs)]

pub mod bench;
pub mod data;
pub mod device;
#[cfg(feature = "mpi")]
pub mod dist;
pub mod report;
pub mod study;
pub mod theory;
pub mod train;
pub mod zoo;
