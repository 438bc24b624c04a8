//! latchkey's own HTTP/1.1 server for client connections (`src/downstream.rs`) against hyper's,
//! both behind the strict check, on the same bytes: the comparison is
//! `latchkey::downstream::fuzzing::compare` (the unit tests run it on fixed cases too).
//!
//! Input: the bytes a client sends before it closes its side. A finding (a panic, which AFL
//! keeps as a crash) is a request that one server hands its service and the other does not, or
//! hands otherwise: another method, target, version, header list or body.

use latchkey::downstream::fuzzing;

/// Inputs beyond this are cut: small requests find the framing bugs, and runs stay fast.
const MAX_INPUT: usize = 16 * 1024;

fn main() {
    let Some(rt) = fuzzing::runtime() else {
        return;
    };
    afl::fuzz(true, |data: &[u8]| {
        let input = &data[..data.len().min(MAX_INPUT)];
        if let Err(difference) = fuzzing::compare(&rt, input) {
            panic!("difference from hyper: {difference}");
        }
    });
}
