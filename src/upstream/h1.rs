//! latchkey's own HTTP/1.1 client for upstream connections.
//!
//! hyper's client drives every connection as a task of its own and hands each request and
//! response across to it over channels, with a timer per connection; in the profile of a proxied
//! request that machinery was a third of all instructions. A proxy sends one request at a time
//! per connection, so here the request's own future does the exchange: it writes the request
//! head on the connection it took from the pool and reads the response head, and the response
//! body ([`H1Body`]) reads the rest and gives the connection back to the pool when the body has
//! ended. A request body is sent while the response is read (an upstream may answer before it
//! has read everything), by [`Pump`], polled by the same future.
//!
//! Parsing is httparse's, as in hyper. The response's hop-by-hop and framing headers, and those
//! its `Connection` header names, are left out as the header map is built; the framing latchkey
//! sends on is the body's own (RFC 9112 section 6.3 decides how the upstream's body ends).
//!
//! Framing is read at least as strictly as hyper reads it, since a connection read loosely can
//! be desynchronised and then hand one tenant's answer to another: every line of a head and of
//! a chunked body ends in CRLF, chunk extensions and trailers hold no control characters, a
//! chunk size that does not fit in 64 bits is refused, and any answer that leaves doubt about
//! where it ended (a request body that did not match its length, bytes past the end, a
//! `Transfer-Encoding` on HTTP/1.0) leaves its connection unused. A body that moves no byte
//! either way for the body timeout is cut.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::{self, MaybeUninit};
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};
use zeroize::Zeroizing;

use super::dial::MaybeTls;
use crate::body::{BoxBody as UpstreamBody, BoxError};
use crate::hop_by_hop::{is_hop_by_hop_bytes, is_latchkey_error};

/// The largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The most header lines a response head may have (hyper's default too).
const MAX_HEADERS: usize = 100;
/// What one read of a response head asks for at least.
const READ_CHUNK: usize = 16 * 1024;
/// What one read of a response body asks for at least: large bodies stream in large reads.
const BODY_CHUNK: usize = 64 * 1024;
/// The longest chunk-size line or trailer line of a chunked body.
const MAX_LINE: usize = 4 * 1024;
/// The longest body timeout taken (a longer one is this): a deadline past the clock's range
/// would panic.
pub(crate) const MAX_BODY_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before it answered")]
    Closed,
    #[error("the upstream's answer is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
    #[error("the upstream's response head is larger than {} KiB", MAX_HEAD / 1024)]
    HeadTooLarge,
    #[error("the upstream switched protocols, which latchkey does not proxy")]
    Upgrade,
    #[error("the request body failed: {0}")]
    RequestBody(BoxError),
    /// The request body did not match the length its head declared.
    #[error("the request body {0}")]
    RequestLength(&'static str),
    /// The client sent nothing of its request body for the body timeout.
    #[error("the client sent no byte of its request body for {0:?}")]
    ClientStalled(Duration),
    /// The upstream took or sent nothing of a body for the body timeout.
    #[error("the upstream moved no byte of the body for {0:?}")]
    UpstreamStalled(Duration),
    /// The request timeout passed before the whole response head came.
    #[error("the upstream did not answer within {0:?}")]
    NoAnswer(Duration),
}

impl H1Error {
    /// Whether the client, not the upstream, is at fault.
    fn is_clients(&self) -> bool {
        matches!(
            self,
            H1Error::RequestBody(_) | H1Error::RequestLength(_) | H1Error::ClientStalled(_)
        )
    }
}

/// An HTTP/1.1 connection to an upstream, and what was read on it past the last message.
pub struct H1Conn {
    io: MaybeTls,
    buf: BytesMut,
    /// Where each header line of the head being parsed is (kept to spare an allocation).
    spans: Vec<[usize; 4]>,
    /// The body timeout.
    stall: Pin<Box<Stall>>,
}

pin_project_lite::pin_project! {
    /// The connection's timers, made with it (one allocation per connection, none per
    /// request). How long a body may go with no byte moving either way, and its timer:
    /// registered only when a body first waits, and set again only when bytes have moved
    /// since. And the timer of the request timeout ([`Deadline`]): left armed between
    /// exchanges and moved only when it would fire after the current exchange's deadline or
    /// has fired, so that most exchanges neither insert a timer nor remove one.
    struct Stall {
        #[pin]
        timer: Sleep,
        timeout: Duration,
        // Bytes were read since the timer was last set.
        moved: bool,
        #[pin]
        answer: Sleep,
    }
}

/// When an exchange must have its response head: the request timeout (`within`) counted from
/// the moment the request was handed to the pool (`at`).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    pub within: Duration,
}

impl Deadline {
    /// The request timeout from now (a timeout past the clock's range is taken as a year).
    pub fn after(now: Instant, within: Duration) -> Deadline {
        Deadline {
            at: now + within.min(MAX_BODY_TIMEOUT),
            within,
        }
    }
}

/// How the request body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    None,
    Length(u64),
    Chunked,
}

impl RequestFraming {
    pub fn of(method: &Method, body: &UpstreamBody) -> RequestFraming {
        if body.is_end_stream() {
            // Methods whose requests carry content say how long it is, even when it is empty.
            let no_content = matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::DELETE
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::CONNECT
            );
            return if no_content {
                RequestFraming::None
            } else {
                RequestFraming::Length(0)
            };
        }
        match body.size_hint().exact() {
            Some(n) => RequestFraming::Length(n),
            None => RequestFraming::Chunked,
        }
    }
}

/// Writes the request head: origin-form target, `Host` first, the headers of `parts` except
/// `Host` and framing, then the framing latchkey sends the body with. The head carries the
/// credential, so it is written into a buffer sized for all of it up front (no reallocation
/// leaves a copy behind) that is zeroized when dropped.
pub fn encode_head(
    parts: &http::request::Parts,
    authority: &str,
    framing: RequestFraming,
) -> Zeroizing<Vec<u8>> {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let size = parts.method.as_str().len()
        + target.len()
        + authority.len()
        + parts
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>()
        + 80;
    let mut out = Zeroizing::new(Vec::with_capacity(size));
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A response head, parsed, with how its body ends.
pub struct Head {
    pub response: Response<()>,
    pub framing: Framing,
    /// Whether the connection may carry another request once this body has ended.
    pub reusable: bool,
}

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    /// At the connection's end.
    Close,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Why an exchange failed, and whether the request may be sent again on another connection.
pub struct Failure {
    pub error: H1Error,
    /// Nothing was answered and no body was sent: the upstream had closed the connection.
    pub retryable: bool,
}

impl H1Conn {
    /// A connection whose bodies may go `body_timeout` with no byte moving. Inside a runtime
    /// with a timer (the body timeout's is made here).
    pub fn new(io: MaybeTls, body_timeout: Duration) -> H1Conn {
        let body_timeout = body_timeout.min(MAX_BODY_TIMEOUT);
        H1Conn {
            io,
            buf: BytesMut::new(),
            spans: Vec::new(),
            stall: Box::pin(Stall {
                timer: tokio::time::sleep(body_timeout),
                timeout: body_timeout,
                moved: true,
                answer: tokio::time::sleep(MAX_BODY_TIMEOUT),
            }),
        }
    }

    fn body_timeout(&self) -> Duration {
        self.stall.timeout
    }

    /// Lets go of the read buffer (16 KiB once grown) and the head's line index while the
    /// connection rests in the pool; the next read allocates them again.
    pub fn release_buffers(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
        if self.spans.capacity() > 0 {
            self.spans = Vec::new();
        }
    }

    /// The read buffer's capacity (what a connection holds while it rests).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Whether an idle connection can be used: not closed by the upstream, nothing unasked-for
    /// on it. Costs a read only when the connection's socket was seen readable.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.poll_fill(&mut cx), Poll::Pending)
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.poll_fill_by(cx, READ_CHUNK)
    }

    fn poll_fill_by(&mut self, cx: &mut Context<'_>, chunk: usize) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < chunk / 4 {
            self.buf.reserve(chunk);
        }
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf);
        if let Poll::Ready(Ok(1..)) = read {
            *self.stall.as_mut().project().moved = true;
        }
        read
    }

    /// For a body that is waiting: `Ready` once no byte has moved for the body timeout. The
    /// clock is read only when bytes moved since the last wait (`moved`: those the caller saw).
    fn poll_stall(&mut self, cx: &mut Context<'_>, moved: bool) -> Poll<()> {
        let mut stall = self.stall.as_mut().project();
        if mem::take(stall.moved) | moved {
            let deadline = Instant::now() + *stall.timeout;
            stall.timer.as_mut().reset(deadline);
        }
        stall.timer.poll(cx)
    }

    /// For an exchange that is waiting: `Ready` once `deadline` has passed. The timer is the
    /// connection's own (see [`Stall`]); one that fires for an earlier exchange's deadline is
    /// set again to this one's.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let mut timer = self.stall.as_mut().project().answer;
        if timer.deadline() > deadline || timer.is_elapsed() {
            timer.as_mut().reset(deadline);
        }
        ready!(timer.as_mut().poll(cx));
        if Instant::now() >= deadline {
            return Poll::Ready(());
        }
        // Fired at an earlier deadline: moved to this one. Should the timer's clock already be
        // past it (it rounds deadlines up to its millisecond tick), this one has passed too.
        timer.as_mut().reset(deadline);
        timer.poll(cx)
    }

    /// Sends `head` and the body (if any), and reads the response head, by `deadline`.
    /// `idempotent`: whether a request the upstream closed on without answering may be sent
    /// again.
    pub async fn exchange(
        &mut self,
        head: &[u8],
        pump: &mut Pump,
        to_head: bool,
        idempotent: bool,
        deadline: Deadline,
    ) -> Result<Head, Failure> {
        let mut written = 0;
        let wrote = poll_fn(|cx| {
            while written < head.len() {
                let write = Pin::new(&mut self.io).poll_write(cx, &head[written..]);
                match write {
                    Poll::Pending if self.poll_deadline(cx, deadline.at).is_ready() => {
                        return Poll::Ready(Err(H1Error::NoAnswer(deadline.within)))
                    }
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()))
                    }
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                }
            }
            Pin::new(&mut self.io).poll_flush(cx).map_err(H1Error::from)
        })
        .await;
        if let Err(error) = wrote {
            let retryable = written == 0 && matches!(error, H1Error::Io(_));
            return Err(Failure { error, retryable });
        }
        // A write of the body that fails (the upstream answered early and closed) does not end
        // the exchange: the answer may be waiting to be read.
        let mut write_failed = None;
        // The timer starts at the first wait of this exchange, not at the last of the one before.
        *self.stall.as_mut().project().moved = true;
        // No answer is due while the request body is still being sent (the body timeout
        // bounds that): the request timeout runs out `within` after the body has gone, if that
        // is later than `deadline`. A slow upload that keeps moving is not cut.
        let mut answer_by = deadline.at;
        let mut sending = !pump.done;
        let result = poll_fn(|cx| {
            if !pump.done {
                match pump.poll(&mut self.io, cx) {
                    Poll::Ready(Err(e)) if e.is_clients() => return Poll::Ready(Err(e)),
                    Poll::Ready(Err(e)) => {
                        pump.done = true;
                        write_failed = Some(e);
                    }
                    _ => {}
                }
            }
            let head = self.poll_head(cx, to_head);
            // While the request body is being sent, the body timeout applies; the request
            // timeout once it has gone (above).
            if head.is_pending() && !pump.done {
                let moved = mem::take(&mut pump.moved);
                if self.poll_stall(cx, moved).is_ready() {
                    return Poll::Ready(Err(pump.stalled(self.body_timeout())));
                }
            }
            if sending && pump.done {
                sending = false;
                answer_by = answer_by.max(Instant::now() + deadline.within.min(MAX_BODY_TIMEOUT));
            }
            if head.is_pending() && !sending && self.poll_deadline(cx, answer_by).is_ready() {
                return Poll::Ready(Err(H1Error::NoAnswer(deadline.within)));
            }
            head
        })
        .await;
        let result = match (result, write_failed) {
            (Ok(mut head), Some(e)) => {
                tracing::debug!(error = %e, "the upstream answered before it took the whole request body");
                head.reusable = false;
                Ok(head)
            }
            (Err(_), Some(e)) => Err(e),
            (result, None) => result,
        };
        result.map_err(|error| {
            let nothing_sent = !pump.started;
            let retryable = idempotent
                && nothing_sent
                && self.buf.is_empty()
                && match &error {
                    H1Error::Closed => true,
                    H1Error::Io(e) => matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::BrokenPipe
                    ),
                    _ => false,
                };
            Failure { error, retryable }
        })
    }

    fn poll_head(&mut self, cx: &mut Context<'_>, to_head: bool) -> Poll<Result<Head, H1Error>> {
        loop {
            if !self.buf.is_empty() {
                if let Some(head) = parse_head(&mut self.buf, &mut self.spans, to_head)? {
                    return Poll::Ready(Ok(head));
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) if self.buf.is_empty() => return Poll::Ready(Err(H1Error::Closed)),
                Ok(0) => return Poll::Ready(Err(H1Error::Invalid("the response head is cut off"))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

/// Parses a response head at the start of `buf`; `None` when more must be read. Interim (1xx)
/// answers are skipped. The head's bytes are taken from `buf`; `spans` is scratch space.
pub fn parse_head(
    buf: &mut BytesMut,
    spans: &mut Vec<[usize; 4]>,
    to_head: bool,
) -> Result<Option<Head>, H1Error> {
    loop {
        let mut headers = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(H1Error::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Invalid("more than 100 header lines"))
            }
            // Obsolete line folding is among what httparse refuses by default, as hyper does.
            Err(_) => return Err(H1Error::Invalid("the response head does not parse")),
        };
        if !lines_end_in_crlf(&buf[..len], parsed.headers) {
            return Err(H1Error::Invalid(
                "a line of the response head does not end in CRLF",
            ));
        }
        let code = parsed.code.unwrap_or(0);
        if code == 101 {
            return Err(H1Error::Upgrade);
        }
        if (100..200).contains(&code) {
            buf.advance(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| H1Error::Invalid("the status code"))?;
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };

        // Where each header's name and value are in `buf`, and what the framing headers say.
        let base = buf.as_ptr() as usize;
        let at = |s: &[u8]| s.as_ptr() as usize - base;
        spans.clear();
        for h in parsed.headers.iter() {
            let (name_at, value_at) = (at(h.name.as_bytes()), at(h.value));
            spans.push([
                name_at,
                name_at + h.name.len(),
                value_at,
                value_at + h.value.len(),
            ]);
        }
        let said = Said::of(parsed.headers, version)?;
        let no_body =
            to_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let (framing, reusable) = said.framing(no_body);

        let head = buf.split_to(len).freeze();
        let mut map = header_map(&head, spans, said.named_by_connection)?;
        if to_head {
            // The one length rule of `hop_by_hop::strip_response`: the answer to a HEAD keeps
            // its Content-Length, once, as the size a GET would have.
            if let Some(n) = said.length {
                map.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = map;
        return Ok(Some(Head {
            response,
            framing,
            reusable,
        }));
    }
}

/// Whether every line of a head that httparse accepted (`headers` is its parse) ends in CRLF:
/// httparse, and so hyper, also take a bare LF, and empty lines before the status line. A line
/// ends either right before a header name or at the end of the head, so those are the places
/// to look, not every byte: before a name is the LF that ended the line before, and before that
/// LF must be a CR (httparse takes a CR only right before an LF).
fn lines_end_in_crlf(head: &[u8], headers: &[httparse::Header<'_>]) -> bool {
    let base = head.as_ptr() as usize;
    head.starts_with(b"HTTP/")
        && head.ends_with(b"\r\n\r\n")
        && headers.iter().all(|h| {
            let at = (h.name.as_ptr() as usize).wrapping_sub(base);
            head.get(at.wrapping_sub(2)) == Some(&b'\r')
        })
}

/// What a response head's connection and framing headers say.
struct Said {
    close: bool,
    /// `Connection` names other headers, to be left out.
    named_by_connection: bool,
    /// `Transfer-Encoding` present, and whether its last coding is `chunked`.
    chunked: Option<bool>,
    /// `Content-Length`, when every one given agrees.
    length: Option<u64>,
}

impl Said {
    fn of(headers: &[httparse::Header<'_>], version: Version) -> Result<Said, H1Error> {
        let mut said = Said {
            close: version == Version::HTTP_10,
            named_by_connection: false,
            chunked: None,
            length: None,
        };
        for h in headers {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"connection") {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        said.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        if version == Version::HTTP_10 {
                            said.close = false;
                        }
                    } else if !token.is_empty() {
                        said.named_by_connection = true;
                    }
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // Only `chunked` is decoded: a body in another transfer coding (`gzip, chunked`)
                // would go on as coded bytes that no header labels and the scrubber cannot
                // read, so such an answer is refused (hyper passes the coded bytes on).
                let other = h.value.split(|b| *b == b',').any(|coding| {
                    let coding = coding.trim_ascii();
                    !coding.is_empty() && !coding.eq_ignore_ascii_case(b"chunked")
                });
                if other {
                    return Err(H1Error::Invalid(
                        "a transfer coding other than chunked, which latchkey does not decode",
                    ));
                }
                let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
                said.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"content-length") {
                let n = parse_length(h.value)
                    .ok_or(H1Error::Invalid("the Content-Length is not a number"))?;
                if said.length.is_some_and(|l| l != n) {
                    return Err(H1Error::Invalid("two different Content-Length values"));
                }
                said.length = Some(n);
            }
        }
        // RFC 9112 section 6.1: a Transfer-Encoding on HTTP/1.0 is faulty framing, whatever
        // else the head says; the connection closes after this message.
        if version == Version::HTTP_10 && said.chunked.is_some() {
            said.close = true;
        }
        Ok(said)
    }

    /// How the body ends (RFC 9112 section 6.3), and whether the connection may carry another
    /// request after it.
    fn framing(&self, no_body: bool) -> (Framing, bool) {
        let (framing, reusable) = match (no_body, self.chunked, self.length) {
            (true, _, _) => (Framing::Empty, true),
            // Transfer-Encoding wins over Content-Length; a message with both is not trusted
            // to leave the connection clean.
            (false, Some(true), l) => (Framing::Chunked(Chunk::Size), l.is_none()),
            (false, Some(false), _) => (Framing::Close, false),
            (false, None, Some(0)) => (Framing::Empty, true),
            (false, None, Some(n)) => (Framing::Length(n), true),
            (false, None, None) => (Framing::Close, false),
        };
        (framing, reusable && !self.close)
    }
}

/// The head's headers as a map, without hop-by-hop and framing headers and those that
/// `Connection` names; values share the head's bytes.
fn header_map(
    head: &Bytes,
    spans: &[[usize; 4]],
    named_by_connection: bool,
) -> Result<HeaderMap, H1Error> {
    let mut map = crate::spare::header_map(spans.len());
    let connection_values: Vec<Range<usize>> = if named_by_connection {
        spans
            .iter()
            .filter(|s| head[s[0]..s[1]].eq_ignore_ascii_case(b"connection"))
            .map(|s| s[2]..s[3])
            .collect()
    } else {
        Vec::new()
    };
    for span in spans {
        let raw = &head[span[0]..span[1]];
        // Left out before a name is built for it (most answers carry a length and a
        // `Connection`); an upstream's `Latchkey-Error` too (`hop_by_hop::strip_response`).
        if is_hop_by_hop_bytes(raw) || is_latchkey_error(raw) {
            continue;
        }
        let name = HeaderName::from_bytes(raw).map_err(|_| H1Error::Invalid("a header name"))?;
        if named_by_connection && named(head, &connection_values, name.as_str()) {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(span[2]..span[3]))
            .map_err(|_| H1Error::Invalid("a header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Whether a `Connection` header value names `name`.
fn named(head: &Bytes, values: &[Range<usize>], name: &str) -> bool {
    values.iter().any(|v| {
        head[v.clone()]
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
    })
}

fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Sends a request body, frame by frame, as it arrives from the client, and checks it against
/// the length the head declared: a body that ends short or runs long fails (what is past the
/// length is never written), so the connection is not used again.
pub struct Pump {
    body: UpstreamBody,
    chunked: bool,
    /// With a declared length: what is still to come of it.
    left: u64,
    /// What is still to be written of the current frame: size line, data, line end.
    out: [Bytes; 3],
    /// Whether the body was polled (and so cannot be sent again).
    started: bool,
    /// The last piece is queued; once written and flushed, the body is done.
    last: bool,
    pub done: bool,
    /// Bytes were taken from the client or written upstream since the timer was last set.
    moved: bool,
    /// Waiting for the client's body, not for the upstream to take what was written.
    client_turn: bool,
}

impl Pump {
    pub fn new(body: UpstreamBody, framing: RequestFraming) -> Pump {
        Pump {
            body,
            chunked: framing == RequestFraming::Chunked,
            left: match framing {
                RequestFraming::Length(n) => n,
                _ => 0,
            },
            out: Default::default(),
            started: false,
            last: false,
            done: matches!(framing, RequestFraming::None | RequestFraming::Length(0)),
            moved: false,
            client_turn: false,
        }
    }

    /// The body, when none of it was taken (to send it on another kind of connection).
    /// Whether a byte of the request has been written (it cannot be sent elsewhere then).
    pub fn started(&self) -> bool {
        self.started
    }

    pub fn into_body(self) -> Option<UpstreamBody> {
        (!self.started).then_some(self.body)
    }

    /// The error of a body that moved no byte for `timeout`: the client's, when the pump was
    /// waiting for it; the upstream's, when it was waiting for the upstream to take bytes.
    fn stalled(&self, timeout: Duration) -> H1Error {
        if self.client_turn {
            H1Error::ClientStalled(timeout)
        } else {
            H1Error::UpstreamStalled(timeout)
        }
    }

    /// Writes what the body has given; `Ready(Ok)` once all of it is written.
    fn poll(&mut self, io: &mut MaybeTls, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        loop {
            while self.out.iter().any(|b| !b.is_empty()) {
                let slices = [
                    IoSlice::new(&self.out[0]),
                    IoSlice::new(&self.out[1]),
                    IoSlice::new(&self.out[2]),
                ];
                let mut n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
                if n == 0 {
                    return Poll::Ready(Err(H1Error::Io(io::ErrorKind::WriteZero.into())));
                }
                self.moved = true;
                for piece in &mut self.out {
                    let take = n.min(piece.len());
                    piece.advance(take);
                    n -= take;
                }
            }
            ready!(Pin::new(&mut *io).poll_flush(cx))?;
            if self.last {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            self.started = true;
            self.client_turn = true;
            let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
            self.client_turn = false;
            self.moved = true;
            match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers are not sent on
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if self.chunked {
                        self.out[0] = Bytes::from(format!("{:x}\r\n", data.len()));
                        self.out[2] = Bytes::from_static(b"\r\n");
                    } else {
                        self.left = self
                            .left
                            .checked_sub(data.len() as u64)
                            .ok_or(H1Error::RequestLength("is longer than its Content-Length"))?;
                    }
                    self.out[1] = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(H1Error::RequestBody(e))),
                None => {
                    if self.chunked {
                        self.out[0] = Bytes::from_static(b"0\r\n\r\n");
                    } else if self.left > 0 {
                        return Poll::Ready(Err(H1Error::RequestLength(
                            "ended before its Content-Length",
                        )));
                    }
                    self.last = true;
                }
            }
        }
    }
}

/// Where a connection goes back to once the response body it carried has ended cleanly (the
/// pool implements it; this module knows nothing of pools).
pub trait Checkin {
    fn checkin(self, conn: H1Conn);
}

/// The body of a response on an HTTP/1.1 upstream connection.
pub struct H1Body<H> {
    conn: Option<H1Conn>,
    framing: Framing,
    reusable: bool,
    /// A request body still being sent (rare: boxed).
    pump: Option<Box<Pump>>,
    home: Option<H>,
}

impl<H: Checkin> H1Body<H> {
    /// The body of `head`, read from `conn`; `home` takes the connection back when it ends.
    /// `None` when there is no body (the connection is given back at once).
    pub fn new(conn: H1Conn, head: &Head, pump: Pump, home: H) -> Option<H1Body<H>> {
        let mut body = H1Body {
            conn: Some(conn),
            framing: head.framing,
            reusable: head.reusable,
            pump: (!pump.done).then(|| Box::new(pump)),
            home: Some(home),
        };
        if head.framing == Framing::Empty {
            body.end();
            return None;
        }
        Some(body)
    }

    /// The body has ended: the connection goes home if it is clean and the request was sent.
    fn end(&mut self) {
        self.framing = Framing::Empty;
        let conn = self.conn.take();
        if let (Some(conn), Some(home), true, None) =
            (conn, self.home.take(), self.reusable, &self.pump)
        {
            if conn.buf.is_empty() {
                home.checkin(conn);
            }
        }
    }

    fn fail(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.framing = Framing::Empty;
        self.conn = None;
        let e: BoxError = match e {
            // Said as a timeout, which the access log tells apart from other body failures.
            e @ H1Error::UpstreamStalled(_) => Box::new(io::Error::new(io::ErrorKind::TimedOut, e)),
            e => e.into(),
        };
        Poll::Ready(Some(Err(e)))
    }
}

impl<H: Checkin + Unpin> Body for H1Body<H> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(pump) = this.pump.as_mut() {
            match pump.poll(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => this.pump = None,
                Poll::Ready(Err(e)) => {
                    // The upstream answered without taking the whole request: read on, but
                    // the connection cannot be used again.
                    tracing::debug!(error = %e, "the request body was not sent to its end");
                    this.pump = None;
                    this.reusable = false;
                }
                Poll::Pending => {}
            }
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing {
                Framing::Empty => return Poll::Ready(None),
                Framing::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = conn
                            .buf
                            .len()
                            .min(usize::try_from(*left).unwrap_or(usize::MAX));
                        let data = conn.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            this.end();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(state) => match decode_chunk(&mut conn.buf, state) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End) => {
                        this.end();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::More) => {}
                    Err(e) => return this.fail(e),
                },
                Framing::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let filled = match conn.poll_fill_by(cx, BODY_CHUNK) {
                Poll::Ready(filled) => filled,
                Poll::Pending => {
                    let moved = this.pump.as_mut().is_some_and(|p| mem::take(&mut p.moved));
                    if conn.poll_stall(cx, moved).is_ready() {
                        let timeout = conn.body_timeout();
                        let e = match &this.pump {
                            Some(pump) => pump.stalled(timeout),
                            None => H1Error::UpstreamStalled(timeout),
                        };
                        return this.fail(e);
                    }
                    return Poll::Pending;
                }
            };
            match filled {
                Ok(0) if this.framing == Framing::Close => {
                    this.reusable = false;
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail(H1Error::Invalid(
                        "the upstream closed the connection before the body ended",
                    ))
                }
                Ok(_) => {}
                Err(e) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Empty
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

pub enum Decoded {
    Data(Bytes),
    More,
    End,
}

/// Takes what it can of a chunked body from `buf` (RFC 9112 section 7.1), as strictly as hyper
/// or more: every line ends in CRLF, a chunk size fits in 64 bits, extensions and trailers hold
/// no control character but HTAB, trailers are `name: value` lines without obsolete folding.
pub fn decode_chunk(buf: &mut BytesMut, state: &mut Chunk) -> Result<Decoded, H1Error> {
    decode_chunk_within(buf, state, MAX_LINE)
}

/// [`decode_chunk`] with lines (chunk-size lines, trailers) of up to `max_line` bytes: a
/// reader behind a check that already bounds them (latchkey's own server, behind
/// [`crate::strict`]) takes what that check passed.
pub fn decode_chunk_within(
    buf: &mut BytesMut,
    state: &mut Chunk,
    max_line: usize,
) -> Result<Decoded, H1Error> {
    loop {
        match state {
            Chunk::Size => {
                let Some((used, size)) = chunk_size_line(buf, max_line)? else {
                    return more(buf, max_line);
                };
                buf.advance(used);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let data = buf.split_to(n).freeze();
                *left -= n as u64;
                if *left == 0 {
                    *state = Chunk::DataEnd;
                }
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd => {
                match buf.get(..2) {
                    Some(b"\r\n") => buf.advance(2),
                    None if buf.first().is_none_or(|b| *b == b'\r') => return Ok(Decoded::More),
                    _ => return Err(H1Error::Invalid("a chunk's data does not end in CRLF")),
                }
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(end) = buf.iter().position(|b| *b == b'\n') else {
                    return more(buf, max_line);
                };
                // A line that arrived whole is held to the bound a line arriving in pieces is.
                if end > max_line {
                    return Err(H1Error::Invalid("a chunk line is too long"));
                }
                let line = match end.checked_sub(1).map(|cr| (buf.get(cr), buf.get(..cr))) {
                    Some((Some(b'\r'), Some(line))) => line,
                    _ => return Err(H1Error::Invalid("a trailer line ends in LF without CR")),
                };
                if !line.is_empty() {
                    trailer_line(line)?;
                }
                let blank = line.is_empty();
                buf.advance(end + 1);
                if blank {
                    return Ok(Decoded::End);
                }
            }
        }
    }
}

/// Parses the chunk-size line at the start of `buf`: hex digits (leading zeros allowed, a size
/// past 64 bits refused), optional whitespace, extensions (ignored, but without a bare CR or LF
/// or any other control character but HTAB), CRLF. `None` while the line is not all there.
fn chunk_size_line(buf: &[u8], max_line: usize) -> Result<Option<(usize, u64)>, H1Error> {
    let mut size: u64 = 0;
    let mut at = 0;
    while let Some(digit) = buf.get(at).and_then(|b| char::from(*b).to_digit(16)) {
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(digit)))
            .ok_or(H1Error::Invalid("a chunk size does not fit in 64 bits"))?;
        at += 1;
    }
    if at == 0 && !buf.is_empty() {
        return Err(H1Error::Invalid(
            "a chunk size line does not start with a size",
        ));
    }
    let mut in_extension = false;
    while let Some(b) = buf.get(at) {
        match *b {
            b'\r' => {
                return match buf.get(at + 1) {
                    None => Ok(None),
                    // A line that arrived whole is held to the bound a line arriving in pieces
                    // is ([`more`]).
                    Some(b'\n') if at + 1 > max_line => {
                        Err(H1Error::Invalid("a chunk line is too long"))
                    }
                    Some(b'\n') => Ok(Some((at + 2, size))),
                    Some(_) => Err(H1Error::Invalid("a chunk size line has a CR without LF")),
                };
            }
            b'\n' => return Err(H1Error::Invalid("a chunk size line ends in LF without CR")),
            b';' => in_extension = true,
            b' ' | b'\t' => {}
            b if is_control(b) => {
                return Err(H1Error::Invalid(
                    "a chunk extension holds a control character",
                ))
            }
            _ if in_extension => {}
            _ => return Err(H1Error::Invalid("a chunk size line")),
        }
        at += 1;
    }
    Ok(None)
}

/// Checks one trailer line (without its CRLF): a field name, a colon, a value; no control
/// character but HTAB, no obsolete folding (a line that starts with whitespace).
fn trailer_line(line: &[u8]) -> Result<(), H1Error> {
    let name_end = line.iter().position(|b| *b == b':').unwrap_or(0);
    let name = line.get(..name_end).unwrap_or_default();
    let value = line.get(name_end..).unwrap_or_default();
    if name.is_empty() || !name.iter().all(|b| is_token(*b)) {
        return Err(H1Error::Invalid("a trailer line is not a header field"));
    }
    if value.iter().any(|b| *b != b'\t' && is_control(*b)) {
        return Err(H1Error::Invalid("a trailer holds a control character"));
    }
    Ok(())
}

/// A `tchar` of RFC 9110 section 5.6.2, what field names are made of.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A control character (HTAB among them; callers allow it where the grammar does).
fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

fn more(buf: &BytesMut, max_line: usize) -> Result<Decoded, H1Error> {
    if buf.len() > max_line {
        return Err(H1Error::Invalid("a chunk line is too long"));
    }
    Ok(Decoded::More)
}

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn head(raw: &[u8], to_head: bool) -> Head {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, &mut Vec::new(), to_head)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn response_heads_say_how_their_bodies_end() {
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n", false);
        assert_eq!(h.framing, Framing::Length(3));
        assert!(h.reusable);
        assert!(h.response.headers().get("content-length").is_none());

        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(h.response.headers().is_empty());
        // A transfer coding latchkey does not decode, alone, in a list or in a second header:
        // refused, never passed on as coded bytes.
        for te in [
            "gzip, chunked",
            "GZIP",
            "chunked, deflate",
            "gzip\r\nTransfer-Encoding: chunked",
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n");
            let mut buf = BytesMut::from(raw.as_bytes());
            match parse_head(&mut buf, &mut Vec::new(), false) {
                Err(H1Error::Invalid(why)) => assert!(why.contains("transfer coding"), "{te}"),
                other => panic!("{te}: {:?}", other.map(|h| h.map(|h| h.framing))),
            }
        }

        let h = head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(!h.reusable, "both framings: not reused");

        let h = head(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.reusable);

        let h = head(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n", false);
        assert!(!h.reusable, "HTTP/1.0 closes unless it says keep-alive");
        let h = head(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\ncontent-length: 2\r\n\r\n",
            false,
        );
        assert!(h.reusable);
        let h = head(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 2\r\n\r\n",
            false,
        );
        assert!(!h.reusable);

        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", true);
        assert_eq!(h.framing, Framing::Empty, "an answer to HEAD has no body");
        assert_eq!(
            h.response.headers()["content-length"],
            "7",
            "but keeps its length"
        );
        let h = head(
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Empty);
    }

    #[test]
    fn hop_by_hop_headers_those_connection_names_and_latchkey_error_are_left_out() {
        let h = head(
            b"HTTP/1.1 201 Created\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nX-Kept: a\r\nx-kept: b\r\nUpgrade: h2c\r\nLatchkey-Error: connection_not_found\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert_eq!(h.response.status(), 201);
        let names: Vec<_> = h.response.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        assert_eq!(h.response.headers().get_all("x-kept").iter().count(), 2);
    }

    #[test]
    fn interim_answers_are_skipped_and_bad_heads_refused() {
        let h = head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert_eq!(h.response.status(), 200);
        let mut partial = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2"[..]);
        assert!(parse_head(&mut partial, &mut Vec::new(), false)
            .unwrap()
            .is_none());

        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            let parsed = parse_head(&mut buf, &mut Vec::new(), false);
            assert!(parsed.is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let mut huge = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx: "[..]);
        huge.extend_from_slice(&vec![b'a'; MAX_HEAD]);
        assert!(matches!(
            parse_head(&mut huge, &mut Vec::new(), false),
            Err(H1Error::HeadTooLarge)
        ));
    }

    fn decode_all(input: &[u8], split: usize) -> Result<(Vec<u8>, Vec<u8>), H1Error> {
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        for piece in input.chunks(split) {
            buf.extend_from_slice(piece);
            loop {
                match decode_chunk(&mut buf, &mut state)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::More => break,
                    Decoded::End => return Ok((out, buf.to_vec())),
                }
            }
        }
        Err(H1Error::Invalid("no end"))
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let body =
            b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\nNEXT";
        for split in [1, 2, 3, 7, body.len()] {
            let (data, rest) = decode_all(body, split).unwrap();
            assert_eq!(data, b"hello 0123456789", "split {split}");
            if split == body.len() {
                assert_eq!(rest, b"NEXT");
            }
        }
        for bad in [&b"zz\r\n"[..], b"5\r\nhelloXY", b"10000000000000000\r\n"] {
            assert!(
                decode_all(bad, 64).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Whether `input` is refused as a chunked body, however it is split (and not just left
    /// unfinished).
    fn refused(input: &[u8]) -> bool {
        [1, 3, input.len()].into_iter().all(
            |split| matches!(decode_all(input, split), Err(H1Error::Invalid(m)) if m != "no end"),
        )
    }

    fn accepted(input: &[u8]) -> Vec<u8> {
        decode_all(input, input.len()).unwrap().0
    }

    #[test]
    fn chunk_size_line_with_bare_lf_is_refused() {
        for bad in [
            // httparse's chunk-size parser took an LF inside an extension as part of it: here
            // "3;a\nxyz" was one line and "abc" the data.
            &b"3;a\nxyz\r\nabc\r\n0\r\n\r\n"[..],
            b"3\nabc\r\n0\r\n\r\n",
            b"3 \nabc\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\n\r\n",
        ] {
            assert!(refused(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn chunk_data_ending_in_bare_lf_is_refused() {
        assert!(refused(b"3\r\nabc\n0\r\n\r\n"));
        assert!(refused(b"3\r\nabcX\r\n0\r\n\r\n"));
        assert_eq!(accepted(b"3\r\nabc\r\n0\r\n\r\n"), b"abc");
    }

    #[test]
    fn a_long_chunk_line_is_refused_whether_it_arrives_whole_or_in_pieces() {
        for line in [
            format!("0\r\nX-T: {}\r\n\r\n", "e".repeat(MAX_LINE)),
            format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(MAX_LINE)),
        ] {
            let mut whole = BytesMut::from(line.as_bytes());
            let mut state = Chunk::Size;
            let refused = loop {
                match decode_chunk(&mut whole, &mut state) {
                    Ok(Decoded::Data(_)) => continue,
                    Ok(_) => break false,
                    Err(_) => break true,
                }
            };
            assert!(refused, "{} bytes in one read", line.len());
        }
    }

    #[test]
    fn trailer_with_bare_lf_is_refused() {
        for bad in [
            &b"3\r\nabc\r\n0\r\nx-t: 1\n\r\n"[..],
            b"3\r\nabc\r\n0\r\n\n",
            b"3\r\nabc\r\n0\r\nx-t: 1\r\n\n",
            // Nor a CR or another control character inside, obsolete folding, or a line that is
            // not a field.
            b"3\r\nabc\r\n0\r\nx-t: 1\r2\r\n\r\n",
            b"3\r\nabc\r\n0\r\nx-t: \x001\r\n\r\n",
            b"3\r\nabc\r\n0\r\nx-t: 1\r\n 2\r\n\r\n",
            b"3\r\nabc\r\n0\r\nnot a field\r\n\r\n",
            b"3\r\nabc\r\n0\r\n: 1\r\n\r\n",
        ] {
            assert!(refused(bad), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            accepted(b"3\r\nabc\r\n0\r\nX-T: 1\t2 \x80\r\nx-u:\r\n\r\n"),
            b"abc"
        );
    }

    #[test]
    fn chunk_extensions_with_a_bare_cr_or_control_characters_are_refused() {
        for bad in [
            &b"3;a\rb\r\nabc\r\n0\r\n\r\n"[..],
            b"3;a=\x00\r\nabc\r\n0\r\n\r\n",
            b"3;a=\x1b[2J\r\nabc\r\n0\r\n\r\n",
            b"3;a=\x7f\r\nabc\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0;a\x0bb\r\n\r\n",
            b"3 4\r\nabc\r\n0\r\n\r\n",
            b";a\r\nabc\r\n0\r\n\r\n",
        ] {
            assert!(refused(bad), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            accepted(b"3 \t;a=\"q; \t\x80\" ;b\r\nabc\r\n0\r\n\r\n"),
            b"abc"
        );
    }

    #[test]
    fn chunk_size_overflow_is_refused() {
        assert!(refused(b"10000000000000000\r\n"));
        assert!(refused(b"fffffffffffffffff\r\n"));
        // Sixteen digits fit; leading zeros are no overflow.
        let mut buf = BytesMut::from(&b"ffffffffffffffff\r\nab"[..]);
        let mut state = Chunk::Size;
        assert!(matches!(
            decode_chunk(&mut buf, &mut state),
            Ok(Decoded::Data(_))
        ));
        assert_eq!(state, Chunk::Data(u64::MAX - 2));
        assert_eq!(
            accepted(b"000000000000000000000003\r\nabc\r\n0\r\n\r\n"),
            b"abc"
        );
    }

    #[test]
    fn response_head_with_bare_lf_is_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\ncontent-length: 0\n\n"[..],
            b"HTTP/1.1 200 OK\r\nx-a: 1\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\n",
            b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 204 No Content\n\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(
                matches!(
                    parse_head(&mut buf, &mut Vec::new(), false),
                    Err(H1Error::Invalid(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A CR elsewhere than before an LF is httparse's to refuse.
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-a: 1\r2\r\n\r\n"[..]);
        assert!(parse_head(&mut buf, &mut Vec::new(), false).is_err());
    }

    #[test]
    fn response_head_with_obs_fold_is_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nx-a: 1\r\n 2\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\t2\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n x-a: 1\r\ncontent-length: 0\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(
                parse_head(&mut buf, &mut Vec::new(), false).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn transfer_encoding_on_http10_is_not_reused() {
        let h = head(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(!h.reusable);
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert!(h.reusable, "on HTTP/1.1 it is");
    }

    /// A request body that says it has `claims` bytes and has `data`.
    struct Lying {
        data: Option<Bytes>,
        claims: u64,
    }

    impl Body for Lying {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.claims)
        }
    }

    /// Where a connection would go back to: counts the times it did.
    struct Back(Arc<AtomicUsize>);

    impl Checkin for Back {
        fn checkin(self, _: H1Conn) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// POSTs a body of `data` that claims `claims` bytes to an upstream that answers as soon as
    /// it has the head; what the exchange gave, and how many bytes the upstream got after the
    /// head before latchkey let go of the connection.
    async fn post_lying(data: &'static [u8], claims: u64) -> (Result<(), H1Error>, usize, usize) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            let mut answered = false;
            loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&chunk[..n]);
                if !answered && got.windows(4).any(|w| w == b"\r\n\r\n") {
                    answered = true;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
            }
            let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            got.len() - end
        });
        let io = MaybeTls::Plain(tokio::net::TcpStream::connect(addr).await.unwrap());
        let mut conn = H1Conn::new(io, Duration::from_secs(60));
        let body = http_body_util::BodyExt::boxed_unsync(Lying {
            data: Some(Bytes::from_static(data)),
            claims,
        });
        let req = http::Request::post("http://up/x").body(()).unwrap();
        let framing = RequestFraming::of(req.method(), &body);
        assert_eq!(framing, RequestFraming::Length(claims));
        let head = encode_head(&req.into_parts().0, "up", framing);
        let mut pump = Pump::new(body, framing);
        let back = Arc::new(AtomicUsize::new(0));
        let deadline = Deadline::after(Instant::now(), Duration::from_secs(60));
        let exchanged = conn
            .exchange(&head, &mut pump, false, false, deadline)
            .await;
        let result = match exchanged {
            Ok(head) => {
                drop(H1Body::new(conn, &head, pump, Back(back.clone())));
                Ok(())
            }
            Err(f) => {
                drop(conn);
                Err(f.error)
            }
        };
        (result, back.load(Ordering::SeqCst), upstream.await.unwrap())
    }

    #[tokio::test]
    async fn request_body_shorter_than_content_length_fails_and_is_not_reused() {
        let (result, reused, sent) = post_lying(b"four", 10).await;
        assert!(
            matches!(result, Err(H1Error::RequestLength(_))),
            "{result:?}"
        );
        assert_eq!(reused, 0, "the connection went back to the pool");
        assert_eq!(sent, 4);
    }

    #[tokio::test]
    async fn request_body_longer_than_content_length_fails_and_is_not_reused() {
        let (result, reused, sent) = post_lying(b"four plus six", 4).await;
        assert!(
            matches!(result, Err(H1Error::RequestLength(_))),
            "{result:?}"
        );
        assert_eq!(reused, 0, "the connection went back to the pool");
        assert_eq!(sent, 0, "bytes past the length reached the upstream");
    }

    /// Takes a connection back for the next exchange.
    struct Keep(Arc<std::sync::Mutex<Option<H1Conn>>>);

    impl Checkin for Keep {
        fn checkin(self, conn: H1Conn) {
            *self.0.lock().unwrap() = Some(conn);
        }
    }

    /// The request timeout's timer is the connection's and stays armed between exchanges: an
    /// exchange whose answer does not come fails with `NoAnswer` once its own deadline has
    /// passed, not at the earlier deadline of the exchange before it on the same connection
    /// (where the timer was left), and an answered exchange is not cut by it.
    #[tokio::test]
    async fn request_timeout_counts_from_each_exchange_on_a_reused_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Answers the first request at once, the second after `late`, never the third.
        let late = Duration::from_millis(300);
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let (mut got, mut chunk, mut heads) = (Vec::new(), [0u8; 1024], 0);
            loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return heads;
                }
                got.extend_from_slice(&chunk[..n]);
                while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    got.drain(..end + 4);
                    heads += 1;
                    if heads == 2 {
                        tokio::time::sleep(late).await;
                    }
                    if heads <= 2 {
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await
                            .unwrap();
                    }
                }
            }
        });
        let io = MaybeTls::Plain(tokio::net::TcpStream::connect(addr).await.unwrap());
        let kept = Arc::new(std::sync::Mutex::new(Some(H1Conn::new(
            io,
            Duration::from_secs(60),
        ))));
        let head = encode_head(
            &http::Request::get("http://up/x")
                .body(())
                .unwrap()
                .into_parts()
                .0,
            "up",
            RequestFraming::None,
        );
        let within = Duration::from_millis(200);
        let exchange = |deadline: Deadline| {
            let mut conn = kept
                .lock()
                .unwrap()
                .take()
                .expect("the connection came back");
            let head = head.clone();
            let kept = kept.clone();
            async move {
                let mut pump = Pump::new(crate::body::empty(), RequestFraming::None);
                let answer = conn.exchange(&head, &mut pump, false, true, deadline).await;
                answer.map(|h| drop(H1Body::new(conn, &h, pump, Keep(kept))))
            }
        };

        // Answered at once: the timer is armed at this deadline and left so.
        let first = Deadline::after(Instant::now(), within);
        assert!(exchange(first).await.is_ok());
        // Answered after 300 ms, with a deadline 500 ms away: the timer fires at the first
        // deadline meanwhile, is moved, and the answer is taken.
        let second = Deadline::after(Instant::now(), late + within);
        assert!(exchange(second).await.is_ok());
        assert!(
            Instant::now() > first.at,
            "the second answer came before the first deadline"
        );
        // Never answered: cut at its own deadline, not before.
        let third = Deadline::after(Instant::now(), within);
        let cut = tokio::time::timeout(Duration::from_secs(30), exchange(third)).await;
        match cut.expect("the exchange was never cut") {
            Err(Failure {
                error: H1Error::NoAnswer(d),
                retryable: false,
            }) => assert_eq!(d, within),
            Err(f) => panic!("{}", f.error),
            Ok(()) => panic!("an answer came that was never sent"),
        }
        assert!(Instant::now() >= third.at, "cut before its deadline");
        drop(kept.lock().unwrap().take());
        assert_eq!(upstream.await.unwrap(), 3);
    }

    /// A small deterministic generator, so that a failure can be replayed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn mangled_answers_are_refused_or_parsed_never_a_panic() {
        let valid: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: keep-alive, x-a\r\nx-a: 1\r\n\r\nok\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nt: 1\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 00007\r\ncontent-length: 7\r\n\r\n",
        ];
        let alphabet = b"\r\n:;, 0123456789abcdefABCDEF\x00\x7f\xffHTP/.-chunked";
        let mut rng = Rng(0x5eed_1a7c_4e11_0001);
        for round in 0..20_000 {
            let mut bytes = valid[round % valid.len()].to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(bytes.len() + 1);
                match rng.below(3) {
                    0 if at < bytes.len() => bytes[at] = alphabet[rng.below(alphabet.len())],
                    1 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, alphabet[rng.below(alphabet.len())]),
                }
            }
            let cut = rng.below(bytes.len() + 1);
            let mut buf = BytesMut::from(&bytes[..cut]);
            let mut spans = Vec::new();
            if let Ok(Some(head)) = parse_head(&mut buf, &mut spans, round % 5 == 0) {
                // What was taken as heads has no line end but CRLF.
                let taken = &bytes[..cut - buf.len()];
                for (i, b) in taken.iter().enumerate() {
                    assert!(
                        *b != b'\n' || (i > 0 && taken[i - 1] == b'\r'),
                        "{}",
                        String::from_utf8_lossy(taken)
                    );
                }
                if let Framing::Chunked(mut state) = head.framing {
                    while let Ok(Decoded::Data(_)) = decode_chunk(&mut buf, &mut state) {}
                }
            }
        }
    }

    #[test]
    fn request_heads_carry_host_first_and_latchkeys_framing() {
        let req = http::Request::builder()
            .method("POST")
            .uri("https://api.example.com/v1/x?y=1")
            .header("host", "wrong")
            .header("content-length", "999")
            .header("authorization", "Bearer k")
            .header("x-a", "1")
            .header("x-a", "2")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let head = encode_head(&parts, "api.example.com", RequestFraming::Length(4));
        // Sized up front: a buffer that had to grow would have about twice the room.
        assert!(
            head.capacity() - head.len() <= 80,
            "{} of {}",
            head.len(),
            head.capacity()
        );
        assert_eq!(
            String::from_utf8(head.to_vec()).unwrap(),
            "POST /v1/x?y=1 HTTP/1.1\r\nhost: api.example.com\r\nauthorization: Bearer k\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 4\r\n\r\n"
        );
        let head = encode_head(&parts, "h", RequestFraming::Chunked);
        assert!(String::from_utf8(head.to_vec())
            .unwrap()
            .ends_with("transfer-encoding: chunked\r\n\r\n"));
    }
}
