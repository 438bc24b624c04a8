//! Response scrubbing (`src/scrub.rs`): what an upstream sends back, searched for a key as it
//! is, in base64 and spelled with escapes (percent, JSON, HTML character references) that
//! latchkey's own code reads.
//!
//! Input: a first byte giving the key's length (1 to 32) and a second the size of the chunks
//! the answer streams in (1 to 64), then the key, then the answer.
//!
//! Beyond "no panic":
//! - the answer streamed in chunks comes out as the same bytes, with the same count, as when
//!   it is scrubbed whole (nothing is lost or let through at a chunk boundary);
//! - a key with no byte of the placeholder (`latchkey.0`) is not in what comes out;
//! - an answer in which nothing was replaced comes out as it went in.

use bytes::Bytes;
use latchkey::scrub::Scrubber;

fn main() {
    afl::fuzz(true, |data: &[u8]| {
        let [n, chunk, rest @ ..] = data else {
            return;
        };
        let n = usize::from(n % 32) + 1;
        let chunk = usize::from(chunk % 64) + 1;
        if rest.len() < n {
            return;
        }
        let (key, answer) = rest.split_at(n);
        let Some(s) = Scrubber::new([key], [], "0") else {
            return;
        };
        let (whole, count) = s.whole(Bytes::copy_from_slice(answer));
        let mut stream = s.stream();
        let mut streamed = Vec::new();
        for piece in answer.chunks(chunk) {
            streamed.extend_from_slice(&stream.push(Bytes::copy_from_slice(piece)));
        }
        streamed.extend_from_slice(&stream.finish());
        assert_eq!(
            (&streamed[..], stream.scrubbed()),
            (&whole[..], count),
            "streamed in chunks of {chunk} and whole differ"
        );
        if count == 0 {
            assert_eq!(&whole[..], answer, "nothing replaced, yet changed");
        }
        if !key.iter().any(|b| b"latchkey.0".contains(b)) {
            assert!(
                !whole.windows(key.len()).any(|w| w == key),
                "the key is left in what comes out"
            );
        }
    });
}
