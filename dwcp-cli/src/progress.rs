//! The progress bar of a migration (stderr).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

use dwcp::Progress;
use dwcp_core::memory::PAGE_SIZE;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// No pass seen yet.
const NO_STAGE: u64 = u64::MAX;

/// A bar over the bytes of the current pass, labelled `pass N` or `stop-and-copy`.
#[derive(Debug)]
pub struct ProgressView {
    bar: ProgressBar,
    /// `iteration << 1 | paused` of the pass the bar shows.
    stage: AtomicU64,
}

impl ProgressView {
    /// A bar on stderr if `wanted` and stderr is a terminal; otherwise a hidden one.
    pub fn new(wanted: bool) -> Self {
        let bar = if wanted && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{msg:>13} [{wide_bar:.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("a valid progress template")
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        } else {
            ProgressBar::hidden()
        };
        Self {
            bar,
            stage: AtomicU64::new(NO_STAGE),
        }
    }

    /// Shows a progress event.
    pub fn update(&self, p: &Progress) {
        let stage = (u64::from(p.iteration) << 1) | u64::from(p.paused);
        if self.stage.swap(stage, Ordering::Relaxed) != stage {
            self.bar.reset();
            self.bar.set_length(p.pass_pages_total * PAGE_SIZE as u64);
            self.bar.set_message(if p.paused {
                "stop-and-copy".to_string()
            } else {
                format!("pass {}", p.iteration)
            });
        }
        self.bar.set_position(p.pass_pages_sent * PAGE_SIZE as u64);
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
