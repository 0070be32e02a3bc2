//! Crash injection for the kill-and-resume tests: `COVNOISE_FAULT` names a
//! point at which the process kills itself with SIGKILL (no destructors, no
//! flush), as a power loss or the OOM killer would.
//!
//! - `step:N`: after the optimizer update of (0-based) step N;
//! - `checkpoint-rename`: after a checkpoint's files are written and synced,
//!   before its directory is renamed into place.
//!
//! Without the variable every point is a no-op.

use std::sync::OnceLock;

/// Where a crash can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// After the update of this step.
    AfterStep(u64),
    /// Between a checkpoint's write and its rename.
    CheckpointRename,
}

fn configured() -> Option<Point> {
    static FAULT: OnceLock<Option<Point>> = OnceLock::new();
    *FAULT.get_or_init(|| {
        let value = std::env::var("COVNOISE_FAULT").ok()?;
        match value.as_str() {
            "checkpoint-rename" => Some(Point::CheckpointRename),
            v => v
                .strip_prefix("step:")
                .and_then(|n| n.parse().ok())
                .map(Point::AfterStep),
        }
    })
}

/// Kills the process if `COVNOISE_FAULT` names `point`.
pub fn point(point: Point) {
    if configured() == Some(point) {
        kill_self();
    }
}

fn kill_self() -> ! {
    #[cfg(unix)]
    // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}
