//! Plots and tables. This module reads results (run directories, theory
//! outputs); it never trains.

pub mod font;
