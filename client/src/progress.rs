//! Progress of long local work (training, a large base-model download): a
//! bar on an interactive terminal, nothing otherwise (callers log their own
//! milestones, so logs stay line-oriented).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Training steps.
pub const BATCHES: &str = "{msg} [{bar:30}] {pos}/{len} batches {per_sec}";
/// A download.
pub const BYTES: &str = "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left";

/// A bar of `len` steps drawn with `template`, when stderr is a terminal.
pub fn bar(len: u64, template: &str, message: String) -> Option<ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(message);
        bar
    })
}

/// Whole tenths of `done` out of `total`, for milestone logs.
pub fn tenths(done: u64, total: u64) -> u64 {
    (done.saturating_mul(10))
        .checked_div(total)
        .unwrap_or(10)
        .min(10)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tenths_count_whole_tenths_and_survive_an_empty_total() {
        assert_eq!(super::tenths(0, 100), 0);
        assert_eq!(super::tenths(19, 100), 1);
        assert_eq!(super::tenths(100, 100), 10);
        assert_eq!(super::tenths(5, 0), 10);
        assert_eq!(super::tenths(u64::MAX, 3), 10);
    }
}
