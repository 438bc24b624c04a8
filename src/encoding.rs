//! Content codings of upstream answers, decoded so that the body can be scrubbed.
//!
//! latchkey asks upstreams for `identity` (the request rewrite sets `Accept-Encoding`), but an
//! upstream may compress anyway. Such a body is decoded as it streams (gzip, deflate, br, and
//! a list of them), with bounded buffers: each read yields at most [`CHUNK`] bytes, so a small
//! body that inflates to gigabytes costs no more memory than any other stream. A coding
//! latchkey cannot decode is refused rather than passed on unscanned.

use std::io;

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZlibDecoder};
use futures_util::TryStreamExt as _;
use http::header::{HeaderMap, CONTENT_ENCODING};
use http_body::Frame;
use http_body_util::{BodyDataStream, BodyExt as _, StreamBody};
use tokio::io::{AsyncBufRead, BufReader};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::body::{BoxBody, BoxError};

/// The most one read of a decoded body yields.
const CHUNK: usize = 16 * 1024;

/// A content coding latchkey decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// `deflate` is the zlib format (RFC 9110 section 8.4.1.2).
    Deflate,
    Br,
}

/// The codings `headers` say the body is in, in the order they were applied (`identity`
/// left out); the name of the first one latchkey cannot decode as the error.
pub fn codings(headers: &HeaderMap) -> Result<Vec<Coding>, String> {
    let mut out = Vec::new();
    if !headers.contains_key(CONTENT_ENCODING) {
        return Ok(out);
    }
    for value in headers.get_all(CONTENT_ENCODING) {
        let text = value.to_str().map_err(|_| String::from("(not text)"))?;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            out.push(match name.to_ascii_lowercase().as_str() {
                "identity" => continue,
                "gzip" | "x-gzip" => Coding::Gzip,
                "deflate" => Coding::Deflate,
                "br" => Coding::Br,
                _ => return Err(name.to_string()),
            });
        }
    }
    Ok(out)
}

/// `body` with `codings` undone, last applied first.
pub fn decoded(body: BoxBody, codings: &[Coding]) -> BoxBody {
    let data = BodyDataStream::new(body).map_err(io::Error::other);
    let mut reader: Box<dyn AsyncBufRead + Send + Unpin> = Box::new(StreamReader::new(data));
    for coding in codings.iter().rev() {
        reader = match coding {
            Coding::Gzip => {
                let mut d = GzipDecoder::new(reader);
                d.multiple_members(true);
                Box::new(BufReader::with_capacity(CHUNK, d))
            }
            Coding::Deflate => Box::new(BufReader::with_capacity(CHUNK, ZlibDecoder::new(reader))),
            Coding::Br => Box::new(BufReader::with_capacity(CHUNK, BrotliDecoder::new(reader))),
        };
    }
    let frames = ReaderStream::with_capacity(reader, CHUNK)
        .map_ok(Frame::data)
        .map_err(BoxError::from);
    StreamBody::new(frames).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CONTENT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_codings_of_a_header() {
        assert_eq!(codings(&headers(&[])), Ok(vec![]));
        assert_eq!(codings(&headers(&["identity"])), Ok(vec![]));
        assert_eq!(codings(&headers(&["GZIP"])), Ok(vec![Coding::Gzip]));
        assert_eq!(
            codings(&headers(&["deflate, br", "x-gzip"])),
            Ok(vec![Coding::Deflate, Coding::Br, Coding::Gzip])
        );
        assert_eq!(codings(&headers(&["gzip, zstd"])), Err("zstd".into()));
    }
}
