//! Keeping freed memory: a training step allocates and frees the same
//! large tensors every time, and mimalloc hands freed memory back to the
//! kernel after a delay, which then zeroes it page by page when the next
//! step faults it back in: 13% of a GPT-2 step on 2 cores (BENCHMARKS.md).
//!
//! mimalloc reads that delay from `MIMALLOC_PURGE_DELAY` when the process
//! starts, and changing the environment in-process needs `unsafe`, so a
//! training binary re-executes itself once with `MIMALLOC_PURGE_DELAY=-1`
//! (never purge). Its peak memory is what it would hold anyway at the peak
//! of a step.

use std::os::unix::process::CommandExt;

const VARIABLE: &str = "MIMALLOC_PURGE_DELAY";

/// Re-executes this binary with freed memory kept, unless the variable is
/// already set (then, or if the re-execution fails, carries on as it is).
pub fn keep_freed_memory() {
    if std::env::var_os(VARIABLE).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(VARIABLE, "-1")
        .exec();
    // exec returns only when it failed; nothing was replaced.
    eprintln!("note: running without {VARIABLE}=-1 ({error}); training may be slower");
}
