//! The two machines wired back to back in memory, with lossy connections and virtual time.

use std::collections::VecDeque;

use proptest::prelude::*;

use super::wire::Complete;
use super::*;

/// Page contents are their number plus a generation: enough to catch a wrong or stale page.
fn content(page: u64) -> u128 {
    u128::from(page) * 0x9E37_79B9 + 17
}

struct Pair {
    source: PostcopySource,
    dest: PostcopyDest,
    /// Pages on the urgent and background streams (source to destination), in order.
    urgent: VecDeque<u64>,
    push: VecDeque<u64>,
    /// Requests in flight (destination to source).
    requests: VecDeque<Vec<u64>>,
    /// The destination's memory: Some once placed.
    memory: Vec<Option<u128>>,
    now: u64,
}

impl Pair {
    fn new(total: u64, set: &PageSet) -> Self {
        Self {
            source: PostcopySource::new(set.clone()),
            dest: PostcopyDest::new(set.clone()),
            urgent: VecDeque::new(),
            push: VecDeque::new(),
            requests: VecDeque::new(),
            memory: (0..total)
                .map(|p| (!set.contains(p)).then(|| content(p)))
                .collect(),
            now: 0,
        }
    }

    fn arrive(&mut self, page: u64) {
        match self.dest.on_page(page, content(page), self.now).unwrap() {
            Placement::Place { .. } => {
                assert!(
                    self.memory[page as usize].is_none(),
                    "page {page} placed twice"
                );
                self.memory[page as usize] = Some(content(page));
                self.dest.placed();
            }
            Placement::Duplicate => assert!(self.memory[page as usize].is_some()),
        }
    }

    /// One tick: each direction delivers what is in flight, the source sends a little.
    fn step(&mut self, push_per_tick: usize) {
        self.now += 1_000;
        while let Some(req) = self.requests.pop_front() {
            self.source.on_request(&req).unwrap();
        }
        while let Some(p) = self.source.next_urgent() {
            self.urgent.push_back(p);
        }
        let mut batch = Vec::new();
        self.source.next_push(push_per_tick, &mut batch);
        self.push.extend(batch);
        while let Some(p) = self.urgent.pop_front() {
            self.arrive(p);
        }
        if let Some(p) = self.push.pop_front() {
            self.arrive(p);
        }
    }

    /// The guest touches `page`: a fault if it is not in memory.
    fn touch(&mut self, page: u64) {
        if self.memory[page as usize].is_some() {
            return;
        }
        match self.dest.on_fault(page, self.now) {
            FaultDecision::Request => self.requests.push_back(vec![page]),
            FaultDecision::Wait => {}
            FaultDecision::ZeroFill => panic!("page {page} outside the set was not in memory"),
        }
    }

    fn lose_connection(&mut self) {
        self.urgent.clear();
        self.push.clear();
        self.requests.clear();
        self.source.on_disconnect();
        let (missing, waiting) = self.dest.on_reconnect();
        self.source.on_resume(missing).unwrap();
        if !waiting.is_empty() {
            self.requests.push_back(waiting);
        }
    }
}

proptest! {
    #[test]
    fn every_page_arrives_once_and_right_whatever_the_guest_touches_and_however_often_the_link_drops(
        total in 1u64..400,
        set_pages in proptest::collection::vec(0u64..400, 0..300),
        touches in proptest::collection::vec(0u64..400, 0..200),
        drops in proptest::collection::vec(0usize..400, 0..4),
        push_per_tick in 0usize..4,
    ) {
        let mut set = PageSet::new(total);
        for p in set_pages.into_iter().filter(|&p| p < total) {
            set.insert(p);
        }
        let mut pair = Pair::new(total, &set);
        let mut expected = SetDigest::default();
        for p in set.iter() {
            expected.add(p, content(p));
        }
        let touches: Vec<u64> = touches.into_iter().map(|p| p % total).collect();
        let mut tick = 0usize;
        // Touch, step, sometimes drop; then let the background stream finish (at least one page a
        // tick once the guest stops touching, so the loop is bounded).
        while !pair.dest.is_complete() {
            if let Some(&p) = touches.get(tick) {
                pair.touch(p);
            }
            if drops.contains(&tick) {
                pair.lose_connection();
            }
            let rate = if tick < touches.len() { push_per_tick } else { push_per_tick.max(1) };
            pair.step(rate);
            tick += 1;
            prop_assert!(tick < 10_000, "post-copy did not finish");
        }
        for (p, m) in pair.memory.iter().enumerate() {
            prop_assert_eq!(*m, Some(content(p as u64)));
        }
        let complete = pair.dest.complete();
        prop_assert_eq!(complete.digest, expected.value());
        prop_assert_eq!(complete.pages, set.len());
        pair.source.on_complete(complete).unwrap();
        prop_assert!(pair.source.completed().is_some());
    }
}

#[test]
fn a_fault_is_requested_once_and_its_latency_measured_from_the_first_fault() {
    let mut set = PageSet::new(10);
    set.insert(4);
    let mut dest = PostcopyDest::new(set);
    assert_eq!(dest.on_fault(4, 100), FaultDecision::Request);
    assert_eq!(
        dest.on_fault(4, 150),
        FaultDecision::Wait,
        "a second vCPU on the same page"
    );
    assert_eq!(dest.on_fault(5, 150), FaultDecision::ZeroFill);
    assert_eq!(
        dest.on_page(4, content(4), 900).unwrap(),
        Placement::Place {
            waited_ns: Some(800)
        }
    );
    assert!(dest.placed());
    assert_eq!(
        dest.on_page(4, content(4), 950).unwrap(),
        Placement::Duplicate
    );
    let stats = dest.stats();
    assert_eq!(
        (stats.faults, stats.zero_fills, stats.duplicates),
        (1, 1, 1)
    );
}

#[test]
fn pages_outside_the_set_are_refused_in_both_directions() {
    let mut set = PageSet::new(10);
    set.insert(1);
    let mut dest = PostcopyDest::new(set.clone());
    assert!(
        dest.on_page(2, 0, 0).is_err(),
        "would overwrite the guest's own memory"
    );
    let mut source = PostcopySource::new(set);
    assert!(source.on_request(&[2]).is_err());
    assert!(source.on_resume(PageSet::full(10)).is_err());
    assert!(
        source
            .on_complete(Complete {
                digest: 0,
                pages: 0,
                faults: 0
            })
            .is_err(),
        "0 of 1 pages placed"
    );
}

#[test]
fn a_requested_page_is_not_pushed_again_on_the_same_connection() {
    let set = PageSet::full(4);
    let mut source = PostcopySource::new(set);
    source.on_request(&[2]).unwrap();
    assert_eq!(source.next_urgent(), Some(2));
    let mut pushed = Vec::new();
    source.next_push(10, &mut pushed);
    assert_eq!(pushed, vec![0, 1, 3]);
    assert_eq!((source.served(), source.pushed()), (1, 3));
}
