//! The upstream HTTP/1.1 response parser and body framing (`src/upstream/h1.rs`): the head,
//! `Content-Length`, the chunked decoder, trailers, bodies that end with the connection.
//!
//! Input: one flag byte, then the upstream's bytes. Bit 0 of the flag: the answer is to a HEAD;
//! the other bits: the size of the pieces the bytes arrive in (1 to 128).
//!
//! Beyond "no panic":
//! - the verdict and the message do not depend on how the bytes were split into reads;
//! - an accepted answer is final (not 1xx) and its header map holds no hop-by-hop or framing
//!   header (but the `Content-Length` kept on the answer to a HEAD);
//! - a body with a length has that length; an answer to HEAD, a 204 or a 304 has none;
//! - a connection left reusable had a body with an end of its own (not one read to the close).

use http::{HeaderMap, StatusCode};
use latchkey::hop_by_hop::is_hop_by_hop;
use latchkey::upstream::h1::fuzzing::{read_response, Answer};
use latchkey::upstream::h1::Framing;

/// The largest response head latchkey reads (`MAX_HEAD` in h1.rs): a head that arrives whole in
/// one read may be larger, so the split invariant holds below it.
const MAX_HEAD: usize = 64 * 1024;

fn main() {
    afl::fuzz(true, |data: &[u8]| {
        let Some((&flags, input)) = data.split_first() else {
            return;
        };
        let to_head = flags & 1 == 1;
        let piece = 1 + usize::from(flags >> 1);
        let whole = read_response(input, to_head, input.len());
        let split = read_response(input, to_head, piece);
        if input.len() < MAX_HEAD {
            assert_eq!(
                summary(&whole),
                summary(&split),
                "the answer depends on how it was split into reads"
            );
        }
        if let Ok(answer) = &whole {
            check(answer, to_head);
        }
        if let Ok(answer) = &split {
            check(answer, to_head);
        }
    });
}

type Summary = Result<
    (
        u16,
        http::Version,
        Vec<(String, Vec<u8>)>,
        Vec<u8>,
        Framing,
        bool,
        usize,
    ),
    (),
>;

fn summary(answer: &Result<Answer, latchkey::upstream::H1Error>) -> Summary {
    let a = answer.as_ref().map_err(|_| ())?;
    Ok((
        a.response.status().as_u16(),
        a.response.version(),
        headers(a.response.headers()),
        a.body.clone(),
        a.framing,
        a.reusable,
        a.rest,
    ))
}

fn headers(map: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn check(a: &Answer, to_head: bool) {
    let status = a.response.status();
    assert!(!status.is_informational(), "an interim answer came out");
    for name in a.response.headers().keys() {
        let kept_length = to_head && name == http::header::CONTENT_LENGTH;
        assert!(
            kept_length || !is_hop_by_hop(name),
            "hop-by-hop header {name} kept"
        );
    }
    if to_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        assert_eq!(a.framing, Framing::Empty, "a body where there is none");
    }
    match a.framing {
        Framing::Empty => assert!(a.body.is_empty(), "an empty body has bytes"),
        Framing::Length(n) => assert_eq!(a.body.len() as u64, n, "a body of the wrong length"),
        Framing::Close => assert!(!a.reusable, "a body read to the close left reusable"),
        Framing::Chunked(_) => {}
    }
}
