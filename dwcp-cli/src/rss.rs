//! Peak anonymous resident memory of this process, sampled in the background.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Sampling period.
const PERIOD: Duration = Duration::from_millis(10);

/// Samples `RssAnon` from `/proc/self/status` every 10 ms and keeps the maximum.
#[derive(Debug)]
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RssSampler {
    /// Takes a first sample and starts sampling.
    pub fn start() -> Self {
        let peak = Arc::new(AtomicU64::new(rss_anon_bytes().unwrap_or(0)));
        let (stop, stopped) = mpsc::channel::<()>();
        let p = Arc::clone(&peak);
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                loop {
                    if let Some(b) = rss_anon_bytes() {
                        p.fetch_max(b, Ordering::Relaxed);
                    }
                    match stopped.recv_timeout(PERIOD) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })
            .ok();
        Self {
            peak,
            stop: Some(stop),
            thread,
        }
    }

    /// Stops sampling and returns the peak in bytes (0 where `/proc` is not available).
    pub fn finish(mut self) -> u64 {
        self.stop_thread();
        if let Some(b) = rss_anon_bytes() {
            self.peak.fetch_max(b, Ordering::Relaxed);
        }
        self.peak.load(Ordering::Relaxed)
    }

    fn stop_thread(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The current `RssAnon` of this process in bytes.
pub fn rss_anon_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_rss_anon(&status)
}

fn parse_rss_anon(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("RssAnon:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let s = "Name:\tdwcp\nVmRSS:\t  2000 kB\nRssAnon:\t    1234 kB\nRssFile:\t 10 kB\n";
        assert_eq!(parse_rss_anon(s), Some(1234 * 1024));
        assert_eq!(parse_rss_anon("Name: x\n"), None);
    }

    #[test]
    fn sampler_sees_an_allocation() {
        if rss_anon_bytes().is_none() {
            return;
        }
        let sampler = RssSampler::start();
        let block = vec![1u8; 64 << 20];
        std::thread::sleep(Duration::from_millis(30));
        std::hint::black_box(&block);
        let peak = sampler.finish();
        assert!(peak >= 64 << 20, "peak {peak}");
    }
}
