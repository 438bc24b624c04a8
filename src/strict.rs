//! Strict HTTP/1.1 framing of what clients send (issue 10), checked before hyper sees a byte.
//!
//! hyper, as latchkey runs it, takes a bare LF as a line end, control characters in a chunk
//! extension, two equal `Content-Length` headers, `Content-Length` beside `Transfer-Encoding`,
//! and `Transfer-Encoding: gzip, chunked`. A proxy that passes on a request its upstream might
//! frame differently invites request smuggling, so latchkey refuses these itself:
//!
//! - a head: every line ends in CRLF (no bare LF, no bare CR), no line starts with SP or HT
//!   (obs-fold), then what `httparse` checks (tokens, no control characters in values, no
//!   whitespace before a colon), at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields;
//! - the framing: at most one `Host`; a body by one `Content-Length` of digits, or by
//!   `Transfer-Encoding: chunked` alone (HTTP/1.1 only), never both;
//! - a chunked body: `size [ws] [;extension] CRLF`, the extension free of control characters,
//!   each chunk's data followed by CRLF, trailer fields held to the head's rules.
//!
//! [`Framer`] is the pure state machine (bytes in, a verdict out; [`check`] runs it over a
//! whole input, for tests and a fuzz target). [`Strict`] wraps a client connection's reader and
//! runs it on everything read: a head is held back until it is whole and checked, so hyper never
//! sees any of a refused head; body bytes pass as they are checked. A refused head is replaced by
//! a stand-in request that the service answers with `400 bad_request` ([`Link::refused`]), after
//! the answers to the requests before it, and the connection then ends. A violation inside a
//! body whose head has already been handed on fails the body (an I/O error), which hyper turns
//! into latchkey's `400`; the upstream has then had the head and part of the body, but never a
//! whole request. The head's own read time is bounded by `proxy.header_read_timeout`, counted
//! from the read that brought its first byte.
//!
//! After a request that asks for an upgrade (`CONNECT`, or `Upgrade` in HTTP/1.1) nothing more
//! is handed on until the service has answered it ([`Link::answered`]): switched (a tunnel, a
//! WebSocket), the bytes that follow are not HTTP/1 and pass unchecked; refused, they are
//! checked as requests. An h2 connection (its preface first) passes unchecked: hyper's h2 has
//! no line framing to play with.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The largest request head (or trailer section) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a head (hyper's own limit).
pub const MAX_HEADERS: usize = 100;
/// The longest chunk-size line, extensions included.
pub const MAX_CHUNK_LINE: usize = 4096;
/// The most bytes a chunked body's trailer section may have, from its first byte to the LF of
/// the empty line that ends it: one less than hyper's `TRAILER_LIMIT` (its server refuses the
/// byte that reaches 16 KiB).
const MAX_TRAILERS: usize = 16 * 1024 - 1;
/// The most chunk-extension bytes (those after each `;`) a chunked body may have over all its
/// chunks: one less than hyper's `CHUNKED_EXTENSIONS_LIMIT`, as for trailers.
const MAX_EXTENSIONS: u64 = 16 * 1024 - 1;
/// What an h2 connection opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The path of the stand-in request that takes a refused head's place.
pub const STAND_IN_PATH: &str = "/.latchkey/refused";
/// The stand-in request itself.
const STAND_IN: &[u8] =
    b"GET /.latchkey/refused HTTP/1.1\r\nHost: latchkey\r\nConnection: close\r\n\r\n";
/// The most empty lines taken before a request line (RFC 9112 2.2 asks for at least one).
const MAX_BLANK_LINES: usize = 8;
/// How much of what follows a refused head is read and dropped.
const MAX_DRAIN: usize = 64 * 1024;
/// How much more room a held head gets per read.
const READ_CHUNK: usize = 8 * 1024;

/// Why a request was refused; the reason is latchkey's own text, never the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    /// The refused request's head was handed on in an earlier step: the request is under way,
    /// and the body must fail. Otherwise none of the request was handed on.
    pub in_body: bool,
}

/// Why a [`Step`] stopped short of the end of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The rest is an incomplete head: hold it, and step again with it and more after it.
    More,
    /// A request asked for an upgrade: hold the rest until [`Framer::decided`].
    Decide,
    /// The rest breaks the rules; nothing of it may be handed on.
    Refused(Refusal),
}

/// What one [`Framer::step`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// How many bytes at the front of the input are checked and may be handed on.
    pub passed: usize,
    pub stop: Option<Stop>,
}

/// What [`check`] found in a whole input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Request heads that passed.
    pub heads: usize,
    /// Bytes that may be handed on.
    pub passed: usize,
    /// `None` when every byte passed (the last request may be unfinished in its body); else why
    /// not (`More`: an unfinished head; an upgrade is taken as refused and checking goes on).
    pub stop: Option<Stop>,
}

/// Checks a whole input as a client's side of one HTTP/1 connection: the pure entry point for
/// tests and fuzzing. Upgrades are taken as refused, so everything is checked as requests.
pub fn check(input: &[u8]) -> Verdict {
    let mut framer = Framer::new();
    let mut passed = 0;
    loop {
        let rest = input.get(passed..).unwrap_or_default();
        let step = framer.step(rest);
        passed += step.passed;
        match step.stop {
            Some(Stop::Decide) => framer.decided(false),
            stop => {
                return Verdict {
                    heads: framer.heads,
                    passed,
                    stop,
                }
            }
        }
    }
}

/// The state machine of one client connection's requests, fed the bytes as they come.
#[derive(Debug)]
pub struct Framer {
    state: State,
    /// No request yet: an h2 preface may come.
    first: bool,
    /// In an incomplete head: how far it has been scanned, and where its current line starts.
    scanned: usize,
    line_start: usize,
    /// The current request asked for an upgrade.
    upgrade: bool,
    /// Chunk-extension bytes of the current chunked body so far.
    extensions: u64,
    /// Empty lines before the current request line.
    blank_lines: usize,
    heads: usize,
    /// Bytes passed by earlier steps: where the next step's input starts in the stream.
    offset: u64,
    /// Shapes are kept ([`Strict::keep_shapes`]).
    keeping: bool,
    /// Where the parts of the last head passed are, for the server behind (see [`Shapes`]).
    shapes: Shapes,
}

/// Where the parts of a request head are, as `httparse` found them when [`Framer`] checked it
/// (offsets from the head's first byte, after any empty lines before it). latchkey's own
/// server builds its request from this rather than parsing the same bytes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShape {
    /// The whole head, its closing empty line included.
    pub len: usize,
    pub method: (usize, usize),
    pub path: (usize, usize),
    /// `HTTP/1.1` (else `HTTP/1.0`).
    pub http11: bool,
}

/// The shape of the last head passed, when shapes are kept ([`Strict::keep_shapes`]): the
/// stream offset of its first byte, and its headers' `[name start, name end, value start,
/// value end]` in `spans`. Only the last: of heads passed together (pipelined), the earlier
/// ones find no shape and are parsed again by the server, and a connection holds no more than
/// one head's spans (none once they are let go between busy spells).
#[derive(Debug, Default)]
struct Shapes {
    head: Option<(u64, HeadShape)>,
    spans: Vec<[u32; 4]>,
}

impl Shapes {
    /// Forgets a shape of a head that starts at or after `offset` (it was not passed).
    fn forget_from(&mut self, offset: u64) {
        if self.head.is_some_and(|(at, _)| at >= offset) {
            self.head = None;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    /// Body bytes still to come, by `Content-Length`.
    Fixed(u64),
    ChunkSize(ChunkLine),
    ChunkData(u64),
    /// After a chunk's data: `false` for the CR, `true` for the LF.
    ChunkEnd(bool),
    Trailer(TrailerLine),
    Paused,
    /// Not HTTP/1 any more (h2, or a switched protocol).
    Opaque,
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChunkLine {
    size: u64,
    digits: bool,
    phase: ChunkPhase,
    len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkPhase {
    Size,
    /// Whitespace after the size: `;` or the line end must follow.
    Space,
    Extension,
    Lf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TrailerLine {
    phase: TrailerPhase,
    len: usize,
    /// Fields begun so far: no more than a head may have.
    fields: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrailerPhase {
    LineStart,
    Name,
    Value,
    Lf,
    /// The CR of the empty line that ends the trailers has come.
    EndLf,
}

/// How a checked head says its body ends, and whether it asks for an upgrade.
struct Framing {
    body: Body,
    upgrade: bool,
}

enum Body {
    None,
    Fixed(u64),
    Chunked,
}

impl Default for Framer {
    fn default() -> Self {
        Framer::new()
    }
}

impl Framer {
    pub fn new() -> Framer {
        Framer {
            state: State::Head,
            first: true,
            scanned: 0,
            line_start: 0,
            upgrade: false,
            extensions: 0,
            blank_lines: 0,
            heads: 0,
            offset: 0,
            keeping: false,
            shapes: Shapes::default(),
        }
    }

    /// Checks `data`, which starts where the previous step's `passed` ended (after
    /// [`Stop::More`], with the same bytes as then at its front).
    pub fn step(&mut self, data: &[u8]) -> Step {
        let step = self.step_within(data);
        if let Some(Stop::Refused(_)) = step.stop {
            // A head passed in this step whose body was refused in it is not passed after all.
            self.shapes.forget_from(self.offset + step.passed as u64);
        }
        self.offset += step.passed as u64;
        step
    }

    fn step_within(&mut self, data: &[u8]) -> Step {
        let mut at = 0;
        // Where the current request's head began, if it did in this step.
        let mut head_at = None;
        loop {
            let rest = data.get(at..).unwrap_or_default();
            match self.state {
                State::Paused => return step(at, Some(Stop::Decide)),
                State::Opaque => return step(data.len(), None),
                State::Refused(r) => return step(at, Some(Stop::Refused(r))),
                _ if rest.is_empty() => return step(at, None),
                State::Head => match self.head(rest, self.offset + at as u64) {
                    HeadScan::Skip(n) => at += n,
                    HeadScan::More => return step(at, Some(Stop::More)),
                    HeadScan::Opaque => {
                        self.state = State::Opaque;
                        return step(data.len(), None);
                    }
                    HeadScan::Bad(reason) => return self.refuse(at, None, reason),
                    HeadScan::Done(len, framing) => {
                        head_at = Some(at);
                        at += len;
                        self.heads += 1;
                        self.first = false;
                        self.upgrade = framing.upgrade;
                        self.state = match framing.body {
                            Body::None => self.message_end(),
                            Body::Fixed(n) => State::Fixed(n),
                            Body::Chunked => {
                                self.extensions = 0;
                                State::ChunkSize(ChunkLine::new())
                            }
                        };
                    }
                },
                State::Fixed(left) | State::ChunkData(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    at += n;
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Fixed(_), 0) => self.message_end(),
                        (State::Fixed(_), _) => State::Fixed(left),
                        (_, 0) => State::ChunkEnd(false),
                        _ => State::ChunkData(left),
                    };
                }
                State::ChunkEnd(lf) => {
                    let want = if lf { b'\n' } else { b'\r' };
                    if rest[0] != want {
                        return self.refuse(at, head_at, "a chunk's data is not followed by CRLF");
                    }
                    at += 1;
                    self.state = if lf {
                        State::ChunkSize(ChunkLine::new())
                    } else {
                        State::ChunkEnd(true)
                    };
                }
                State::ChunkSize(mut line) => {
                    for &b in rest {
                        match line.byte(b, &mut self.extensions) {
                            Err(reason) => return self.refuse(at, head_at, reason),
                            Ok(None) => at += 1,
                            Ok(Some(size)) => {
                                at += 1;
                                self.state = if size == 0 {
                                    State::Trailer(TrailerLine::new())
                                } else {
                                    State::ChunkData(size)
                                };
                                break;
                            }
                        }
                    }
                    if let State::ChunkSize(_) = self.state {
                        self.state = State::ChunkSize(line);
                    }
                }
                State::Trailer(mut line) => {
                    for &b in rest {
                        match line.byte(b) {
                            Err(reason) => return self.refuse(at, head_at, reason),
                            Ok(false) => at += 1,
                            Ok(true) => {
                                at += 1;
                                self.state = self.message_end();
                                break;
                            }
                        }
                    }
                    if let State::Trailer(_) = self.state {
                        self.state = State::Trailer(line);
                    }
                }
            }
        }
    }

    /// The upgrade that [`Stop::Decide`] waited for happened (the bytes that follow are not
    /// HTTP/1), or did not (they are requests).
    pub fn decided(&mut self, upgraded: bool) {
        if self.state == State::Paused {
            self.state = if upgraded { State::Opaque } else { State::Head };
        }
    }

    /// The connection is not HTTP/1 (any more): everything passes.
    pub fn is_opaque(&self) -> bool {
        self.state == State::Opaque
    }

    fn message_end(&self) -> State {
        if self.upgrade {
            State::Paused
        } else {
            State::Head
        }
    }

    /// Refuses the request at `at`; `head_at` is where its head began if that was in this step
    /// (then none of it is handed on, body and all).
    fn refuse(&mut self, at: usize, head_at: Option<usize>, reason: &'static str) -> Step {
        let in_body = !matches!(self.state, State::Head) && head_at.is_none();
        let refusal = Refusal { reason, in_body };
        self.state = State::Refused(refusal);
        step(head_at.unwrap_or(at), Some(Stop::Refused(refusal)))
    }

    /// Looks for a whole head at the front of `d` (leading CRLFs are passed on their own);
    /// `offset` is where `d` starts in the stream.
    fn head(&mut self, d: &[u8], offset: u64) -> HeadScan {
        if self.scanned == 0 {
            // RFC 9112 2.2: empty lines before a request line are ignored (hyper skips them).
            if d.starts_with(b"\r\n") {
                self.blank_lines += 1;
                if self.blank_lines > MAX_BLANK_LINES {
                    return HeadScan::Bad("too many empty lines before the request line");
                }
                return HeadScan::Skip(2);
            }
            if d == b"\r" {
                return HeadScan::More;
            }
            if self.first {
                let n = d.len().min(H2_PREFACE.len());
                if d.get(..n) == H2_PREFACE.get(..n) {
                    return if n == H2_PREFACE.len() {
                        HeadScan::Opaque
                    } else {
                        HeadScan::More
                    };
                }
            }
        }
        let mut from = self.scanned;
        loop {
            let Some(off) = memchr::memchr2(b'\r', b'\n', d.get(from..).unwrap_or_default()) else {
                self.scanned = d.len();
                break;
            };
            let cr = from + off;
            if d[cr] == b'\n' {
                return HeadScan::Bad("a line of the request head ends in a bare LF");
            }
            match d.get(cr + 1) {
                None => {
                    self.scanned = cr;
                    break;
                }
                Some(b'\n') => {}
                Some(_) => return HeadScan::Bad("the request head holds a bare CR"),
            }
            let line = d.get(self.line_start..cr).unwrap_or_default();
            let end = cr + 2;
            if line.is_empty() {
                if end > MAX_HEAD {
                    return HeadScan::Bad("the request head is larger than 64 KiB");
                }
                let head = d.get(..end).unwrap_or_default();
                self.scanned = 0;
                self.line_start = 0;
                self.blank_lines = 0;
                let shapes = self.keeping.then_some((&mut self.shapes, offset));
                return match parse_head(head, shapes) {
                    Ok(framing) => HeadScan::Done(end, framing),
                    Err(reason) => HeadScan::Bad(reason),
                };
            }
            if self.line_start > 0 && matches!(line[0], b' ' | b'\t') {
                return HeadScan::Bad("the request head holds a folded line (obs-fold)");
            }
            self.line_start = end;
            from = end;
        }
        if d.len() > MAX_HEAD {
            return HeadScan::Bad("the request head is larger than 64 KiB");
        }
        HeadScan::More
    }
}

fn step(passed: usize, stop: Option<Stop>) -> Step {
    Step { passed, stop }
}

enum HeadScan {
    /// Bytes to pass before the head (an empty line).
    Skip(usize),
    More,
    Opaque,
    Bad(&'static str),
    Done(usize, Framing),
}

/// Parses a whole head (its lines already checked) with httparse, and checks its framing; a
/// head that passes has its shape kept in `shapes`, if given, as starting at the offset given.
fn parse_head(head: &[u8], shapes: Option<(&mut Shapes, u64)>) -> Result<Framing, &'static str> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        head,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => return Err("the request head is malformed"),
        Err(e) => {
            return Err(match e {
                httparse::Error::HeaderName => {
                    "a header name is not a token (whitespace before the colon?)"
                }
                httparse::Error::HeaderValue => "a header value holds a control character",
                httparse::Error::NewLine => "the request head has a malformed line end",
                httparse::Error::TooManyHeaders => "the request head has more than 100 fields",
                httparse::Error::Version => "the HTTP version is not HTTP/1.0 or HTTP/1.1",
                httparse::Error::Token | httparse::Error::Status => "the request line is malformed",
            })
        }
    }
    // hyper's server answers a request target that is not a URI with a bare 400 of its own;
    // refused here, it gets latchkey's. (latchkey's own server, which keeps shapes, parses
    // the target itself and answers it: no second parse there, but for a CONNECT, which it
    // hands to hyper.)
    if shapes.is_none() || req.method == Some("CONNECT") {
        let target = req.path.unwrap_or_default();
        if http::Uri::try_from(target).is_err() {
            return Err("the request target is not a valid URI");
        }
    }
    let http11 = req.version == Some(1);
    let (mut lengths, mut length) = (0, 0u64);
    let (mut codings, mut chunked) = (0, false);
    let (mut hosts, mut upgrade) = (0, false);
    for field in req.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            length = digits(field.value)
                .ok_or("Content-Length is not a number of bytes (digits only)")?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings += 1;
            chunked = field.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    if hosts > 1 {
        return Err("the request has more than one Host header");
    }
    if lengths > 1 {
        return Err("the request has more than one Content-Length header");
    }
    let body = match (codings, lengths) {
        (0, 0) => Body::None,
        (0, _) if length == 0 => Body::None,
        (0, _) => Body::Fixed(length),
        (_, 0) if codings > 1 || !chunked => {
            return Err("a Transfer-Encoding other than chunked alone (one header, one coding)")
        }
        (_, 0) if !http11 => return Err("Transfer-Encoding in an HTTP/1.0 request"),
        (_, 0) => Body::Chunked,
        _ => return Err("the request has both Content-Length and Transfer-Encoding"),
    };
    let connect = req.method == Some("CONNECT");
    if let Some((shapes, at)) = shapes {
        keep_shape(shapes, at, head, &req);
    }
    Ok(Framing {
        body,
        upgrade: connect || (http11 && upgrade),
    })
}

/// Keeps the shape of `head` (which httparse read into `req`), starting at stream offset `at`.
fn keep_shape(shapes: &mut Shapes, at: u64, head: &[u8], req: &httparse::Request<'_, '_>) {
    shapes.head = shape_of(head, head.len(), req, &mut shapes.spans).map(|shape| (at, shape));
}

/// The shape of the head of `len` bytes at the start of `head`, which httparse read into
/// `req`, with its headers' spans in `spans`. `None` if httparse gave no request line or an
/// offset does not fit in 32 bits (a head the strict check passed is at most 64 KiB).
pub(crate) fn shape_of(
    head: &[u8],
    len: usize,
    req: &httparse::Request<'_, '_>,
    spans: &mut Vec<[u32; 4]>,
) -> Option<HeadShape> {
    let base = head.as_ptr() as usize;
    let range = |part: &[u8]| {
        let start = (part.as_ptr() as usize).wrapping_sub(base);
        (start, start + part.len())
    };
    let span = |part: &[u8]| {
        let (start, end) = range(part);
        Some((u32::try_from(start).ok()?, u32::try_from(end).ok()?))
    };
    let (method, path) = (req.method?, req.path?);
    spans.clear();
    for field in req.headers.iter() {
        let (n0, n1) = span(field.name.as_bytes())?;
        let (v0, v1) = span(field.value)?;
        spans.push([n0, n1, v0, v1]);
    }
    Some(HeadShape {
        len,
        method: range(method.as_bytes()),
        path: range(path.as_bytes()),
        http11: req.version != Some(0),
    })
}

/// A `Content-Length` value: digits only (leading zeros as many as sent), no sign, no list, no
/// overflow.
pub(crate) fn digits(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))?
    })
}

impl ChunkLine {
    fn new() -> ChunkLine {
        ChunkLine {
            size: 0,
            digits: false,
            phase: ChunkPhase::Size,
            len: 0,
        }
    }

    /// Takes one byte of a chunk-size line: the size once the line is whole. `extensions`
    /// counts the body's extension bytes so far.
    fn byte(&mut self, b: u8, extensions: &mut u64) -> Result<Option<u64>, &'static str> {
        self.len += 1;
        if self.len > MAX_CHUNK_LINE {
            return Err("a chunk-size line is longer than 4 KiB");
        }
        match (self.phase, b) {
            (ChunkPhase::Lf, b'\n') => return Ok(Some(self.size)),
            (ChunkPhase::Lf, _) => return Err("a chunk-size line holds a bare CR"),
            (_, b'\n') => return Err("a chunk-size line ends in a bare LF"),
            (ChunkPhase::Size, _) if b.is_ascii_hexdigit() => {
                let digit = (b as char).to_digit(16).unwrap_or(0);
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(u64::from(digit)))
                    .ok_or("a chunk size is too large")?;
                self.digits = true;
            }
            (_, _) if !self.digits => return Err("a chunk-size line does not start with a size"),
            (ChunkPhase::Size | ChunkPhase::Space, b' ' | b'\t') => self.phase = ChunkPhase::Space,
            (ChunkPhase::Size | ChunkPhase::Space, b';') => self.phase = ChunkPhase::Extension,
            (ChunkPhase::Size | ChunkPhase::Space, b'\r') => self.phase = ChunkPhase::Lf,
            (ChunkPhase::Size | ChunkPhase::Space, _) => {
                return Err("a chunk-size line holds something other than a size and extensions")
            }
            (ChunkPhase::Extension, b'\r') => self.phase = ChunkPhase::Lf,
            (ChunkPhase::Extension, _) if is_ctl(b) && b != b'\t' => {
                return Err("a chunk extension holds a control character")
            }
            (ChunkPhase::Extension, _) => {
                *extensions += 1;
                if *extensions > MAX_EXTENSIONS {
                    return Err("a chunked body's extensions add up to more than 16 KiB");
                }
            }
        }
        Ok(None)
    }
}

impl TrailerLine {
    fn new() -> TrailerLine {
        TrailerLine {
            phase: TrailerPhase::LineStart,
            len: 0,
            fields: 0,
        }
    }

    /// Takes one byte of the trailer section (after the last chunk): true once it has ended.
    fn byte(&mut self, b: u8) -> Result<bool, &'static str> {
        self.len += 1;
        if self.len > MAX_TRAILERS {
            return Err("the chunked body's trailers are 16 KiB or more");
        }
        self.phase = match (self.phase, b) {
            (TrailerPhase::LineStart, b'\r') => TrailerPhase::EndLf,
            (TrailerPhase::EndLf, b'\n') => return Ok(true),
            (TrailerPhase::Lf, b'\n') => TrailerPhase::LineStart,
            (TrailerPhase::EndLf | TrailerPhase::Lf, _) => {
                return Err("a chunked body's trailer holds a bare CR")
            }
            (_, b'\n') => return Err("a chunked body's trailer ends in a bare LF"),
            (TrailerPhase::LineStart, b' ' | b'\t') => {
                return Err("a chunked body's trailer is folded (obs-fold)")
            }
            (TrailerPhase::LineStart, _) if is_tchar(b) => {
                self.fields += 1;
                if self.fields > MAX_HEADERS {
                    return Err("a chunked body's trailers have more than 100 fields");
                }
                TrailerPhase::Name
            }
            (TrailerPhase::Name, _) if is_tchar(b) => TrailerPhase::Name,
            (TrailerPhase::Name, b':') => TrailerPhase::Value,
            (TrailerPhase::LineStart | TrailerPhase::Name, _) => {
                return Err("a chunked body's trailer name is not a token")
            }
            (TrailerPhase::Value, b'\r') => TrailerPhase::Lf,
            (TrailerPhase::Value, _) if is_ctl(b) && b != b'\t' => {
                return Err("a chunked body's trailer value holds a control character")
            }
            (TrailerPhase::Value, _) => TrailerPhase::Value,
        };
        Ok(false)
    }
}

fn is_ctl(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// RFC 9110's `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What a connection's reader ([`Strict`]) and its service tell each other.
#[derive(Debug, Default)]
pub struct Link {
    /// Why a head was refused; the stand-in request is answered with it.
    refused: OnceLock<&'static str>,
    /// The service's answer to a request asking for an upgrade: 0 none yet, 1 switched,
    /// 2 not.
    decision: AtomicU8,
    waker: AtomicWaker,
}

impl Link {
    pub fn new() -> Arc<Link> {
        Arc::new(Link::default())
    }

    /// For the stand-in of a refused head (its path is [`STAND_IN_PATH`]): the reason.
    pub fn refused(&self, path: &str) -> Option<&'static str> {
        (path == STAND_IN_PATH)
            .then(|| self.refused.get().copied())
            .flatten()
    }

    /// The service answered a request that asked for an upgrade; `switched` when the
    /// connection now carries something else.
    pub fn answered(&self, switched: bool) {
        self.decision
            .store(if switched { 1 } else { 2 }, Ordering::Release);
        self.waker.wake();
    }

    fn take_decision(&self, cx: &mut Context<'_>) -> Option<bool> {
        let mut d = self.decision.swap(0, Ordering::Acquire);
        if d == 0 {
            self.waker.register(cx.waker());
            d = self.decision.swap(0, Ordering::Acquire);
        }
        match d {
            0 => None,
            d => Some(d == 1),
        }
    }
}

/// Whether a request asks for an upgrade, as [`Framer`] and hyper see it: `CONNECT`, or an
/// `Upgrade` header in HTTP/1.1.
pub fn asks_upgrade<B>(req: &http::Request<B>) -> bool {
    let v = req.version();
    (v == http::Version::HTTP_11 || v == http::Version::HTTP_10)
        && (req.method() == http::Method::CONNECT
            || (v == http::Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE)))
}

/// A client connection's stream, its reads checked by a [`Framer`] before they are handed on.
pub struct Strict<T> {
    inner: T,
    framer: Framer,
    link: Arc<Link>,
    /// Bytes read and not yet handed on: `held[..ready]` checked, the rest an incomplete head
    /// or what follows an upgrade not yet decided.
    held: BytesMut,
    ready: usize,
    paused: bool,
    refusal: Option<Refusal>,
    /// How much of the stand-in request has been handed on, and what was read and dropped
    /// after it.
    stand_in: usize,
    drained: usize,
    header_read: Duration,
    /// Armed while a head is incomplete.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The deadline is armed for the head after this many heads passed.
    armed: Option<usize>,
    /// Bytes handed to the reader so far (the stand-in's among them).
    handed: u64,
}

impl<T> Strict<T> {
    /// Checks what `inner` reads; a head must be whole within `header_read` of its first read.
    pub fn new(inner: T, link: Arc<Link>, header_read: Duration) -> Strict<T> {
        Strict {
            inner,
            framer: Framer::new(),
            link,
            held: BytesMut::new(),
            ready: 0,
            paused: false,
            refusal: None,
            stand_in: 0,
            drained: 0,
            header_read,
            deadline: None,
            armed: None,
            handed: 0,
        }
    }

    /// Keeps the shape of the last head passed from now on ([`Self::shape_at`]), or stops
    /// keeping it (and forgets it).
    pub fn keep_shapes(&mut self, on: bool) {
        self.framer.keeping = on;
        if !on {
            self.framer.shapes = Shapes::default();
        }
    }

    /// Gives back the room the kept shape took (none is needed between requests: call it when
    /// the reader holds nothing).
    pub fn release_shapes(&mut self) {
        self.framer.shapes = Shapes::default();
    }

    /// Bytes handed to the reader so far: the reader's unread bytes, `n` of them, start at
    /// `handed() - n`.
    pub fn handed(&self) -> u64 {
        self.handed
    }

    /// The shape of the head passed at stream offset `at`, with its headers' spans. `None` when
    /// no shape of a head there is kept (the stand-in of a refused head, an earlier one of
    /// heads passed together, or shapes are not kept).
    pub fn shape_at(&self, at: u64) -> Option<(HeadShape, &[[u32; 4]])> {
        let shapes = &self.framer.shapes;
        match shapes.head {
            Some((first, shape)) if first == at => Some((shape, &shapes.spans)),
            _ => None,
        }
    }

    /// Hands on what `inner` reads as it is (a connection that is not a client's).
    pub fn unchecked(inner: T) -> Strict<T> {
        let mut strict = Strict::new(inner, Link::new(), Duration::ZERO);
        strict.framer.state = State::Opaque;
        strict
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// What is read passes unchecked: the connection is not HTTP/1 (an h2 preface came first,
    /// or an upgrade switched it).
    pub fn is_opaque(&self) -> bool {
        self.framer.is_opaque()
    }

    /// Request heads handed on so far.
    pub fn heads(&self) -> usize {
        self.framer.heads
    }

    /// Between two HTTP/1 messages with nothing held back: every byte read has been handed on
    /// and the last request handed on is whole, body and all (so its reader has nothing left
    /// unread but whole requests). Then the room a held head took is given back.
    pub fn at_rest(&mut self) -> bool {
        let rest = self.framer.state == State::Head
            && self.framer.scanned == 0
            && self.held.is_empty()
            && self.ready == 0
            && !self.paused
            && self.refusal.is_none();
        if rest && self.held.capacity() > 0 {
            self.held = BytesMut::new();
        }
        rest
    }

    /// Takes note of what a step stopped at.
    fn stopped(&mut self, stop: Option<Stop>) {
        match stop {
            Some(Stop::More) => {
                // From the read that found this head unfinished (empty lines before it count).
                if self.armed != Some(self.framer.heads) {
                    let at = tokio::time::Instant::now() + self.header_read;
                    match &mut self.deadline {
                        Some(sleep) => sleep.as_mut().reset(at),
                        None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                    self.armed = Some(self.framer.heads);
                }
                return;
            }
            Some(Stop::Decide) => self.paused = true,
            Some(Stop::Refused(r)) => {
                if !r.in_body {
                    let _ = self.link.refused.set(r.reason);
                }
                self.refusal = Some(r);
            }
            None => {}
        }
        self.armed = None;
    }

    /// Whether the head being held has run out of time.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        self.armed.is_some()
            && self
                .deadline
                .as_mut()
                .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Strict<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = this.poll_checked(cx, buf);
        this.handed += buf.filled().len().saturating_sub(before) as u64;
        read
    }
}

impl<T: AsyncRead + Unpin> Strict<T> {
    fn poll_checked(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(this.held.get(..n).unwrap_or_default());
                this.held.advance(n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if let Some(refusal) = this.refusal {
                if refusal.in_body {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        refusal.reason,
                    )));
                }
                let rest = STAND_IN.get(this.stand_in..).unwrap_or_default();
                if !rest.is_empty() {
                    let n = rest.len().min(buf.remaining());
                    buf.put_slice(rest.get(..n).unwrap_or_default());
                    this.stand_in += n;
                    return Poll::Ready(Ok(()));
                }
                // Never the end of the stream after the stand-in: hyper drops a request whose
                // connection ends before it is answered. What the client still sends is read
                // and dropped (up to a bound), so that closing the connection does not reset it
                // before the client has read the answer.
                while this.drained < MAX_DRAIN {
                    let mut scratch = [0u8; 2048];
                    let mut sink = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut sink) {
                        Poll::Ready(Ok(())) if !sink.filled().is_empty() => {
                            this.drained += sink.filled().len();
                        }
                        _ => break,
                    }
                }
                return Poll::Pending;
            }
            if this.paused {
                let Some(switched) = this.link.take_decision(cx) else {
                    return Poll::Pending;
                };
                this.paused = false;
                this.framer.decided(switched);
                let step = this.framer.step(&this.held);
                this.ready = step.passed;
                this.stopped(step.stop);
                continue;
            }
            if this.held.is_empty() {
                if this.framer.is_opaque() {
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                // Straight into the caller's buffer; only what cannot pass yet is kept back.
                let before = buf.filled().len();
                match Pin::new(&mut this.inner).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {}
                    other => return other,
                }
                let read = buf.filled().get(before..).unwrap_or_default();
                if read.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let step = this.framer.step(read);
                if step.stop.is_none() {
                    return Poll::Ready(Ok(()));
                }
                if matches!(step.stop, Some(Stop::More | Stop::Decide)) {
                    this.held
                        .extend_from_slice(read.get(step.passed..).unwrap_or_default());
                }
                buf.set_filled(before + step.passed);
                this.stopped(step.stop);
                if step.passed > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // An incomplete head is held: read more after it.
            if this.held.capacity() - this.held.len() < READ_CHUNK {
                this.held.reserve(READ_CHUNK);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.held) {
                Poll::Pending => {
                    if this.timed_out(cx) {
                        return Poll::Ready(Err(header_timeout()));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // The client closed with a head unfinished: hyper sees the end of the stream.
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {
                    let step = this.framer.step(&this.held);
                    this.ready = step.passed;
                    if let Some(Stop::Refused(_)) = step.stop {
                        this.held.truncate(step.passed);
                    }
                    this.stopped(step.stop);
                    if this.timed_out(cx) {
                        return Poll::Ready(Err(header_timeout()));
                    }
                }
            }
        }
    }
}

fn header_timeout() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the request head was not whole within proxy.header_read_timeout",
    )
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Strict<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` `size` bytes at a time, as [`Strict`] does: what did not pass is fed
    /// again with the next piece.
    fn fed(input: &[u8], size: usize) -> Verdict {
        let mut framer = Framer::new();
        let mut passed = 0;
        let mut end = 0;
        loop {
            end = (end + size).min(input.len());
            let step = framer.step(&input[passed..end]);
            passed += step.passed;
            match step.stop {
                Some(Stop::Decide) => framer.decided(false),
                Some(Stop::Refused(_)) => {
                    return Verdict {
                        heads: framer.heads,
                        passed,
                        stop: step.stop,
                    }
                }
                _ if end == input.len() => {
                    // One more look at what is held, with nothing new.
                    let step = framer.step(&input[passed..]);
                    return Verdict {
                        heads: framer.heads,
                        passed: passed + step.passed,
                        stop: step.stop,
                    };
                }
                _ => {}
            }
        }
    }

    fn refused(input: &[u8]) -> &'static str {
        match check(input).stop {
            Some(Stop::Refused(r)) => r.reason,
            other => panic!(
                "{:?} was not refused: {other:?}",
                String::from_utf8_lossy(input)
            ),
        }
    }

    const GOOD: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\r\nGET /a?b=c HTTP/1.0\r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /n HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n5;a=b;c=\"d e\"\r\nhello\r\n0\r\nX-T: v\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n000a \t;x\r\n0123456789\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n",
    ];

    #[test]
    fn well_formed_requests_pass_however_they_are_split() {
        for input in GOOD {
            let whole = check(input);
            assert_eq!(whole.stop, None, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(whole.passed, input.len());
            for size in 1..=input.len() {
                assert_eq!(fed(input, size), whole, "size {size}: {input:?}");
            }
        }
    }

    #[test]
    fn what_hyper_let_through_is_refused() {
        for (input, says) in [
            (&b"GET / HTTP/1.1\nHost: x\n\n"[..], "bare LF"),
            (b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", "bare LF"),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\n", "bare LF"),
            (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", "bare CR"),
            (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", "obs-fold"),
            (b"GET / HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n", "obs-fold"),
            (b"GET / HTTP/1.1\r\nX: a\0b\r\n\r\n", "control character"),
            (b"GET / HTTP/1.1\r\nX : b\r\n\r\n", "header name"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
            (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", "Content-Length"),
            (b"POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\nx", "Content-Length"),
            (b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\nx", "Content-Length"),
            (b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", "Content-Length"),
            (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "chunked"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked"),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0"),
            (b"GET / HTTP/2.0\r\n\r\n", "version"),
            (b"GET  / HTTP/1.1\r\n\r\n", "request line"),
            (b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n", "empty lines"),
            // hyper would answer these with a bare 400 of its own.
            (b"GET /p< HTTP/1.1\r\n\r\n", "URI"),
            (b"GET http:// HTTP/1.1\r\n\r\n", "URI"),
            (b"GET http://[::1/ HTTP/1.1\r\n\r\n", "URI"),
            (b"CONNECT [::1:443 HTTP/1.1\r\n\r\n", "URI"),
        ] {
            let reason = refused(input);
            assert!(reason.contains(says), "{input:?}: {reason}");
        }
    }

    #[test]
    fn chunk_lines_are_strict() {
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for (body, says) in [
            (&b"3;e=\x01\r\nabc\r\n0\r\n\r\n"[..], "control character"),
            (b"3;\0\r\nabc\r\n0\r\n\r\n", "control character"),
            (b"3;\x7f\r\nabc\r\n0\r\n\r\n", "control character"),
            (b"3\nabc\r\n0\r\n\r\n", "bare LF"),
            (b"3;a\nabc\r\n0\r\n\r\n", "bare LF"),
            (b"3\rabc\r\n0\r\n\r\n", "bare CR"),
            (b"3 x\r\nabc\r\n0\r\n\r\n", "other than"),
            (b";a\r\nabc\r\n0\r\n\r\n", "start with a size"),
            (b"\r\n", "start with a size"),
            (b"11111111111111111\r\n", "too large"),
            (b"3\r\nabcX\r\n0\r\n\r\n", "CRLF"),
            (b"0\r\nX: a\r\n b\r\n\r\n", "obs-fold"),
            (b"0\r\nX: a\n\r\n", "bare LF"),
            (b"0\r\nX : a\r\n\r\n", "token"),
            (b"0\r\nX: a\x01\r\n\r\n", "control character"),
            (b"0\r\n\rX", "bare CR"),
        ] {
            let input = [&head[..], body].concat();
            let v = check(&input);
            let Some(Stop::Refused(r)) = v.stop else {
                panic!("{body:?} passed: {v:?}");
            };
            assert!(r.reason.contains(says), "{body:?}: {}", r.reason);
            // Its head came in the same input: none of the request passes.
            assert_eq!((v.passed, r.in_body), (0, false), "{body:?}");
            // Fed in pieces, the head passes before the bad line is seen: the body fails.
            let split = fed(&input, head.len());
            let Some(Stop::Refused(r)) = split.stop else {
                panic!("{body:?} passed when split: {split:?}");
            };
            assert!(r.in_body, "{body:?}");
            assert!(split.passed >= head.len(), "{body:?}");
        }
    }

    #[test]
    fn a_refused_request_after_good_ones_leaves_them_to_pass() {
        let good = b"GET /1 HTTP/1.1\r\n\r\n";
        let input = [&good[..], b"GET /2 HTTP/1.1\nX: y\n\n"].concat();
        let v = check(&input);
        assert_eq!(v.heads, 1);
        assert_eq!(v.passed, good.len());
        assert!(matches!(v.stop, Some(Stop::Refused(r)) if !r.in_body));
    }

    #[test]
    fn upgrades_wait_for_the_answer_and_h2_passes() {
        let mut f = Framer::new();
        let input = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
        let head = input.len() - 7;
        assert_eq!(f.step(input), step(head, Some(Stop::Decide)));
        assert_eq!(f.step(&input[head..]), step(0, Some(Stop::Decide)));
        f.decided(true);
        assert_eq!(f.step(&input[head..]), step(7, None));
        assert!(f.is_opaque());

        let mut f = Framer::new();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04";
        assert_eq!(f.step(&preface[..10]), step(0, Some(Stop::More)));
        assert_eq!(f.step(preface), step(preface.len(), None));
        // Not at the start of a connection: a request line like any other, and refused.
        assert!(matches!(
            check(b"GET / HTTP/1.1\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").stop,
            Some(Stop::Refused(_))
        ));
    }

    #[test]
    fn heads_are_bounded() {
        let mut input = b"GET / HTTP/1.1\r\nX: ".to_vec();
        input.resize(MAX_HEAD + 10, b'a');
        assert!(refused(&input).contains("64 KiB"));
        let mut f = Framer::new();
        // Scanning resumes where it stopped: a byte at a time costs no rescan.
        for n in 1..200 {
            assert_eq!(f.step(&input[..n]).stop, Some(Stop::More));
        }
        let mut fields = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            fields.extend_from_slice(format!("X-{i}: a\r\n").as_bytes());
        }
        fields.extend_from_slice(b"\r\n");
        assert!(refused(&fields).contains("100 fields"));
    }

    /// Found by the strict_request fuzz target: trailers are held to a head's field count too
    /// (hyper reads no request past it).
    #[test]
    fn trailers_are_held_to_100_fields() {
        let chunked = |n: usize| {
            let mut r =
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
            for i in 0..n {
                r.extend_from_slice(format!("T-{i}: a\r\n").as_bytes());
            }
            r.extend_from_slice(b"\r\n");
            r
        };
        let ok = chunked(MAX_HEADERS);
        assert_eq!(check(&ok).passed, ok.len());
        assert!(refused(&chunked(MAX_HEADERS + 1)).contains("more than 100 fields"));
    }

    /// Every prefix and every byte value at every position of a chunked request: no panic, and
    /// the verdict of the whole input is the verdict of the same input fed in pieces.
    #[test]
    fn mangled_inputs_never_panic_and_splitting_changes_nothing() {
        let base = GOOD[3];
        for i in 0..base.len() {
            for b in [0u8, b'\r', b'\n', b' ', b';', b':', b'0', b'f', 0x7f, 0xff] {
                let mut input = base.to_vec();
                input[i] = b;
                let whole = check(&input);
                for size in [1, 2, 7] {
                    let split = fed(&input, size);
                    match (whole.stop, split.stop) {
                        // Split, a refusal may find its head already passed.
                        (Some(Stop::Refused(a)), Some(Stop::Refused(b))) => {
                            assert_eq!(a.reason, b.reason, "{input:?}");
                            assert!(split.passed >= whole.passed);
                        }
                        _ => assert_eq!(split, whole, "{input:?} by {size}"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod wrapper_tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Reads what a `Strict` over `input` hands on, `size` bytes at a time, until it ends or
    /// has nothing more to give.
    async fn handed_on(input: &'static [u8], size: usize) -> Vec<u8> {
        let mut strict = Strict::new(input, Link::new(), Duration::from_secs(5));
        let mut out = Vec::new();
        let mut buf = vec![0u8; size];
        loop {
            let read = tokio::time::timeout(Duration::from_millis(50), strict.read(&mut buf));
            match read.await {
                Ok(Ok(0)) | Err(_) => return out,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("{e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_refused_head_becomes_the_stand_in_after_the_requests_before_it() {
        let good: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        for size in [1, 5, 24, 4096] {
            let out = handed_on(
                b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\nHost: x\n\n",
                size,
            )
            .await;
            assert_eq!(out, [good, STAND_IN].concat(), "by {size}");
        }
        let out = handed_on(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", 7).await;
        assert_eq!(out, good);
    }
}
