//! The `covnoise` command: a thin shell over the library.

mod cli;

use std::process::ExitCode;

/// Counts heap use so that `covnoise bench` can report a step's memory.
#[global_allocator]
static ALLOCATOR: covnoise::bench::TrackingAllocator = covnoise::bench::TrackingAllocator;

fn main() -> ExitCode {
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line for the user, no backtrace: `{:#}` joins the context chain.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
