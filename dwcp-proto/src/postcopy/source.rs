//! The source's half of post-copy: what to send next.

use std::collections::VecDeque;

use dwcp_core::error::Error;

use super::PageSet;
use super::wire::Complete;

/// Decides, on the source, which page of the post-copy set goes out next and on which stream.
#[derive(Debug, Clone)]
pub struct PostcopySource {
    set: PageSet,
    /// Pages not sent since the current connection started.
    to_push: PageSet,
    cursor: u64,
    urgent: VecDeque<u64>,
    served: u64,
    pushed: u64,
    connections: u32,
    complete: Option<Complete>,
}

impl PostcopySource {
    /// Post-copy of `set`, the pages the destination lacks when the source pauses the guest.
    pub fn new(set: PageSet) -> Self {
        Self {
            to_push: set.clone(),
            set,
            cursor: 0,
            urgent: VecDeque::new(),
            served: 0,
            pushed: 0,
            connections: 1,
            complete: None,
        }
    }

    /// The post-copy set.
    pub fn set(&self) -> &PageSet {
        &self.set
    }

    /// The destination's guest waits for `pages`. A page outside the set means the two sides
    /// disagree about what was moved: a protocol error, not a page to guess at.
    pub fn on_request(&mut self, pages: &[u64]) -> Result<(), Error> {
        if let Some(&p) = pages.iter().find(|&&p| !self.set.contains(p)) {
            return Err(Error::Protocol(format!(
                "the destination asked for page {p}, which is not in the post-copy set"
            )));
        }
        self.urgent.extend(pages);
        Ok(())
    }

    /// The next requested page to send on the urgent stream. Sent even if the background stream
    /// carried it already: that copy may still be queued behind megabytes of others, and the
    /// destination drops whichever copy comes second.
    pub fn next_urgent(&mut self) -> Option<u64> {
        let page = self.urgent.pop_front()?;
        self.to_push.remove(page);
        self.served += 1;
        Some(page)
    }

    /// Appends up to `max` pages for the background stream to `out`, in page order.
    pub fn next_push(&mut self, max: usize, out: &mut Vec<u64>) {
        for _ in 0..max {
            let Some(page) = self.to_push.next_from(self.cursor) else {
                return;
            };
            self.to_push.remove(page);
            self.cursor = page + 1;
            self.pushed += 1;
            out.push(page);
        }
    }

    /// Pages the background stream has not sent since the current connection started.
    pub fn push_remaining(&self) -> u64 {
        self.to_push.len()
    }

    /// The connection was lost: requests in flight are void (the destination repeats them).
    pub fn on_disconnect(&mut self) {
        self.urgent.clear();
    }

    /// A new connection: the destination says which pages it still lacks; only those are sent
    /// again. More than the set is a protocol error.
    pub fn on_resume(&mut self, missing: PageSet) -> Result<(), Error> {
        if !missing.is_subset_of(&self.set) {
            return Err(Error::Protocol(
                "the destination resumed post-copy missing pages that are not in its set".into(),
            ));
        }
        self.to_push = missing;
        self.cursor = 0;
        self.urgent.clear();
        self.connections += 1;
        Ok(())
    }

    /// The destination placed every page; checks its count against the set.
    pub fn on_complete(&mut self, complete: Complete) -> Result<(), Error> {
        if complete.pages != self.set.len() {
            return Err(Error::Protocol(format!(
                "the destination completed post-copy with {} pages placed of {}",
                complete.pages,
                self.set.len()
            )));
        }
        self.complete = Some(complete);
        Ok(())
    }

    /// What the destination reported at the end, once it did.
    pub fn completed(&self) -> Option<Complete> {
        self.complete
    }

    /// Pages sent on the urgent stream.
    pub fn served(&self) -> u64 {
        self.served
    }

    /// Pages sent on the background stream (again after a reconnect).
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Connections post-copy ran over (1 without a reconnect).
    pub fn connections(&self) -> u32 {
        self.connections
    }
}
