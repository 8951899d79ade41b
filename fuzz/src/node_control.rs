//! Properties of the agent's control protocol of `dwcp-node` (`protocol.rs`), through the entry
//! points of `dwcp_node::fuzzing`: line reading, the request envelope and its HMAC check, the
//! request itself, and the client's parsing of the challenge and of the answer.
//!
//! Input: byte 0 picks the mode (`% 4`): 0 the rest is the client's request line as sent; 1 the
//! rest is the request's JSON body, which the harness signs with the key first (so that mutated
//! requests get past the MAC, which the fuzzer cannot forge, to the request parser); 2 the agent's
//! challenge line; 3 the agent's answer line.
//!
//! Checked: no panic; a line is at most `MAX_LINE` bytes and reading consumes at most one more;
//! an unsigned line never verifies unless its MAC is right; a verified request serialises to JSON
//! that, signed, verifies to the same request.

use dwcp_node::fuzzing::{
    MAX_LINE, parse_answer, parse_challenge, read_line, signed_line, verify_request,
};

/// Runs every property on one fuzz input.
pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (line, consumed) = read_line(rest);
    assert!(consumed <= MAX_LINE + 1 && consumed <= rest.len());
    let Ok(line) = line else {
        return;
    };
    assert!(line.len() <= MAX_LINE);
    assert_eq!(line.len(), consumed, "the line is what was consumed");
    match mode % 4 {
        0 | 1 => {
            let line = if mode % 4 == 1 {
                signed_line(line.trim_end_matches('\n'))
            } else {
                line
            };
            if let Ok(request) = verify_request(&line) {
                let body = serde_json::to_string(&request).expect("a request serialises");
                let again =
                    verify_request(&signed_line(&body)).expect("a re-signed request verifies");
                assert_eq!(again, request);
            }
        }
        2 => {
            let _ = parse_challenge(&line);
        }
        _ => {
            let _ = parse_answer(&line);
        }
    }
}
