//! The `covnoise` command: a thin shell over the library.

mod cli;

use std::process::ExitCode;

/// Counts heap use so that `covnoise bench` can report a step's memory.
#[global_allocator]
static ALLOCATOR: covnoise_lab::bench::TrackingAllocator = covnoise_lab::bench::TrackingAllocator;

/// Makes glibc keep freed tensor buffers in its heap for the next step.
///
/// By default glibc serves a multi-megabyte buffer (a batch of activations)
/// with `mmap` and returns it with `munmap` when freed, so every training
/// step pays page faults and page zeroing for memory it just released;
/// `perf` on batch-4096 steps put 19% of samples in the kernel, 3.5% after
/// this change. Every buffer now comes from the heap (`M_MMAP_MAX` 0: the
/// threshold stops at glibc's maximum of 32 MiB, and the penalties'
/// micro-batch gradients of the MLP's first layer are 51 MB, page-faulted
/// afresh on every step: 12 % of that step's samples), and up to 1 GiB of
/// free heap is kept rather than trimmed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_buffers() {
    // SAFETY: mallopt only changes allocator tuning parameters; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_buffers() {}

fn main() -> ExitCode {
    keep_freed_buffers();
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line for the user, no backtrace: `{:#}` joins the context chain.
            eprintln!("error: {}", cli::render_error(&e));
            ExitCode::FAILURE
        }
    }
}
