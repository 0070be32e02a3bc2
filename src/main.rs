//! The `covnoise` command: a thin shell over the library.

mod cli;

use std::process::ExitCode;

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
