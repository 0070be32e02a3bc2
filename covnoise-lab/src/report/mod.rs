//! Plots and tables. This module reads results (run directories, theory
//! outputs); it never trains.

pub mod font;
pub(crate) mod output;
pub mod run_plots;
pub mod runs;
pub mod theory_plots;
