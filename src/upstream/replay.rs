//! A request sent on a shared h2 connection that the upstream did not process, sent again.
//!
//! An h2 upstream that retires a connection (nginx after `keepalive_requests`, a load balancer
//! at a connection's age limit) sends `GOAWAY`: the streams above its last stream ID were not
//! processed (RFC 9113, 6.8), nor was a stream it reset with `REFUSED_STREAM` (8.7), and hyper
//! fails them, and every request sent before it sees the connection close, with that error. Such
//! a request is safe to send again on a new connection, whatever its method, if its body can be
//! sent again: [`Replay`] keeps what the body has given so far, up to [`KEPT`] bytes, and hands
//! it back with the rest of the body when hyper drops it ([`Replay::wrap`]).
//!
//! A connection that ends under a request without saying which streams it processed (closed,
//! reset, a write that broke) may or may not have had the request processed: such a request
//! is sent again only when its method is idempotent ([`connection_lost`]; RFC 9110 section
//! 9.2.2 lets a proxy retry those, and no other).
//!
//! What is kept is let go as soon as the answer came (its [`Back`] is dropped).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use crate::body::{self, BoxBody, BoxError};

/// At most this much of a request body is kept to send again: a body that had given more when
/// it was turned away is not sent again. hyper takes a body's pieces while the stream has
/// window, and an upstream grants a stream no more than its initial window (64 KiB unless it
/// says otherwise) before it has read the stream's headers: a body turned away unprocessed has
/// given that and one more piece at most, and a larger one turned away is mostly still whole.
/// Held from the request to its answer's head: what each h2 request in flight may cost.
pub const KEPT: usize = 128 * 1024;

/// Whether hyper's error says that the upstream did not process the request: its stream was
/// above the last one a `GOAWAY` from the upstream let through (or the request came after it),
/// or the upstream reset it with `REFUSED_STREAM`.
pub fn unprocessed(e: &hyper::Error) -> bool {
    let Some(h2) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>()) else {
        return false;
    };
    h2.is_remote()
        && (h2.is_go_away() || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// Whether hyper's error says that the connection ended under the request before its answer
/// came (closed, broken, its task gone), not that the upstream reset the stream itself: the
/// request may have been processed or not (see the module's notes).
pub fn connection_lost(e: &hyper::Error) -> bool {
    if e.is_closed() || e.is_canceled() || e.is_incomplete_message() {
        return true;
    }
    let Some(source) = std::error::Error::source(e) else {
        return false;
    };
    match source.downcast_ref::<h2::Error>() {
        Some(h2) => h2.is_io() || h2.is_go_away(),
        None => source.is::<std::io::Error>(),
    }
}

/// What a dropped [`Replay`] hands back: the frames it gave, and the body's rest.
struct Given {
    frames: Vec<Frame<Bytes>>,
    /// The body's rest, if it had not ended.
    rest: Option<BoxBody>,
}

/// A request body that keeps what it gives (see the module's notes).
pub struct Replay {
    inner: Option<BoxBody>,
    frames: Vec<Frame<Bytes>>,
    kept: usize,
    ended: bool,
    /// `None` once more than [`KEPT`] went, or once its [`Back`] was dropped.
    back: Option<oneshot::Sender<Given>>,
}

/// The other end of a [`Replay`]: the body again, once hyper has let go of it.
pub struct Back(oneshot::Receiver<Given>);

impl Replay {
    /// Replaces `body` with a [`Replay`] of it.
    pub fn wrap(body: &mut BoxBody) -> Back {
        let (tx, rx) = oneshot::channel();
        let inner = std::mem::replace(body, body::empty());
        let ended = inner.is_end_stream();
        *body = Replay {
            inner: Some(inner),
            frames: Vec::new(),
            kept: 0,
            ended,
            back: Some(tx),
        }
        .boxed_unsync();
        Back(rx)
    }

    fn keep(&mut self, frame: &Frame<Bytes>) {
        let Some(back) = &self.back else { return };
        if back.is_closed() {
            self.give_up();
            return;
        }
        let copy = if let Some(data) = frame.data_ref() {
            self.kept += data.len();
            Frame::data(data.clone())
        } else if let Some(trailers) = frame.trailers_ref() {
            Frame::trailers(trailers.clone())
        } else {
            return;
        };
        if self.kept > KEPT {
            self.give_up();
        } else {
            self.frames.push(copy);
        }
    }

    fn give_up(&mut self) {
        self.back = None;
        self.frames = Vec::new();
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        if let Some(back) = self.back.take() {
            let rest = if self.ended { None } else { self.inner.take() };
            let _ = back.send(Given {
                frames: std::mem::take(&mut self.frames),
                rest,
            });
        }
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => this.keep(frame),
            Poll::Ready(None) => this.ended = true,
            // A body that failed is not sent again.
            Poll::Ready(Some(Err(_))) => this.give_up(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Back {
    /// The whole body again, once hyper has dropped the [`Replay`]; `None` if it cannot be sent
    /// again (more than [`KEPT`] went, or it failed).
    pub async fn body(self) -> Option<BoxBody> {
        let Given { frames, rest } = self.0.await.ok()?;
        Some(
            Again {
                frames: frames.into_iter(),
                rest,
            }
            .boxed_unsync(),
        )
    }
}

/// A body sent again: the frames given the first time, then the rest.
struct Again {
    frames: std::vec::IntoIter<Frame<Bytes>>,
    rest: Option<BoxBody>,
}

impl Body for Again {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(frame) = this.frames.next() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.len() == 0 && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let kept: u64 = self
            .frames
            .as_slice()
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let mut hint = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        // The upper bound first: a lower bound above it panics.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + kept);
        }
        hint.set_lower(hint.lower() + kept);
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static str]) -> BoxBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    async fn read(body: BoxBody) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_body_half_sent_comes_back_whole() {
        let mut body = chunks(&["one ", "two ", "three"]);
        let back = Replay::wrap(&mut body);
        // hyper takes one frame, then drops the body (the stream was refused).
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "one ");
        drop(body);
        let again = back.body().await.expect("sent again");
        assert_eq!(again.size_hint().lower(), 4);
        assert_eq!(read(again).await, b"one two three");
    }

    #[tokio::test]
    async fn a_body_sent_whole_comes_back_whole_and_an_empty_one_empty() {
        let mut body = chunks(&["a", "b"]);
        let back = Replay::wrap(&mut body);
        assert_eq!(read(body).await, b"ab");
        let again = back.body().await.unwrap();
        assert_eq!(again.size_hint().exact(), Some(2));
        assert_eq!(read(again).await, b"ab");

        let mut empty = body::empty();
        let back = Replay::wrap(&mut empty);
        assert!(empty.is_end_stream());
        drop(empty);
        let again = back.body().await.unwrap();
        assert!(again.is_end_stream());
        assert_eq!(read(again).await, b"");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_sent_again() {
        let big: &'static str = Box::leak("x".repeat(KEPT + 1).into_boxed_str());
        let mut body = chunks(&[big]);
        let back = Replay::wrap(&mut body);
        let _ = body.frame().await;
        drop(body);
        assert!(back.body().await.is_none());
    }
}
