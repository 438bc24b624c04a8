//! The response parser over bytes in memory, for the fuzz targets in `fuzz/` (cargo feature
//! `fuzzing`; not part of latchkey's API).
//!
//! [`read_response`] reads one answer as an upstream connection does: [`parse_head`] on what
//! has arrived until a head is complete (interim answers skipped), then the body as the head's
//! framing says, through the same chunked decoder. A body with a length takes that many bytes,
//! one read to the connection's end takes the rest; these two steps stand in for
//! [`super::H1Body`]'s, which needs a socket.

use bytes::BytesMut;
use http::Response;

use super::{decode_chunk, parse_head, Decoded, Framing, H1Error};

/// One answer, read to the end of its body.
pub struct Answer {
    pub response: Response<()>,
    pub body: Vec<u8>,
    /// How the body was framed (the framing at the start of the body).
    pub framing: Framing,
    pub reusable: bool,
    /// Bytes left over after the body ended.
    pub rest: usize,
}

/// Reads one answer from `input` as if it arrived `piece` bytes at a time (at least one) and
/// the upstream closed the connection after the last byte. `to_head`: the answer to a HEAD.
pub fn read_response(input: &[u8], to_head: bool, piece: usize) -> Result<Answer, H1Error> {
    let piece = piece.max(1);
    let mut arriving = input.chunks(piece);
    let mut buf = BytesMut::new();
    let mut spans = Vec::new();
    let head = loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(&mut buf, &mut spans, to_head)? {
                break head;
            }
        }
        match arriving.next() {
            Some(bytes) => buf.extend_from_slice(bytes),
            None if buf.is_empty() => return Err(H1Error::Closed),
            None => return Err(H1Error::Invalid("the response head is cut off")),
        }
    };
    let mut body = Vec::new();
    let mut framing = head.framing;
    loop {
        match &mut framing {
            Framing::Empty => break,
            Framing::Length(left) => {
                let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                body.extend_from_slice(&buf.split_to(n));
                *left -= n as u64;
                if *left == 0 {
                    break;
                }
            }
            Framing::Chunked(state) => loop {
                match decode_chunk(&mut buf, state)? {
                    Decoded::Data(data) => body.extend_from_slice(&data),
                    Decoded::More => break,
                    Decoded::End => {
                        framing = Framing::Empty;
                        break;
                    }
                }
            },
            Framing::Close => body.extend_from_slice(&buf.split()),
        }
        if framing == Framing::Empty {
            break;
        }
        match arriving.next() {
            Some(bytes) => buf.extend_from_slice(bytes),
            None if framing == Framing::Close => break,
            None => {
                return Err(H1Error::Invalid(
                    "the upstream closed the connection before the body ended",
                ))
            }
        }
    }
    Ok(Answer {
        response: head.response,
        body,
        framing: head.framing,
        reusable: head.reusable,
        rest: buf.len() + arriving.map(<[u8]>::len).sum::<usize>(),
    })
}
