//! The destination's half of post-copy: what a fault needs and what an arriving page does.

use std::collections::HashMap;

use dwcp_core::error::Error;

use super::wire::Complete;
use super::{PageSet, SetDigest};

/// What the shell does about a guest fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultDecision {
    /// Ask the source for the page now.
    Request,
    /// The page is already asked for, or arriving: wait (wake the faulting thread if it is there).
    Wait,
    /// The page is not in the post-copy set and was never written: it is zero; fill it locally.
    ZeroFill,
}

/// What the shell does with a page that arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Place it (atomically, waking any thread faulting on it), then call
    /// [`PostcopyDest::placed`]. `waited_ns`: how long the guest had waited, if it faulted on it.
    Place {
        /// Nanoseconds from the first fault on the page until now.
        waited_ns: Option<u64>,
    },
    /// Another copy was placed first: drop this one.
    Duplicate,
}

/// Counters of a destination's post-copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostcopyDestStats {
    /// Guest faults on missing pages (each page counted once per wait).
    pub faults: u64,
    /// Faults on pages outside the set, filled with zeros locally.
    pub zero_fills: u64,
    /// Pages that arrived after another copy was placed.
    pub duplicates: u64,
    /// Pages placed.
    pub placed: u64,
    /// Requests repeated after a reconnect.
    pub rerequested: u64,
}

/// Tracks, on the destination, which pages of the post-copy set are still missing.
#[derive(Debug, Clone)]
pub struct PostcopyDest {
    set: PageSet,
    missing: PageSet,
    /// Missing pages the guest faulted on, with the time of the first fault.
    requested: HashMap<u64, u64>,
    /// Placements announced by `on_page` and not yet confirmed by `placed`.
    placing: u64,
    digest: SetDigest,
    stats: PostcopyDestStats,
}

impl PostcopyDest {
    /// Post-copy of `set`, as announced by the source.
    pub fn new(set: PageSet) -> Self {
        Self {
            missing: set.clone(),
            set,
            requested: HashMap::new(),
            placing: 0,
            digest: SetDigest::default(),
            stats: PostcopyDestStats::default(),
        }
    }

    /// The guest faulted on `page` at `now_ns`. `page` is below the set's bound (the shell maps
    /// the fault address to a page of the memory).
    pub fn on_fault(&mut self, page: u64, now_ns: u64) -> FaultDecision {
        if !self.set.contains(page) {
            self.stats.zero_fills += 1;
            return FaultDecision::ZeroFill;
        }
        if !self.missing.contains(page) || self.requested.contains_key(&page) {
            return FaultDecision::Wait;
        }
        self.requested.insert(page, now_ns);
        self.stats.faults += 1;
        FaultDecision::Request
    }

    /// Page `page` arrived at `now_ns`, its bytes hashing to `page_hash`. A page outside the set is
    /// a protocol error: placing it would overwrite memory the guest already owns.
    pub fn on_page(&mut self, page: u64, page_hash: u128, now_ns: u64) -> Result<Placement, Error> {
        if !self.set.contains(page) {
            return Err(Error::Protocol(format!(
                "the source sent page {page}, which is not in the post-copy set"
            )));
        }
        if !self.missing.remove(page) {
            self.stats.duplicates += 1;
            return Ok(Placement::Duplicate);
        }
        self.digest.add(page, page_hash);
        self.placing += 1;
        let waited_ns = self
            .requested
            .remove(&page)
            .map(|at| now_ns.saturating_sub(at));
        Ok(Placement::Place { waited_ns })
    }

    /// A placement announced by [`on_page`](Self::on_page) is done. True when it was the last:
    /// every page of the set is in memory.
    pub fn placed(&mut self) -> bool {
        self.placing = self.placing.saturating_sub(1);
        self.stats.placed += 1;
        self.is_complete()
    }

    /// Every page of the set is in memory.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.placing == 0
    }

    /// Pages still missing.
    pub fn missing(&self) -> &PageSet {
        &self.missing
    }

    /// A new connection to the source after a lost one: what to send it — the pages still
    /// missing, and the pages the guest waits for, to request again at once.
    pub fn on_reconnect(&mut self) -> (PageSet, Vec<u64>) {
        let mut waiting: Vec<u64> = self.requested.keys().copied().collect();
        waiting.sort_unstable();
        self.stats.rerequested += waiting.len() as u64;
        (self.missing.clone(), waiting)
    }

    /// The counters so far.
    pub fn stats(&self) -> PostcopyDestStats {
        self.stats
    }

    /// The closing report, once [`is_complete`](Self::is_complete).
    pub fn complete(&self) -> Complete {
        Complete {
            digest: self.digest.value(),
            pages: self.stats.placed,
            faults: self.stats.faults,
        }
    }
}
