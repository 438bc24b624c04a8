//! latchkey's strict framing of what clients send (`src/strict.rs`): `strict::check` on the
//! whole input, and a `Framer` fed the same bytes in pieces, as `Strict` feeds it reads.
//!
//! Input: one flag byte, the size of the pieces (1 to 256), then the client's bytes.
//!
//! Beyond "no panic":
//! - the verdict does not depend on how the bytes were split: the same stop (the same reason
//!   for a refusal); the same bytes passed, but where a refusal came in the body of a request
//!   whose head an earlier piece had passed (`in_body`: then the head and some of the body
//!   were passed, never a whole request);
//! - what passed reads as requests on its own: each head with `httparse`, each body by its
//!   `Content-Length` or its chunks (each chunk's data followed by CRLF, the trailers by
//!   `httparse`), as many heads as `check` counted (one more when a request was refused in its
//!   body: its head was counted).

use latchkey::strict::{self, Framer, Stop};

// This target does not compare upgrades or connection ends: the walk has more than it uses.
#[allow(dead_code)]
#[path = "shared/walk.rs"]
mod walk;

fn main() {
    afl::fuzz(true, |data: &[u8]| {
        let Some((&flags, input)) = data.split_first() else {
            return;
        };
        let piece = 1 + usize::from(flags);
        let whole = strict::check(input);
        assert!(whole.passed <= input.len(), "passed more than there is");
        let (passed, stop) = split(input, piece);
        assert!(passed <= input.len(), "passed more than there is (split)");
        // A head larger than MAX_HEAD is refused as too large or for what is in it, whichever
        // comes first in the bytes there are.
        if input.len() <= strict::MAX_HEAD {
            match (whole.stop, stop) {
                (Some(Stop::Refused(a)), Some(Stop::Refused(b))) => {
                    assert_eq!(a.reason, b.reason, "refused for another reason when split");
                    assert!(!a.in_body, "check's refusal in a body whose head it passed");
                    if b.in_body {
                        assert!(passed >= whole.passed, "passed less when split");
                    } else {
                        assert_eq!(passed, whole.passed, "passed other bytes when split");
                    }
                }
                (a, b) => {
                    assert_eq!(a, b, "another verdict when split");
                    assert_eq!(passed, whole.passed, "passed other bytes when split");
                }
            }
        }
        let reads = walk::walk(&input[..whole.passed]).len();
        // A request refused in its body had its head counted, and none of it passed.
        let refused = matches!(whole.stop, Some(Stop::Refused(_)));
        let counted = whole.heads == reads || (refused && whole.heads == reads + 1);
        assert!(
            counted,
            "check counted {} heads, {reads} passed",
            whole.heads
        );
    });
}

/// Feeds `input` to a `Framer` in pieces of `piece` bytes, as `Strict` does: bytes held back
/// after `More` come again at the front of the next step. Upgrades are refused, as in `check`.
fn split(input: &[u8], piece: usize) -> (usize, Option<Stop>) {
    let mut framer = Framer::new();
    let mut passed = 0;
    let mut end = 0;
    loop {
        end = (end + piece).min(input.len());
        loop {
            let step = framer.step(&input[passed..end]);
            passed += step.passed;
            match step.stop {
                Some(Stop::Decide) => framer.decided(false),
                Some(Stop::Refused(r)) => return (passed, Some(Stop::Refused(r))),
                stop if end == input.len() => return (passed, stop),
                _ => break,
            }
        }
    }
}
