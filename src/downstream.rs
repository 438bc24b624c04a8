//! latchkey's own HTTP/1.1 server for client connections (`proxy.http1_server = "latchkey"`,
//! issue 15), in place of hyper's for the requests a gateway mostly carries.
//!
//! What the client sends is read through [`Strict`] as before: every head is checked whole,
//! with the same limits (64 KiB, 100 header lines, the header read timeout) and the same
//! refusals, before this module sees a byte of it, and a refused head reaches it as the
//! stand-in request that [`crate::proxy::checked`] answers `400`. What is left here is reading
//! the head that passed into an [`http::Request`] (as hyper does, with `http`'s own checks, from
//! where the strict check's `httparse` run found the head's parts: [`Strict::shape_at`]; the
//! head is not parsed twice), handing its body on as it arrives, and writing the answer. It
//! serves client connections and, with the same setting, HTTP/1.1 inside tunnels.
//!
//! Not served here, handed to hyper with every byte read so far ([`Outcome::Hyper`]): a
//! request that asks for an upgrade or is a CONNECT (the tunnel form, WebSockets), and one with
//! an `Expect` header (`100-continue`). From there on the connection is hyper's, served in
//! turns ([`crate::release`]).
//!
//! Between requests a connection keeps its read buffer and the request's boxed future (the next
//! request reuses both) as long as requests keep coming; once all that was read has been used,
//! the answer written and nothing has moved for a quiet spell
//! ([`QUIET_SPELL`](crate::idle::QUIET_SPELL), the connection's watchdog looks that often while
//! buffers are held), both are given back and the task waits for the socket to be readable,
//! holding no buffer. Giving them back after every answer cost more than it saved: a freed
//! buffer's pages went back to the system and were faulted in again for the next request.
//!
//! The answer: a status line (`HTTP/1.0` to an HTTP/1.0 client, as hyper does), the response's
//! headers (lower case, as hyper writes them), `date` when the response has none, and the
//! framing: the response's `content-length`, or the body's exact size, or `chunked` to an
//! HTTP/1.1 client, or the end of the connection to an HTTP/1.0 one. A HEAD's answer, 204 and
//! 304 carry no body. Head and body are gathered into one buffer and written together, up to
//! 64 KiB at a time. A body that fails, or ends short of its `content-length`, ends the
//! connection without finishing the message, so the client sees it was cut.
//!
//! Keep-alive as hyper keeps it: HTTP/1.1 unless either side says `Connection: close`, HTTP/1.0
//! only with `Connection: keep-alive`. A request body that its reader left unread is read and
//! dropped (up to 64 KiB, for up to a second) so that the next request can be read; otherwise
//! the connection ends after the answer.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::PollSender;

use crate::body::{BoxBody, ClientBody, Piece, Piped};
use crate::strict::{self, HeadShape, Strict};
use crate::upstream::h1::{decode_chunk_within, Chunk, Decoded, H1Error};

/// How much is read at a time.
const READ_CHUNK: usize = 8 * 1024;
/// The write buffer is written out once it holds this much.
const WRITE_HIGH: usize = 64 * 1024;
/// At most this much of a request body its reader left is read and dropped to keep the
/// connection, for at most [`DRAIN_TIME`].
const MAX_DRAIN: u64 = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// A client connection's stream that can tell, holding no buffer, when it has bytes to read,
/// and whether it has been quiet long enough for its buffers to go.
pub trait Ready {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Nothing has moved and nothing has been in flight for a quiet spell
    /// ([`QUIET_SPELL`](crate::idle::QUIET_SPELL)): the buffers between requests can go.
    fn quiet(&self) -> bool;
    /// Buffers are held (`true`) or let go: while they are held, the connection's watchdog
    /// looks every quiet spell, and the task is woken then to let them go.
    fn holding(&self, held: bool);
    /// Counts a request in flight on the connection until the guard is dropped (its idle
    /// timeout waits meanwhile): [`serve`] holds it from the head until the answer's body is
    /// sent, so the handler's answer need not carry it; `None` for a stream nobody times out.
    fn request(&self) -> Option<crate::idle::InFlight>;
}

impl Ready for crate::idle::Watched<tokio::net::TcpStream> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().poll_read_ready(cx)
    }

    fn quiet(&self) -> bool {
        self.watch.quiet()
    }

    fn holding(&self, held: bool) {
        self.watch.set_in_turn(held);
    }

    fn request(&self) -> Option<crate::idle::InFlight> {
        Some(self.watch.request())
    }
}

impl Ready for tokio::io::DuplexStream {
    /// An in-memory pipe (the fuzz targets, tests): reading is tried at once.
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Always: the buffers go at every wait.
    fn quiet(&self) -> bool {
        true
    }

    fn holding(&self, _held: bool) {}

    fn request(&self) -> Option<crate::idle::InFlight> {
        None
    }
}

/// How [`serve`] ended.
#[derive(Debug)]
pub enum Outcome {
    /// The connection is over: either side closed it, it failed, or shutdown.
    Done(io::Result<()>),
    /// The next request is hyper's (an upgrade, a CONNECT, an `Expect`): it and whatever
    /// followed it are in the read buffer, unread.
    Hyper,
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A request head read from the buffer.
#[derive(Debug)]
pub enum Parsed {
    /// Not all there yet.
    Partial,
    /// A request for hyper; nothing was taken from the buffer.
    HandOver,
    Request(Head),
}

/// A request head and what it says of its body and the connection.
#[derive(Debug)]
pub struct Head {
    /// Boxed once here: the request's way through the proxy's layers moves the box.
    pub request: Box<Request<ClientBody>>,
    pub framing: Framing,
    pub keep_alive: bool,
}

/// Reads the request head at the start of `buf` (taking it out of `buf`), as hyper's server
/// reads it: `httparse` with its defaults, the target as an [`http::Uri`], the header values
/// as [`HeaderValue`]s sharing the head's bytes. The error is why the head is refused; the
/// strict check in front refuses everything that `httparse` does, so it is the target
/// (`http::Uri` is stricter than `httparse`) or a framing header [`Strict`] already refused.
///
/// With `kept` (what the strict check's own `httparse` run found in these bytes: the head's
/// shape and its headers' spans) the head is not parsed again; else `httparse` runs here, its
/// spans going into `parsed`.
pub fn parse_head(
    buf: &mut BytesMut,
    parsed: &mut Vec<[u32; 4]>,
    kept: Option<(HeadShape, &[[u32; 4]])>,
) -> Result<Parsed, &'static str> {
    let (shape, spans) = match kept {
        Some((shape, _)) if shape.len > buf.len() => return Ok(Parsed::Partial),
        // Whole, and where the strict check saw it end (anything else would be a fault of
        // latchkey's bookkeeping: then the head is parsed here as if no shape had been kept).
        Some((shape, spans))
            if buf
                .get(..shape.len)
                .is_some_and(|h| h.ends_with(b"\r\n\r\n")) =>
        {
            #[cfg(any(debug_assertions, feature = "fuzzing"))]
            same_as_httparse(buf, spans, shape);
            (shape, spans)
        }
        _ => match parse_with_httparse(buf, parsed)? {
            Some(shape) => (shape, &parsed[..]),
            None => return Ok(Parsed::Partial),
        },
    };
    let part = |(start, end): (usize, usize)| buf.get(start..end).unwrap_or_default();
    let method = part(shape.method);
    if method == b"CONNECT" {
        return Ok(Parsed::HandOver);
    }
    let version = if shape.http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut framing = Framing::None;
    // As hyper decides it, header by header: once a `Connection` says `close` the connection
    // ends after this request; HTTP/1.0 is kept alive once one says `keep-alive`. A value with
    // bytes past visible ASCII says neither.
    let mut keep_alive = version == Version::HTTP_11;
    let mut closing = false;
    let (mut lengths, mut codings) = (0, 0);
    for &[n0, n1, v0, v1] in spans {
        let (name, value) = (part(range(n0, n1)), part(range(v0, v1)));
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            let n = content_length(value).ok_or("the Content-Length is not a number")?;
            framing = Framing::Length(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings += 1;
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err("a Transfer-Encoding other than chunked");
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            if closing || connection_has(value, b"close") {
                closing = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = connection_has(value, b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") || name.eq_ignore_ascii_case(b"expect") {
            return Ok(Parsed::HandOver);
        }
    }
    if codings > 0 {
        if lengths > 0 || codings > 1 || version == Version::HTTP_10 {
            return Err("the request's framing headers disagree");
        }
        framing = Framing::Chunked;
    } else if lengths > 1 {
        return Err("more than one Content-Length");
    }

    let method = Method::from_bytes(method).map_err(|_| "the request method")?;
    let head = buf.split_to(shape.len).freeze();
    let uri = http::Uri::from_maybe_shared(head.slice(shape.path.0..shape.path.1))
        .map_err(|_| "the request target is not a URI")?;
    let mut map = crate::spare::header_map(spans.len());
    for &[n0, n1, v0, v1] in spans {
        let (name, value) = (range(n0, n1), range(v0, v1));
        let name = HeaderName::from_bytes(head.get(name.0..name.1).unwrap_or_default())
            .map_err(|_| "a header name")?;
        let value = HeaderValue::from_maybe_shared(head.slice(value.0..value.1))
            .map_err(|_| "a header value")?;
        map.append(name, value);
    }
    let mut request = Box::new(Request::new(ClientBody::Empty));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = map;
    Ok(Parsed::Request(Head {
        request,
        framing,
        keep_alive,
    }))
}

/// Debug and fuzz builds check every kept shape against `httparse` on the same bytes.
#[cfg(any(debug_assertions, feature = "fuzzing"))]
fn same_as_httparse(buf: &[u8], spans: &[[u32; 4]], shape: HeadShape) {
    let mut again = Vec::new();
    let parsed = parse_with_httparse(buf, &mut again);
    assert_eq!(
        parsed,
        Ok(Some(shape)),
        "a kept head shape is not httparse's"
    );
    assert_eq!(
        again, spans,
        "a kept head's header spans are not httparse's"
    );
}

/// Parses the head at the start of `buf` with `httparse` (for a head whose shape the strict
/// check did not keep: the stand-in of a refused one): its shape, the headers' spans in
/// `spans`; `None` while it is not whole.
fn parse_with_httparse(
    buf: &[u8],
    spans: &mut Vec<[u32; 4]>,
) -> Result<Option<HeadShape>, &'static str> {
    let mut headers = [const { MaybeUninit::<httparse::Header>::uninit() }; strict::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_request_with_uninit_headers(&mut req, buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("the request head does not parse"),
    };
    strict::shape_of(buf, len, &req, spans)
        .map(Some)
        .ok_or("the request head does not parse")
}

/// Whether a `Connection` value names `token` (hyper's reading: a value with a byte that is not
/// visible ASCII or HTAB names nothing).
fn connection_has(value: &[u8], token: &[u8]) -> bool {
    if !value
        .iter()
        .all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
    {
        return false;
    }
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A `Content-Length` value as hyper reads it: the strict check's digits, and at most
/// `u64::MAX - 2` (hyper keeps the two values above for its own markers and refuses them).
fn content_length(v: &[u8]) -> Option<u64> {
    strict::digits(v).filter(|n| *n <= u64::MAX - 2)
}

/// Serves requests from `io` until the connection ends or a request is hyper's. `buf` holds
/// what was read and not used (empty at the start); `answer` is the request's future, boxed
/// once per busy spell. `handler` serves one request; `bad` is the answer to a head that does
/// not parse here. `stop` changing is shutdown: an idle connection closes at once, one with a
/// request under way after answering it.
pub async fn serve<T, H, F>(
    io: &mut Strict<T>,
    buf: &mut BytesMut,
    handler: &H,
    bad: impl Fn(&'static str) -> Response<BoxBody>,
    stop: &mut watch::Receiver<()>,
) -> Outcome
where
    T: AsyncRead + AsyncWrite + Ready + Unpin,
    H: Fn(Box<Request<ClientBody>>) -> F,
    F: Future<Output = Result<Response<BoxBody>, Infallible>>,
{
    let mut held: Held<F> = Held::default();
    let mut out = Vec::new();
    io.keep_shapes(true);
    // Registered once: it completes when shutdown begins.
    let mut shutdown = stop.clone();
    let stopped = shutdown.changed();
    tokio::pin!(stopped);
    loop {
        let head = match next_head(io, buf, &mut held, stopped.as_mut()).await {
            Ok(Some(Parsed::Request(head))) => head,
            Ok(Some(Parsed::HandOver)) => {
                io.keep_shapes(false);
                return Outcome::Hyper;
            }
            Ok(Some(Parsed::Partial)) | Ok(None) => return Outcome::Done(Ok(())),
            Err(Err(e)) => return Outcome::Done(Err(e)),
            Err(Ok(reason)) => {
                tracing::debug!(
                    reason,
                    "a request head that passed the strict check does not parse"
                );
                let mut answer = Exchange::new(Framing::None, false, Version::HTTP_11, false);
                let written = answer.respond(io, buf, &mut out, bad(reason)).await;
                let _ = io.shutdown().await;
                return Outcome::Done(written.map(|_| ()));
            }
        };
        let Head {
            mut request,
            framing,
            keep_alive,
        } = head;
        let version = request.version();
        let bodiless = request.method() == Method::HEAD;
        let (tx, body) = match framing {
            Framing::None | Framing::Length(0) => (None, ClientBody::Empty),
            Framing::Length(n) => {
                let (tx, rx) = mpsc::channel(1);
                (Some(tx), ClientBody::Own(Piped::new(rx, Some(n))))
            }
            Framing::Chunked => {
                let (tx, rx) = mpsc::channel(1);
                (Some(tx), ClientBody::Own(Piped::new(rx, None)))
            }
        };
        // In flight from its head until its answer's body is sent and its own body read (or
        // the connection ends): dropped with this loop's turn.
        let _in_flight = io.get_ref().request();
        let slot = held.slot.get_or_insert_with(|| Box::pin(None));
        // The last request's future is dropped before this one's is made, so that it is made
        // where it runs: made aside and moved in, its 5 KiB were copied at every request.
        slot.set(None);
        *request.body_mut() = body;
        slot.set(Some(handler(request)));
        let Some(mut future) = slot.as_mut().as_pin_mut() else {
            return Outcome::Done(Ok(())); // never: it was set on the line above
        };
        let mut exchange = Exchange::new(framing, keep_alive, version, bodiless);
        exchange.tx = tx.map(PollSender::new);

        let response = std::future::poll_fn(|cx| {
            if let Poll::Ready(answer) = future.as_mut().poll(cx) {
                return Poll::Ready(match answer {
                    Ok(response) => response,
                    Err(never) => match never {},
                });
            }
            exchange.poll_pump(io, buf, cx);
            Poll::Pending
        })
        .await;
        if stop.has_changed().unwrap_or(true) {
            exchange.keep_alive = false;
        }
        let kept = match exchange.respond(io, buf, &mut out, response).await {
            Ok(kept) => kept,
            Err(e) => return Outcome::Done(Err(e)),
        };
        // Boxed: rare, and its timer would otherwise make every connection's future larger.
        let kept = kept
            && match exchange.settled() {
                Some(kept) => kept,
                None => Box::pin(exchange.drain(io, buf)).await,
            };
        if !kept {
            let _ = io.shutdown().await;
            return Outcome::Done(Ok(()));
        }
        if out.capacity() > WRITE_HIGH {
            out = Vec::new();
        }
    }
}

/// What a connection keeps between requests while it is busy, and lets go when quiet.
struct Held<F> {
    /// The request's future, boxed, reused in place by the requests that follow (`None`
    /// inside between one request's future and the next's).
    slot: Option<Pin<Box<Option<F>>>>,
    /// Where each header of the head being read is.
    spans: Vec<[u32; 4]>,
    /// Buffers are held: the read buffer, and these once a request has come.
    kept: bool,
}

impl<F> Default for Held<F> {
    fn default() -> Held<F> {
        Held {
            slot: None,
            spans: Vec::new(),
            kept: false,
        }
    }
}

/// Reads until `buf` starts with a whole request head. `Ok(None)`: the client closed the
/// connection between requests, or shutdown came while it was idle. `Err(Ok(reason))`: the
/// head does not parse; `Err(Err(e))`: reading failed (a head not whole in time among them).
async fn next_head<T, F, S>(
    io: &mut Strict<T>,
    buf: &mut BytesMut,
    held: &mut Held<F>,
    mut stopped: Pin<&mut S>,
) -> Result<Option<Parsed>, Result<&'static str, io::Error>>
where
    T: AsyncRead + Ready + Unpin,
    S: Future,
{
    loop {
        if !buf.is_empty() {
            // An h2 preface (inside a tunnel, sent without ALPN): hyper's, as it is.
            if io.is_opaque() {
                return Ok(Some(Parsed::HandOver));
            }
            let kept = checked_shape(io, buf);
            match parse_head(buf, &mut held.spans, kept).map_err(Ok)? {
                Parsed::Partial => {}
                parsed => return Ok(Some(parsed)),
            }
        }
        let idle = buf.is_empty();
        if idle && io.at_rest() {
            // Between requests: the buffers stay while requests keep coming, and go once the
            // connection has been quiet for a spell (the watchdog's look wakes this task then);
            // from there nothing is held but the socket until the client sends again.
            // Shutdown is looked at only when the client has sent nothing: a request already
            // there is served (and the connection closed after it), and a keep-alive request
            // that finds its bytes waiting costs no poll of the shutdown signal (a lock).
            let ready = std::future::poll_fn(|cx| {
                if held.kept && io.get_ref().quiet() {
                    *buf = BytesMut::new();
                    *held = Held::default();
                    io.release_shapes();
                    io.get_ref().holding(false);
                    tracing::trace!("a quiet client connection let go of its buffers");
                }
                match io.get_ref().poll_read_ready(cx) {
                    Poll::Pending if stopped.as_mut().poll(cx).is_ready() => Poll::Ready(None),
                    ready => ready.map(Some),
                }
            });
            match ready.await {
                None => return Ok(None),
                Some(ready) => ready.map_err(Err)?,
            }
        }
        if !held.kept {
            held.kept = true;
            io.get_ref().holding(true);
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
            buf.reserve(READ_CHUNK);
        }
        let read = std::future::poll_fn(|cx| {
            if let Poll::Ready(n) = poll_read_buf(io, cx, buf) {
                return Poll::Ready(Some(n));
            }
            // Between requests, shutdown does not wait for the client.
            if idle && stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        });
        match read.await {
            None | Some(Ok(0)) => return Ok(None),
            Some(Err(e)) => return Err(Err(e)),
            Some(Ok(_)) => {}
        }
    }
}

/// The shape the strict check kept of the head at the start of `buf` (after the empty lines
/// before it, which are taken out of `buf` then), with its headers' spans.
fn checked_shape<'a, T>(
    io: &'a mut Strict<T>,
    buf: &mut BytesMut,
) -> Option<(HeadShape, &'a [[u32; 4]])> {
    let blank = buf.chunks_exact(2).take_while(|l| *l == b"\r\n").count() * 2;
    let at = io.handed().checked_sub((buf.len() - blank) as u64)?;
    let kept = io.shape_at(at)?;
    buf.advance(blank);
    Some(kept)
}

/// A span's offsets as indices.
fn range(start: u32, end: u32) -> (usize, usize) {
    (start as usize, end as usize)
}

/// Reads into the spare room of `buf`.
fn poll_read_buf<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// One request's body going in and its answer going out.
struct Exchange {
    framing: Framing,
    /// What is left of a `Content-Length` body, or where a chunked one is.
    left: u64,
    chunk: Chunk,
    /// Every byte of the request body was read.
    read_all: bool,
    /// The request body broke off: nothing more of the connection is read.
    broken: bool,
    /// The body's reader, while it wants more.
    tx: Option<PollSender<Piece>>,
    keep_alive: bool,
    version: Version,
    bodiless: bool,
}

impl Exchange {
    fn new(framing: Framing, keep_alive: bool, version: Version, bodiless: bool) -> Exchange {
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Exchange {
            framing,
            left,
            chunk: Chunk::Size,
            read_all: matches!(framing, Framing::None | Framing::Length(0)),
            broken: false,
            tx: None,
            keep_alive,
            version,
            bodiless,
        }
    }

    /// The next piece of the request body from `buf`: `None` when `buf` holds too little.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Piece>, &'static str> {
        match self.framing {
            Framing::None => Ok(Some(Piece::End)),
            Framing::Length(_) => {
                if self.left == 0 {
                    return Ok(Some(Piece::End));
                }
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = buf
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= n as u64;
                Ok(Some(Piece::Data(buf.split_to(n).freeze())))
            }
            // Lines as long as the strict check in front passes (it bounds them).
            Framing::Chunked => match decode_chunk_within(buf, &mut self.chunk, strict::MAX_HEAD) {
                Ok(Decoded::Data(data)) => Ok(Some(Piece::Data(data))),
                Ok(Decoded::End) => Ok(Some(Piece::End)),
                Ok(Decoded::More) => Ok(None),
                Err(H1Error::Invalid(reason)) => Err(reason),
                Err(_) => Err("the chunked body"),
            },
        }
    }

    /// Reads the request body on to its reader as far as it can without waiting on the reader
    /// or the client. Once the reader is gone, reads nothing more.
    fn poll_pump<T: AsyncRead + Unpin>(
        &mut self,
        io: &mut Strict<T>,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) {
        loop {
            if self.read_all || self.broken {
                self.tx = None;
                return;
            }
            let Some(tx) = self.tx.as_mut() else { return };
            match tx.poll_reserve(cx) {
                Poll::Pending => return,
                Poll::Ready(Err(_)) => {
                    self.tx = None;
                    return;
                }
                Poll::Ready(Ok(())) => {}
            }
            let piece = match self.decode(buf) {
                Ok(Some(piece)) => piece,
                Ok(None) => {
                    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
                        buf.reserve(READ_CHUNK);
                    }
                    match poll_read_buf(io, cx, buf) {
                        Poll::Pending => return,
                        Poll::Ready(Ok(0)) => Piece::Failed(
                            "the client closed the connection in the middle of the request body"
                                .into(),
                        ),
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Ready(Err(e)) => Piece::Failed(e.into()),
                    }
                }
                Err(reason) => Piece::Failed(format!("the request body: {reason}").into()),
            };
            match piece {
                Piece::End => self.read_all = true,
                Piece::Failed(_) => self.broken = true,
                Piece::Data(_) => {}
            }
            let last = !matches!(piece, Piece::Data(_));
            if let Some(tx) = self.tx.as_mut() {
                let _ = tx.send_item(piece);
            }
            if last {
                self.tx = None;
                return;
            }
        }
    }

    /// Writes the answer, reading the request body on meanwhile. `Ok(false)`: the connection
    /// must end after it (the answer says so, or it was cut). The head is encoded here, before
    /// the future is made: what waits in it is the body and the writer's state, not the
    /// response's head, so that a connection's future (whose size is that of its largest
    /// state, held while the connection idles too) stays small.
    fn respond<'a, T: AsyncRead + AsyncWrite + Unpin>(
        &'a mut self,
        io: &'a mut Strict<T>,
        buf: &'a mut BytesMut,
        out: &'a mut Vec<u8>,
        response: Response<BoxBody>,
    ) -> impl Future<Output = io::Result<bool>> + 'a {
        let (parts, mut body) = response.into_parts();
        let writer = self.encode_head(out, &parts, &body);
        crate::spare::keep(parts.headers);
        if writer.no_body {
            drop(body);
            body = crate::body::empty();
        }
        self.send(io, buf, out, writer, body)
    }

    /// Writes the encoded head in `out` and then the body, as [`Exchange::respond`] says.
    async fn send<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut Strict<T>,
        buf: &mut BytesMut,
        out: &mut Vec<u8>,
        mut writer: Writer,
        mut body: BoxBody,
    ) -> io::Result<bool> {
        let mut body = Pin::new(&mut body);
        let mut written = 0;
        let ended = std::future::poll_fn(|cx| loop {
            self.poll_pump(io, buf, cx);
            while !writer.done && out.len() < WRITE_HIGH {
                if writer.no_body {
                    writer.done = true;
                    break;
                }
                match body.as_mut().poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None) => writer.end(out),
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            writer.data(out, &data);
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        tracing::debug!(error = %e, "a response body failed; the connection ends");
                        writer.cut = true;
                        writer.done = true;
                    }
                }
            }
            if written < out.len() {
                let slice = out.get(written..).unwrap_or_default();
                match Pin::new(&mut *io).poll_write(cx, slice) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero)))
                    }
                    Poll::Ready(Ok(n)) => {
                        written += n;
                        if written == out.len() {
                            out.clear();
                            written = 0;
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if writer.done {
                return Pin::new(&mut *io).poll_flush(cx).map_ok(|()| !writer.cut);
            }
            return Poll::Pending;
        })
        .await?;
        Ok(ended && self.keep_alive && writer.keep_alive)
    }

    /// The status line and headers into `out`; what the body's framing is.
    fn encode_head(
        &mut self,
        out: &mut Vec<u8>,
        parts: &http::response::Parts,
        body: &BoxBody,
    ) -> Writer {
        let status = parts.status;
        let headers = &parts.headers;
        let no_body = self.bodiless
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        // These never carry a length; a length that is not one number is left out too.
        let lengthless = status.is_informational() || status == StatusCode::NO_CONTENT;

        // One look at the headers, for what decides the framing.
        let (mut declared, mut lengths, mut close, mut dated) = (None, 0, false, false);
        for (name, value) in headers.iter() {
            if name == header::CONTENT_LENGTH {
                lengths += 1;
                declared = strict::digits(value.as_bytes());
            } else if name == header::CONNECTION {
                close |= connection_has(value.as_bytes(), b"close");
            } else if name == header::DATE {
                dated = true;
            }
        }
        if lengths != 1 || lengthless {
            declared = None;
        }
        let mut keep_alive = self.keep_alive && !close;
        let (mut chunked, mut length, mut added) = (false, declared, None);
        if !no_body && declared.is_none() {
            match body.size_hint().exact() {
                Some(n) => {
                    length = Some(n);
                    added = Some(n);
                }
                None if self.version == Version::HTTP_11 => chunked = true,
                // An HTTP/1.0 client reads to the end of the connection.
                None => keep_alive = false,
            }
        }
        self.keep_alive = keep_alive;

        out.clear();
        out.extend_from_slice(match self.version {
            Version::HTTP_10 => b"HTTP/1.0 ",
            _ => b"HTTP/1.1 ",
        });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in headers.iter() {
            let skip = name == header::TRANSFER_ENCODING
                || (name == header::CONTENT_LENGTH && declared.is_none())
                || (name == header::CONNECTION && self.version == Version::HTTP_10);
            if skip {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if let Some(n) = added {
            out.extend_from_slice(b"content-length: ");
            decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        if chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if self.version == Version::HTTP_10 {
            if keep_alive {
                out.extend_from_slice(b"connection: keep-alive\r\n");
            }
        } else if !keep_alive && !close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        if !dated {
            out.extend_from_slice(b"date: ");
            date(out);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        Writer {
            no_body,
            chunked,
            length: if no_body { None } else { length },
            sent: 0,
            done: false,
            cut: false,
            keep_alive,
        }
    }

    /// After the answer: whether the connection can carry another request, when that is
    /// known without reading (`None`: the reader left some of the request body unread).
    fn settled(&mut self) -> Option<bool> {
        self.tx = None;
        if self.broken {
            return Some(false);
        }
        self.read_all.then_some(true)
    }

    /// Reads what the request body's reader left (so that the next request can be read),
    /// within bounds. Whether the connection can carry another request.
    async fn drain<T: AsyncRead + Unpin>(
        &mut self,
        io: &mut Strict<T>,
        buf: &mut BytesMut,
    ) -> bool {
        let mut dropped = 0u64;
        let drain = std::future::poll_fn(|cx| loop {
            match self.decode(buf) {
                Ok(Some(Piece::End)) => {
                    self.read_all = true;
                    return Poll::Ready(true);
                }
                Ok(Some(Piece::Data(data))) => {
                    dropped += data.len() as u64;
                    if dropped > MAX_DRAIN {
                        return Poll::Ready(false);
                    }
                }
                Ok(Some(Piece::Failed(_))) | Err(_) => return Poll::Ready(false),
                Ok(None) => {
                    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
                        buf.reserve(READ_CHUNK);
                    }
                    match poll_read_buf(io, cx, buf) {
                        Poll::Ready(Ok(n)) if n > 0 => {}
                        Poll::Ready(_) => return Poll::Ready(false),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        });
        tokio::time::timeout(DRAIN_TIME, drain)
            .await
            .unwrap_or(false)
    }
}

/// How the answer's body is being written.
struct Writer {
    no_body: bool,
    chunked: bool,
    /// The `content-length` said.
    length: Option<u64>,
    sent: u64,
    done: bool,
    /// The message was not finished: the connection must end.
    cut: bool,
    keep_alive: bool,
}

impl Writer {
    fn data(&mut self, out: &mut Vec<u8>, data: &[u8]) {
        if data.is_empty() || self.done {
            return;
        }
        if let Some(length) = self.length {
            let room = length.saturating_sub(self.sent);
            if data.len() as u64 > room {
                tracing::debug!(
                    "a response body is longer than its content-length; the connection ends"
                );
                let room = usize::try_from(room).unwrap_or(usize::MAX);
                out.extend_from_slice(data.get(..room).unwrap_or_default());
                self.sent = length;
                self.cut = true;
                self.done = true;
                return;
            }
        }
        if self.chunked {
            hexadecimal(out, data.len() as u64);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(data);
        }
        self.sent += data.len() as u64;
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        self.done = true;
        if self.chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        } else if let Some(length) = self.length {
            if self.sent < length {
                tracing::debug!(
                    "a response body ended short of its content-length; the connection ends"
                );
                self.cut = true;
            }
        } else {
            // Read to the end of the connection.
            self.keep_alive = false;
        }
    }
}

/// `n` in decimal.
fn decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(at..).unwrap_or_default());
}

/// `n` in hexadecimal (a chunk size).
fn hexadecimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(at..).unwrap_or_default());
}

/// The `date` header's value for now (IMF-fixdate), formatted once per second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(cached.1.as_bytes());
    });
}

/// hyper's server settings for client connections (both listeners, and HTTP/1 in
/// tunnels, where `Strict` times heads); with `header_read`, hyper gives a client that long to
/// send a whole request head (slowloris), from the moment it waits for one.
pub(crate) fn hyper_builder(header_read: Option<Duration>) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
        // A client that sends its requests and then shuts its writing side gets its answers,
        // as from latchkey's own server.
        .half_close(true);
    // WebSockets over h2 (RFC 8441).
    builder.http2().enable_connect_protocol();
    builder
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::body::full;
    use crate::strict::Link;

    /// Inputs both servers must read alike: plain requests, bodies of both framings, keep-alive
    /// rules, hand-overs, and what request smuggling is made of (each refused the same way).
    const CASES: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a?b=c HTTP/1.1\r\nHost: a\r\nX-One: 1\r\nx-one: 2\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\r\n\r\nGET /after-empty-lines HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\nGET /n HTTP/1.1\r\n\r\n",
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"POST /short HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello",
        b"GET /close HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
        b"GET /old HTTP/1.0\r\n\r\nGET /never HTTP/1.0\r\n\r\n",
        b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /again HTTP/1.0\r\n\r\n",
        // Found by the fuzz target: `Connection` as hyper reads it, header by header.
        b"GET /a HTTP/1.0\r\nConnection: \x83lose, keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
        b"GET /a HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
        b"GET /a HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
        b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\nConnection: x\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
        b"GET http://example.test:8080/abs?q HTTP/1.1\r\nHost: example.test:8080\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /bad%uri\\x HTTP/1.1\r\nHost: a\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
        b"PUT /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nokGET /after HTTP/1.1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
        // Smuggling: framing headers that disagree, repeated, or hidden; bare line ends.
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nContent-Length: 5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\nGET /bare-lf HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n\r\n",
    ];

    /// Found by the fuzz target: chunk lines and trailers as long as the strict check passes,
    /// and a `Content-Length` with more leading zeros than a u64 has digits (hyper reads it).
    fn long_lines() -> Vec<Vec<u8>> {
        let zeros = |n: usize, value: &str| {
            format!(
                "POST /z HTTP/1.1\r\nContent-Length: {}{value}\r\n\r\nhelloGET /n HTTP/1.1\r\n\r\n",
                "0".repeat(n)
            )
        };
        let trailer = format!(
            "POST /t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: {}\r\n\r\nGET /n HTTP/1.1\r\n\r\n",
            "e".repeat(10_000)
        );
        let extension = |n: usize| {
            format!(
                "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;{}\r\nc\r\n0\r\n\r\nGET /n HTTP/1.1\r\n\r\n",
                "e".repeat(n)
            )
        };
        // hyper's totals for one body (its TRAILER_LIMIT and CHUNKED_EXTENSIONS_LIMIT, 16 KiB
        // each): a trailer section (from its first byte to the empty line's LF) of 16,384
        // bytes is refused, one of 16,383 read; extension bytes (after each `;`) add up over
        // the chunks, and the 16,384th is refused.
        let trailers = |section: usize| {
            format!(
                "POST /t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: {}\r\n\r\nGET /n HTTP/1.1\r\n\r\n",
                "v".repeat(section - 9)
            )
        };
        let extensions = |sizes: &[usize]| {
            let chunks: String = sizes
                .iter()
                .map(|&n| format!("1;{}\r\nc\r\n", "e".repeat(n)))
                .collect();
            format!(
                "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}0\r\n\r\nGET /n HTTP/1.1\r\n\r\n"
            )
        };
        vec![
            trailers(16_383).into_bytes(),
            trailers(16_384).into_bytes(),
            trailers(30_000).into_bytes(),
            extensions(&[4000, 4000, 4000, 4383]).into_bytes(),
            extensions(&[4000, 4000, 4000, 4384]).into_bytes(),
            extensions(&[4000, 4000, 4000, 4000, 4000]).into_bytes(),
            zeros(18, "5").into_bytes(),
            zeros(19, "5").into_bytes(),
            zeros(2400, "5").into_bytes(),
            // 2^64 and more, after the zeros: refused alike.
            zeros(30, "18446744073709551616").into_bytes(),
            zeros(0, "18446744073709551615").into_bytes(),
            zeros(0, "18446744073709551614").into_bytes(),
            zeros(0, "18446744073709551613").into_bytes(),
            trailer.into_bytes(),
            extension(4090).into_bytes(),
            extension(4093).into_bytes(),
            extension(4094).into_bytes(),
            extension(5000).into_bytes(),
        ]
    }

    #[test]
    fn both_servers_read_every_case_alike() {
        let rt = fuzzing::runtime().unwrap();
        let mut requests = 0;
        for case in CASES {
            let seen = fuzzing::compare(&rt, case).unwrap_or_else(|e| panic!("{e}"));
            requests += seen.len();
        }
        for case in long_lines() {
            let seen = fuzzing::compare(&rt, &case).unwrap_or_else(|e| panic!("{e}"));
            requests += seen.len();
        }
        // Not vacuous: most cases are read as one request or more.
        assert!(requests >= 30, "only {requests} requests read in all");
        let seen = fuzzing::run(&rt, CASES[5], true);
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].body.as_deref(), Some(&b"hello"[..]));
        assert_eq!(seen[1].target, "/n");
        // The short body failed, and nothing was read after it.
        let seen = fuzzing::run(&rt, CASES[7], true);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].body, None);
    }

    /// Reads `input` through [`Strict`] keeping shapes, `size` bytes a read, and parses each head
    /// both ways: from the kept shape and with `httparse`. Returns each head's target and
    /// whether a shape was kept for it; panics where the two parses differ.
    fn heads_by_shape(input: &[u8], size: usize, heads: usize) -> Vec<(String, bool)> {
        let rt = fuzzing::runtime().unwrap();
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            client.write_all(input).await.unwrap();
            let mut strict = Strict::new(server, Link::new(), Duration::from_secs(10));
            strict.keep_shapes(true);
            let (mut buf, mut seen, mut skip) = (BytesMut::new(), Vec::new(), 0);
            while seen.len() < heads {
                let mut chunk = vec![0; size];
                let n = tokio::time::timeout(Duration::from_secs(5), strict.read(&mut chunk))
                    .await
                    .expect("a head never came")
                    .unwrap();
                assert!(n > 0, "the input ended after {seen:?}");
                buf.extend_from_slice(&chunk[..n]);
                let dropped = skip.min(buf.len());
                buf.advance(dropped);
                skip -= dropped;
                while skip == 0 && !buf.is_empty() && seen.len() < heads {
                    let mut plain = buf.clone();
                    let (mut spans, mut plain_spans) = (Vec::new(), Vec::new());
                    let shape = checked_shape(&mut strict, &mut buf);
                    let kept = shape.is_some();
                    let ours = parse_head(&mut buf, &mut spans, shape).unwrap();
                    let theirs = parse_head(&mut plain, &mut plain_spans, None).unwrap();
                    let (ours, theirs) = match (ours, theirs) {
                        (Parsed::Partial, Parsed::Partial) => break,
                        (Parsed::Request(a), Parsed::Request(b)) => (a, b),
                        other => panic!("parsed apart: {other:?}"),
                    };
                    assert_eq!(ours.request.method(), theirs.request.method());
                    assert_eq!(ours.request.uri(), theirs.request.uri());
                    assert_eq!(ours.request.version(), theirs.request.version());
                    assert_eq!(ours.request.headers(), theirs.request.headers());
                    assert_eq!(ours.framing, theirs.framing);
                    assert_eq!(ours.keep_alive, theirs.keep_alive);
                    assert_eq!(buf, plain, "the two took different lengths");
                    seen.push((ours.request.uri().to_string(), kept));
                    if let Framing::Length(n) = ours.framing {
                        skip = usize::try_from(n).unwrap();
                        let dropped = skip.min(buf.len());
                        buf.advance(dropped);
                        skip -= dropped;
                    }
                }
            }
            seen
        })
    }

    #[test]
    fn heads_are_read_from_the_shape_the_strict_check_kept() {
        // An input, and each head's target with whether a shape was kept for it: when the first
        // head is checked in a step of its own, and when all heads are checked in one step
        // (then only the last head passed keeps its shape).
        type Case<'a> = (&'a [u8], &'a [(&'a str, bool, bool)]);
        let cases: &[Case] = &[
            (
                b"GET /a HTTP/1.1\r\nHost: a\r\nX-One:  1 \r\n\r\nGET /b HTTP/1.1\r\nHost: b\r\n\r\n",
                &[("/a", true, false), ("/b", true, true)],
            ),
            (
                b"\r\n\r\nGET /after-empty-lines HTTP/1.0\r\n\r\n",
                &[("/after-empty-lines", true, true)],
            ),
            (
                b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\r\nGET /n?q HTTP/1.1\r\n\r\n",
                &[("/p", true, false), ("/n?q", true, true)],
            ),
            // The second head is refused: what stands in for it was never checked as a head,
            // and the first keeps its shape.
            (
                b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                &[("/a", true, true), (strict::STAND_IN_PATH, false, false)],
            ),
        ];
        for (input, want) in cases {
            // A first read of 64 bytes holds the first head whole and no other. Reads shorter
            // than the first head leave it incomplete, and the strict check then reads all the
            // rest at once; a read of 4096 bytes takes the whole input.
            for size in [1, 2, 7, 64, 4096] {
                let seen = heads_by_shape(input, size, want.len());
                let want: Vec<(String, bool)> = want
                    .iter()
                    .map(|(p, apart, whole)| {
                        (p.to_string(), if size == 64 { *apart } else { *whole })
                    })
                    .collect();
                assert_eq!(seen, want, "{input:?} read {size} bytes at a time");
            }
        }
    }

    /// Runs latchkey's server on one in-memory connection with `answer` as the service; sends
    /// `input`, closes, and returns all it wrote back.
    fn exchange(
        input: &[u8],
        answer: impl Fn(&Request<ClientBody>) -> Response<BoxBody> + Send + Sync + 'static,
    ) -> String {
        let rt = fuzzing::runtime().unwrap();
        let input = input.to_vec();
        let answer = Arc::new(answer);
        rt.block_on(async move {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let mut strict = Strict::new(server, Link::new(), Duration::from_secs(10));
            let handler = move |req: Box<Request<ClientBody>>| {
                let answer = answer.clone();
                async move {
                    let response = answer(&req);
                    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                    Ok::<_, Infallible>(response)
                }
            };
            let served = tokio::spawn(async move {
                let (_stop_tx, mut stop) = watch::channel(());
                let mut buf = BytesMut::new();
                let bad = |_: &'static str| Response::new(full("bad"));
                serve(&mut strict, &mut buf, &handler, bad, &mut stop).await
            });
            client.write_all(&input).await.unwrap();
            client.shutdown().await.unwrap();
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.unwrap();
            assert!(matches!(served.await.unwrap(), Outcome::Done(Ok(()))));
            String::from_utf8(out).unwrap()
        })
    }

    fn streamed(parts: &[&'static str]) -> BoxBody {
        let frames: Vec<Result<http_body::Frame<bytes::Bytes>, crate::body::BoxError>> = parts
            .iter()
            .map(|p| {
                Ok(http_body::Frame::data(bytes::Bytes::from_static(
                    p.as_bytes(),
                )))
            })
            .collect();
        http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        ))
    }

    #[test]
    fn answers_are_framed_as_their_bodies_and_clients_need() {
        // A body of known size: content-length; of unknown size: chunked, to HTTP/1.1.
        let out = exchange(
            b"GET /full HTTP/1.1\r\n\r\nGET /stream HTTP/1.1\r\n\r\n",
            |req| match req.uri().path() {
                "/full" => Response::new(full("hello")),
                _ => Response::new(streamed(&["ab", "cde"])),
            },
        );
        let (first, second) = out.split_once("hello").unwrap();
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(first.contains("content-length: 5\r\n"), "{out}");
        assert!(first.contains("date: "), "{out}");
        assert!(second.contains("transfer-encoding: chunked\r\n"), "{out}");
        assert!(
            second.ends_with("\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
            "{out}"
        );

        // To HTTP/1.0: its own version, keep-alive said when kept, and an unknown size is read
        // to the end of the connection.
        let out = exchange(
            b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            |req| match req.uri().path() {
                "/a" => Response::new(full("x")),
                _ => Response::new(streamed(&["to ", "the end"])),
            },
        );
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
        let (first, second) = out.split_once("\r\n\r\nx").unwrap();
        assert!(first.contains("connection: keep-alive\r\n"), "{out}");
        assert!(!second.contains("connection: keep-alive"), "{out}");
        assert!(!second.contains("transfer-encoding"), "{out}");
        assert!(second.ends_with("\r\n\r\nto the end"), "{out}");

        // HEAD, 204 and 304 carry no body; HEAD keeps the length it was given.
        let out = exchange(
            b"HEAD /h HTTP/1.1\r\n\r\nGET /204 HTTP/1.1\r\n\r\nGET /304 HTTP/1.1\r\n\r\n",
            |req| {
                let mut r = Response::new(full("not sent"));
                match req.uri().path() {
                    "/h" => {
                        r.headers_mut()
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(8u64));
                    }
                    "/204" => *r.status_mut() = StatusCode::NO_CONTENT,
                    _ => *r.status_mut() = StatusCode::NOT_MODIFIED,
                }
                r
            },
        );
        assert!(!out.contains("not sent"), "{out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 3, "{out}");
        let heads: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
        assert!(heads[0].contains("content-length: 8\r\n"), "{out}");
        assert!(heads[1].starts_with("204 No Content\r\n"), "{out}");
        assert!(!heads[1].contains("content-length"), "{out}");
        assert!(heads[2].starts_with("304 Not Modified\r\n"), "{out}");
    }

    #[test]
    fn a_body_left_unread_is_drained_and_the_connection_kept_or_closed_when_too_long() {
        // The service answers without reading: a short body is read past, the next request
        // is served.
        let rt_input = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\n";
        let rt = fuzzing::runtime().unwrap();
        let out = rt.block_on(unread_body(rt_input.to_vec()));
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");

        // A body larger than the drain bound: the answer says close, nothing more is read.
        let mut long = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_DRAIN * 2
        )
        .into_bytes();
        long.extend(std::iter::repeat_n(
            b'x',
            usize::try_from(MAX_DRAIN).unwrap() * 2,
        ));
        long.extend_from_slice(b"GET /b HTTP/1.1\r\n\r\n");
        let out = rt.block_on(unread_body(long));
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 1, "{out}");
    }

    /// A server whose service never reads the request body.
    async fn unread_body(input: Vec<u8>) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut strict = Strict::new(server, Link::new(), Duration::from_secs(10));
        let handler = |req: Box<Request<ClientBody>>| {
            drop(req);
            async { Ok::<_, Infallible>(Response::new(full("ok"))) }
        };
        let served = tokio::spawn(async move {
            let (_stop_tx, mut stop) = watch::channel(());
            let mut buf = BytesMut::new();
            let bad = |_: &'static str| Response::new(full("bad"));
            serve(&mut strict, &mut buf, &handler, bad, &mut stop).await
        });
        client.write_all(&input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        let _ = served.await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn a_failed_or_short_answer_ends_the_connection_unfinished() {
        let out = exchange(
            b"GET /a HTTP/1.1\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
            |_| {
                let frames: Vec<Result<http_body::Frame<bytes::Bytes>, crate::body::BoxError>> = vec![
                    Ok(http_body::Frame::data(bytes::Bytes::from_static(b"part"))),
                    Err("the upstream reset".into()),
                ];
                Response::new(http_body_util::BodyExt::boxed_unsync(
                    http_body_util::StreamBody::new(futures_util::stream::iter(frames)),
                ))
            },
        );
        assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
        assert!(out.ends_with("4\r\npart\r\n"), "no last chunk: {out}");

        let out = exchange(
            b"GET /a HTTP/1.1\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
            |_| {
                let mut r = Response::new(full("abc"));
                r.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(10u64));
                r
            },
        );
        assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
        assert!(out.ends_with("\r\n\r\nabc"), "{out}");
    }
}
