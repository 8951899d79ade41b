//! Properties of the post-copy frame payloads (`dwcp_proto::postcopy::wire`) and of the
//! destination machine fed what they decode.
//!
//! Input: byte 0 picks the payload (`% 6`: PostcopyMissing, PageRequest, PostcopyPages,
//! PostcopyStart/Resume, PostcopyComplete, and PostcopyPages into a `PostcopyDest`); byte 1 is the
//! memory's page count minus one (1..=256 pages, so that small inputs reach the bound checks); the
//! rest is the payload.
//!
//! Checked: no panic and no allocation beyond what the payload's length allows; what decodes
//! re-encodes to a payload that decodes to the same value (ranges and requests byte for byte);
//! every decoded page is below the page count; a destination machine never places a page twice nor
//! one outside its set, and refuses (with an error, not a panic) pages outside it.

use dwcp_proto::postcopy::wire::{self, Complete, PageBody, PagesFrame, SetEnd};
use dwcp_proto::postcopy::{PageSet, Placement, PostcopyDest};

/// Runs every property on one fuzz input.
pub fn check(data: &[u8]) {
    let [mode, pages, payload @ ..] = data else {
        return;
    };
    let total = u64::from(*pages) + 1;
    match mode % 6 {
        0 => {
            if let Ok(ranges) = wire::decode_missing(payload, total) {
                assert!(ranges.iter().all(|r| r.start < r.end && r.end <= total));
                let mut again = Vec::new();
                wire::encode_missing(&ranges, &mut again);
                assert_eq!(again, payload, "ranges re-encode byte for byte");
            }
        }
        1 => {
            if let Ok(requested) = wire::decode_request(payload, total) {
                assert!(!requested.is_empty() && requested.iter().all(|&p| p < total));
                let mut again = Vec::new();
                wire::encode_request(&requested, &mut again);
                assert_eq!(again, payload, "a request re-encodes byte for byte");
            }
        }
        2 => {
            let mut decoded = Vec::new();
            if wire::decode_pages(payload, total, |page, body| {
                decoded.push((page, to_bytes(body)));
                Ok(())
            })
            .is_ok()
            {
                assert!(decoded.iter().all(|(p, _)| *p < total));
                let mut frame = PagesFrame::new();
                for (page, bytes) in &decoded {
                    frame.push(*page, bytes);
                }
                let mut again = Vec::new();
                frame.finish(&mut again);
                let mut redecoded = Vec::new();
                wire::decode_pages(&again, total, |page, body| {
                    redecoded.push((page, to_bytes(body)));
                    Ok(())
                })
                .expect("a re-encoded frame decodes");
                assert_eq!(redecoded, decoded);
            }
        }
        3 => {
            if let Ok(end) = SetEnd::decode("PostcopyStart", payload) {
                assert_eq!(
                    SetEnd::decode("PostcopyResume", &end.encode()).unwrap(),
                    end
                );
            }
        }
        4 => {
            if let Ok(c) = Complete::decode(payload) {
                assert_eq!(Complete::decode(&c.encode()).unwrap(), c);
            }
        }
        _ => {
            // The even pages are the post-copy set.
            let set = PageSet::from_pages(total, (0..total).step_by(2)).expect("below the bound");
            let mut dest = PostcopyDest::new(set.clone());
            let mut placed = PageSet::new(total);
            let _ = wire::decode_pages(payload, total, |page, body| {
                let hash = dwcp_core::digest::page_hash(&to_bytes(body));
                match dest.on_page(page, hash, 0) {
                    Ok(Placement::Place { .. }) => {
                        assert!(
                            set.contains(page) && placed.insert(page),
                            "placed once, in the set"
                        );
                        dest.placed();
                    }
                    Ok(Placement::Duplicate) => assert!(placed.contains(page)),
                    Err(_) => assert!(
                        !set.contains(page),
                        "only pages outside the set are refused"
                    ),
                }
                Ok(())
            });
            assert_eq!(dest.missing().len(), set.len() - placed.len());
        }
    }
}

fn to_bytes(body: PageBody<'_>) -> Vec<u8> {
    match body {
        PageBody::Bytes(b) => b.to_vec(),
        PageBody::Zero => vec![0; dwcp_core::memory::PAGE_SIZE],
    }
}
