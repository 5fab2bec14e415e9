//! Keeping freed memory: a training step allocates and frees the same
//! large tensors every time, and mimalloc hands freed memory back to the
//! kernel after a delay, which then zeroes it page by page when the next
//! step faults it back in: 13% of a GPT-2 step on 2 cores (BENCHMARKS.md).
//!
//! mimalloc reads that delay from `MIMALLOC_PURGE_DELAY` when the process
//! starts, and changing the environment in-process needs `unsafe`, so a
//! training binary re-executes itself once with `MIMALLOC_PURGE_DELAY=-1`
//! (never purge). Its peak memory is what it would hold anyway at the peak
//! of a step, plus whatever transient buffers the allocator could not
//! reuse: for a LoRA base held in bf16 or f16, whose layers are widened to
//! f32 one at a time, that was more than the narrow base saved. A binary
//! asked for a narrow base therefore runs with `MIMALLOC_PURGE_DELAY=0`
//! instead and hands freed memory back at once (BENCHMARKS.md has both).

use std::os::unix::process::CommandExt;

const VARIABLE: &str = "MIMALLOC_PURGE_DELAY";

/// Re-executes this binary with freed memory kept, unless the variable is
/// already set (then, or if the re-execution fails, carries on as it is).
pub fn keep_freed_memory() {
    reexec_with_purge_delay("-1");
}

/// Re-executes this binary with freed memory handed back at once, for a
/// process that holds a narrow LoRA base to save memory: mimalloc's own
/// 10 ms delay still let a step's widened layers pile up (BENCHMARKS.md).
pub fn return_freed_memory() {
    reexec_with_purge_delay("0");
}

/// Keeps freed memory, or returns it when `narrow_base` (see above).
pub fn for_base(narrow_base: bool) {
    if narrow_base {
        return_freed_memory();
    } else {
        keep_freed_memory();
    }
}

fn reexec_with_purge_delay(delay: &str) {
    if std::env::var_os(VARIABLE).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(VARIABLE, delay)
        .exec();
    // exec returns only when it failed; nothing was replaced.
    eprintln!("note: running without {VARIABLE}={delay} ({error}); memory use may differ");
}
