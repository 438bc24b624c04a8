//! Response scrubbing: the credential does not come back to the client (PRODUCT.md section 4,
//! step 7, and section 10, property 8).
//!
//! An upstream that echoes what it was sent (a debug endpoint, an error quoting the key, a
//! redirect carrying the query key) would hand the credential to the workflow. A [`Scrubber`]
//! holds the forms the credential can come back in (as stored, percent-encoded, JSON-escaped,
//! base64 at every byte alignment, the Basic pair as sent) and replaces each with the
//! connection's placeholder `latchkey.{id}`: in header values ([`Scrubber::header`]) and in a
//! body as it streams ([`Stream`]), a match split across chunks included.
//!
//! A stream holds back only what could still become a match: the longest tail of what it has
//! seen that is the start of some form. A server-sent event or a token stream is not delayed
//! unless its last bytes spell the beginning of the key.
//!
//! The matcher keeps its own copy of the forms, which is not zeroized when it is dropped (the
//! same is true of the `HeaderValue` the credential is sent in); the copies here are.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};
use zeroize::Zeroizing;

use crate::body::{BoxBody, BoxError};
use crate::telemetry;

/// Base64 forms shorter than this are not looked for: a few characters of base64 turn up in
/// any body.
const MIN_BASE64: usize = 8;

/// The forms of one connection's credential, and the placeholder that replaces them.
pub struct Scrubber {
    finder: AhoCorasick,
    forms: Vec<Zeroizing<Vec<u8>>>,
    /// Which bytes begin some form: a tail is held back only from such a byte.
    starts: [bool; 256],
    longest: usize,
    /// A value shorter than this holds no form (most header values: no search).
    shortest: usize,
    placeholder: Bytes,
    /// The connection's ID, to label the count.
    id: Arc<str>,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} forms, <redacted>)", self.forms.len())
    }
}

impl Scrubber {
    /// A scrubber for the secret values `secrets` and the extra forms `sent` (a credential as
    /// it went out, such as a Basic pair's base64), replaced by `latchkey.{id}`. None when
    /// there is nothing to look for.
    pub fn new<'a>(
        secrets: impl IntoIterator<Item = &'a [u8]>,
        sent: impl IntoIterator<Item = &'a [u8]>,
        id: &str,
    ) -> Option<Arc<Scrubber>> {
        let mut forms: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut add = |form: Zeroizing<Vec<u8>>| {
            if !form.is_empty() && !forms.contains(&form) {
                forms.push(form);
            }
        };
        for s in secrets {
            if s.is_empty() {
                continue;
            }
            add(Zeroizing::new(s.to_vec()));
            for hex in [b"0123456789ABCDEF", b"0123456789abcdef"] {
                add(percent_encoded(s, hex, b"-._~"));
                // Encoders that leave only letters and digits alone.
                add(percent_encoded(s, hex, b""));
            }
            add(json_escaped(s));
            for form in base64_forms(s) {
                add(form);
            }
        }
        for s in sent {
            add(Zeroizing::new(s.to_vec()));
        }
        if forms.is_empty() {
            return None;
        }
        // The contiguous NFA: each cached connection holds its matcher, and the DFA that
        // aho-corasick picks for so few patterns took 84 KiB for a 32-character key's forms
        // and 170 KiB for 64 (most of what a cached connection cost); this one takes a few KiB,
        // for a search about as fast behind its prefilter (`cargo bench --bench hot_path --
        // scrub`, `python3 bench/cache_memory.py`).
        let finder = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .kind(Some(AhoCorasickKind::ContiguousNFA))
            .build(forms.iter().map(|f| f.as_slice()))
            .ok()?;
        let mut starts = [false; 256];
        for f in &forms {
            starts[usize::from(f[0])] = true;
        }
        let longest = forms.iter().map(|f| f.len()).max().unwrap_or(0);
        let shortest = forms.iter().map(|f| f.len()).min().unwrap_or(0);
        Some(Arc::new(Scrubber {
            finder,
            forms,
            starts,
            longest,
            shortest,
            placeholder: Bytes::from(format!("latchkey.{id}")),
            id: Arc::from(id),
        }))
    }

    /// The placeholder that replaces the credential.
    pub fn placeholder(&self) -> &[u8] {
        &self.placeholder
    }

    /// `value` with every form of the credential replaced, and how many there were; None when
    /// there were none.
    pub fn header(&self, value: &HeaderValue) -> Option<(HeaderValue, u64)> {
        let bytes = value.as_bytes();
        if bytes.len() < self.shortest || !self.finder.is_match(bytes) {
            return None;
        }
        let mut out = BytesMut::with_capacity(bytes.len() + self.placeholder.len());
        let n = self.replace(bytes, bytes.len(), &mut out).1;
        // The placeholder is visible ASCII, so what was a valid value still is.
        let mut v = HeaderValue::from_maybe_shared(out.freeze()).ok()?;
        v.set_sensitive(value.is_sensitive());
        Some((v, n))
    }

    /// Replaces the forms in every header value of `headers`; counts and returns how many
    /// there were.
    pub fn headers(&self, headers: &mut HeaderMap) -> u64 {
        let mut n = 0;
        for value in headers.values_mut() {
            if let Some((scrubbed, k)) = self.header(value) {
                *value = scrubbed;
                n += k;
            }
        }
        self.count(n);
        n
    }

    /// Counts `n` replacements in the metric, and says so in the log: the upstream echoes the
    /// key, which its owner wants to know.
    fn count(&self, n: u64) {
        if n > 0 {
            telemetry::response_scrubbed(&self.id, n);
            tracing::warn!(
                connection = %self.id,
                replaced = n,
                "the upstream's answer held the credential; it was replaced by the placeholder"
            );
        }
    }

    /// A whole body with every form replaced, and how many there were (`body` itself when
    /// there were none).
    pub fn whole(&self, body: Bytes) -> (Bytes, u64) {
        if !self.finder.is_match(&body[..]) {
            return (body, 0);
        }
        let mut out = BytesMut::with_capacity(body.len() + self.placeholder.len());
        let n = self.replace(&body, body.len(), &mut out).1;
        self.count(n);
        (out.freeze(), n)
    }

    /// `text` with every form replaced (`text` itself when there was none). Not counted: for
    /// latchkey's own messages (the admin API's), not for answers to workflows.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if !self.finder.is_match(text) {
            return Cow::Borrowed(text);
        }
        let mut out = BytesMut::with_capacity(text.len() + self.placeholder.len());
        self.replace(text.as_bytes(), text.len(), &mut out);
        // Forms and the placeholder are whole strings cut out of and put into a string, so
        // the result is UTF-8; were it not, nothing of it is kept.
        Cow::Owned(String::from_utf8(out.to_vec()).unwrap_or_default())
    }

    /// Whether `text` holds a form, or is itself a piece of one at least [`MIN_BASE64`] bytes
    /// long (a service that quotes the first half of the key).
    pub fn quotes(&self, text: &[u8]) -> bool {
        self.finder.is_match(text)
            || (text.len() >= MIN_BASE64
                && self
                    .forms
                    .iter()
                    .any(|f| f.windows(text.len()).any(|w| w == text)))
    }

    /// A body's scrubbing state, fed chunk by chunk.
    pub fn stream(self: &Arc<Self>) -> Stream {
        Stream {
            scrubber: self.clone(),
            carry: BytesMut::new(),
            scrubbed: 0,
        }
    }

    /// Copies `buf[..hold]` to `out` with the forms replaced, where `hold` is lowered to the
    /// start of a tail that could still become a form (never below `floor`... see
    /// [`Scrubber::hold_from`]); returns where copying stopped and the number of forms
    /// replaced. Matches starting at or after the hold are left for later.
    fn replace(&self, buf: &[u8], mut hold: usize, out: &mut BytesMut) -> (usize, u64) {
        let mut pos = 0;
        let mut n = 0;
        for m in self.finder.find_iter(buf) {
            if m.start() >= hold {
                break;
            }
            out.extend_from_slice(&buf[pos..m.start()]);
            out.extend_from_slice(&self.placeholder);
            pos = m.end();
            n += 1;
            if pos > hold {
                hold = self.hold_from(buf, pos);
            }
        }
        out.extend_from_slice(&buf[pos..hold.max(pos)]);
        (hold.max(pos), n)
    }

    /// The first position at or after `floor` from which the rest of `buf` is a proper start
    /// of some form (so that more bytes could complete it), or `buf.len()`.
    fn hold_from(&self, buf: &[u8], floor: usize) -> usize {
        let floor = floor.max(buf.len().saturating_sub(self.longest - 1));
        (floor..buf.len())
            .find(|&i| {
                self.starts[usize::from(buf[i])]
                    && self
                        .forms
                        .iter()
                        .any(|f| f.len() > buf.len() - i && f.starts_with(&buf[i..]))
            })
            .unwrap_or(buf.len())
    }
}

/// One body's scrubbing: what was held back from the last chunk, and the count so far.
pub struct Stream {
    scrubber: Arc<Scrubber>,
    carry: BytesMut,
    scrubbed: u64,
}

impl Stream {
    /// The next chunk of the scrubbed body (possibly empty: all of it may be held back).
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        let s = &*self.scrubber;
        if self.carry.is_empty() {
            // Usually: nothing held, no match, nothing to hold; the chunk goes on as it is.
            let hold = s.hold_from(&chunk, 0);
            if !s.finder.is_match(&chunk[..hold]) && !self.straddles(&chunk, hold) {
                self.carry.extend_from_slice(&chunk[hold..]);
                return chunk.slice(..hold);
            }
            self.carry.extend_from_slice(&chunk);
        } else {
            self.carry.extend_from_slice(&chunk);
        }
        let buf = self.carry.split().freeze();
        let hold = s.hold_from(&buf, 0);
        let mut out = BytesMut::with_capacity(buf.len() + s.placeholder.len());
        let (stopped, n) = s.replace(&buf, hold, &mut out);
        self.scrubbed += n;
        self.carry.extend_from_slice(&buf[stopped..]);
        out.freeze()
    }

    /// What is still held back, scrubbed: the body has ended.
    pub fn finish(&mut self) -> Bytes {
        if self.carry.is_empty() {
            return Bytes::new();
        }
        let buf = self.carry.split().freeze();
        let mut out = BytesMut::with_capacity(buf.len());
        let (_, n) = self.scrubber.replace(&buf, buf.len(), &mut out);
        self.scrubbed += n;
        out.freeze()
    }

    /// Forms replaced so far.
    pub fn scrubbed(&self) -> u64 {
        self.scrubbed
    }

    /// The body has ended: what was held back, if anything, and the count goes to the metric.
    fn end(&mut self) -> Option<Bytes> {
        let out = self.finish();
        self.scrubber.count(self.scrubbed);
        self.scrubbed = 0;
        (!out.is_empty()).then_some(out)
    }

    /// Whether a match starts before `hold` and runs past it (so the fast path cannot cut at
    /// `hold`).
    fn straddles(&self, chunk: &[u8], hold: usize) -> bool {
        hold < chunk.len()
            && self
                .scrubber
                .finder
                .find_iter(chunk)
                .any(|m| m.start() < hold && m.end() > hold)
    }
}

/// `s` with every byte other than letters, digits and `keep` as `%XX`, in the given hex digits.
fn percent_encoded(s: &[u8], hex: &[u8; 16], keep: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(s.len() * 3));
    for &b in s {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
        }
    }
    out
}

/// `s` as a JSON string's contents, with `/` escaped as some encoders do.
fn json_escaped(s: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(s.len() + 8));
    for &b in s {
        match b {
            b'"' | b'\\' | b'/' => out.extend_from_slice(&[b'\\', b]),
            b if b < 0x20 => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            b => out.push(b),
        }
    }
    out
}

/// The base64 forms of `s`: whole (padded or not), and inside a longer base64 text at each of
/// the three byte alignments, the characters that carry only bits of `s`; in the standard and
/// the URL-safe alphabet.
fn base64_forms(s: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    let mut out = Vec::new();
    for engine in [STANDARD, URL_SAFE] {
        out.push(Zeroizing::new(engine.encode(s).into_bytes()));
        for k in 0..3 {
            let mut v = Zeroizing::new(vec![0u8; k]);
            v.extend_from_slice(s);
            let text = Zeroizing::new(engine.encode(&*v).into_bytes());
            // Character c carries bits 6c..6c+6 of the input: keep those inside `s`.
            let start = (4 * k).div_ceil(3);
            let end = (4 * (k + s.len())) / 3;
            if end >= start + MIN_BASE64 {
                out.push(Zeroizing::new(text[start..end].to_vec()));
            }
        }
    }
    out
}

pin_project_lite::pin_project! {
    /// A body scrubbed as it streams. Its length is not known ahead (a replacement changes
    /// it), so the answer is re-framed; trailers are scrubbed too.
    pub struct Scrubbed<B> {
        #[pin]
        inner: B,
        stream: Stream,
        // A frame read before the answer's head went on, to go first.
        first: Option<Frame<Bytes>>,
        trailers: Option<HeaderMap>,
        done: bool,
    }
}

impl<B> Scrubbed<B> {
    /// `inner` scrubbed, after `first` (a frame already read from it).
    pub fn new(inner: B, first: Option<Frame<Bytes>>, scrubber: &Arc<Scrubber>) -> Self {
        Scrubbed {
            inner,
            stream: scrubber.stream(),
            first,
            trailers: None,
            done: false,
        }
    }
}

impl<B: Body<Data = Bytes, Error = BoxError>> Body for Scrubbed<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if *this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let next = match this.first.take() {
                Some(frame) => Some(Ok(frame)),
                None => ready!(this.inner.as_mut().poll_frame(cx)),
            };
            match next {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.stream.push(data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body.
                        if let Ok(mut t) = frame.into_trailers() {
                            this.stream.scrubber.headers(&mut t);
                            *this.trailers = Some(t);
                        }
                        *this.done = true;
                        if let Some(out) = this.stream.end() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    *this.done = true;
                    if let Some(out) = this.stream.end() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }
}

pin_project_lite::pin_project! {
    /// An upstream's answer on its way back to the client.
    #[project = AnswerProj]
    pub enum Answer<B> {
        /// As it came: nothing to look for, no body (`HEAD`, 204, 304), or a WebSocket.
        Pass { #[pin] inner: B },
        /// Whole when its head came (its declared length had arrived with it), scrubbed; its
        /// new length is known.
        Whole { data: Option<Bytes> },
        /// Scrubbed as it streams. Boxed, as the next one: a scrubbing body is more than twice
        /// the size of the others, and every response (a passed one too) would otherwise be as
        /// large, and copied whole each time it is handed on.
        Stream { inner: Pin<Box<Scrubbed<B>>> },
        /// Decoded from the content coding the upstream chose, then scrubbed as it streams.
        Decoded { inner: Pin<Box<Scrubbed<BoxBody>>> },
    }
}

impl<B> Answer<B> {
    pub fn pass(inner: B) -> Self {
        Answer::Pass { inner }
    }
}

impl<B: Body<Data = Bytes, Error = BoxError>> Body for Answer<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            AnswerProj::Pass { inner } => inner.poll_frame(cx),
            AnswerProj::Whole { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            AnswerProj::Stream { inner } => inner.as_mut().poll_frame(cx),
            AnswerProj::Decoded { inner } => inner.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Answer::Pass { inner } => inner.is_end_stream(),
            Answer::Whole { data } => data.is_none(),
            Answer::Stream { inner } => inner.is_end_stream(),
            Answer::Decoded { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Answer::Pass { inner } => inner.size_hint(),
            Answer::Whole { data } => {
                http_body::SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Answer::Stream { .. } | Answer::Decoded { .. } => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"sk-live_4f9a/b+c=d";

    fn scrubber() -> Arc<Scrubber> {
        Scrubber::new([KEY], [], "acme").unwrap()
    }

    /// Every cached connection holds its matcher: a DFA (aho-corasick's pick for a handful of
    /// patterns) took 60 to 280 KiB for one key's forms; the contiguous NFA takes a few.
    #[test]
    fn a_long_keys_matcher_stays_small() {
        let key = b"sk_live_51Hx0123456789abcdefGHIJKLmnopqrSTUVwxyz0123456789";
        let s = Scrubber::new(
            [&key[..]],
            [&b"Basic c2tfbGl2ZV81MUh4MDEyMzQ1Njc4OQ=="[..]],
            "a",
        )
        .unwrap();
        let forms: usize = s.forms.iter().map(|f| f.len()).sum();
        assert!(forms > 400, "{forms} bytes of forms");
        let used = s.finder.memory_usage();
        assert!(used < 16 * 1024, "{used} bytes");
    }

    #[test]
    fn text_and_quotes() {
        let s = scrubber();
        assert!(matches!(
            s.text("nothing here"),
            Cow::Borrowed("nothing here")
        ));
        let key = std::str::from_utf8(KEY).unwrap();
        assert_eq!(s.text(&format!("é {key} é")), "é latchkey.acme é");
        assert!(s.quotes(KEY));
        assert!(s.quotes(format!("error: {key}").as_bytes()));
        assert!(s.quotes(&KEY[..8]));
        assert!(s.quotes(&KEY[3..14]));
        assert!(!s.quotes(&KEY[..7]));
        assert!(!s.quotes(b"invalid_auth"));
    }

    fn streamed(s: &Arc<Scrubber>, chunks: &[&[u8]]) -> (Vec<u8>, u64) {
        let mut st = s.stream();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&st.push(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&st.finish());
        (out, st.scrubbed())
    }

    fn encodings(key: &[u8]) -> Vec<Vec<u8>> {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        vec![
            key.to_vec(),
            STANDARD.encode(key).into_bytes(),
            URL_SAFE_NO_PAD.encode(key).into_bytes(),
            percent_encoded(key, b"0123456789ABCDEF", b"-._~").to_vec(),
            percent_encoded(key, b"0123456789abcdef", b"-._~").to_vec(),
            percent_encoded(key, b"0123456789ABCDEF", b"").to_vec(),
            json_escaped(key).to_vec(),
        ]
    }

    #[test]
    fn every_form_split_at_every_point_is_replaced() {
        let s = scrubber();
        for form in encodings(KEY) {
            let mut body = b"{\"echo\": \"".to_vec();
            body.extend_from_slice(&form);
            body.extend_from_slice(b"\"}");
            for cut in 0..=body.len() {
                for cut2 in cut..=body.len() {
                    let (out, n) = streamed(&s, &[&body[..cut], &body[cut..cut2], &body[cut2..]]);
                    let text = String::from_utf8_lossy(&out);
                    assert_eq!(n, 1, "{text}");
                    assert!(text.contains("latchkey.acme"), "{text}");
                    assert!(!text.contains("4f9a"), "{text}");
                }
            }
        }
    }

    #[test]
    fn base64_inside_longer_base64_at_each_alignment() {
        use base64::engine::general_purpose::STANDARD;
        let s = scrubber();
        for prefix in [&b""[..], b"u", b"us", b"user:"] {
            let mut v = prefix.to_vec();
            v.extend_from_slice(KEY);
            v.extend_from_slice(b"tail");
            let text = STANDARD.encode(&v);
            let (out, _) = s.whole(Bytes::from(text.clone()));
            let out = String::from_utf8(out.to_vec()).unwrap();
            assert!(out.contains("latchkey.acme"), "{prefix:?}: {out}");
            // What is left of the text decodes to no more than two bytes of the key in a row.
            for piece in out.split("latchkey.acme") {
                assert!(piece.len() <= 8, "{prefix:?}: {out}");
            }
        }
    }

    #[test]
    fn nothing_is_held_back_unless_it_could_begin_the_key() {
        let s = scrubber();
        let mut st = s.stream();
        assert_eq!(
            &st.push(Bytes::from_static(b"data: hello\n\n"))[..],
            b"data: hello\n\n"
        );
        assert_eq!(&st.push(Bytes::from_static(b"data: sk-li"))[..], b"data: ");
        assert_eq!(
            &st.push(Bytes::from_static(b"ght\n\n"))[..],
            b"sk-light\n\n"
        );
        assert!(st.finish().is_empty());
        assert_eq!(st.scrubbed(), 0);
    }

    #[test]
    fn a_body_without_the_key_is_the_same_bytes() {
        let s = scrubber();
        let body = Bytes::from(vec![b'x'; 4096]);
        let (out, n) = s.whole(body.clone());
        assert_eq!(n, 0);
        assert_eq!(out.as_ptr(), body.as_ptr());
    }

    #[test]
    fn several_matches_and_repeats() {
        let s = scrubber();
        let mut body = Vec::new();
        for _ in 0..5 {
            body.extend_from_slice(KEY);
            body.extend_from_slice(b", ");
        }
        let chunks: Vec<&[u8]> = body.chunks(7).collect();
        let (out, n) = streamed(&s, &chunks);
        assert_eq!(n, 5);
        assert_eq!(String::from_utf8(out).unwrap(), "latchkey.acme, ".repeat(5));
    }

    #[test]
    fn header_values_and_sent_forms() {
        use base64::engine::general_purpose::STANDARD;
        let pair = STANDARD.encode(b"user:sk-live_4f9a/b+c=d");
        let s = Scrubber::new([KEY], [pair.as_bytes()], "acme").unwrap();
        let v = HeaderValue::from_str(&format!("Basic {pair}")).unwrap();
        let (out, n) = s.header(&v).unwrap();
        assert_eq!(out, "Basic latchkey.acme");
        assert_eq!(n, 1);
        let loc =
            HeaderValue::from_static("https://x.test/cb?api_key=sk%2Dlive%5F4f9a%2Fb%2Bc%3Dd&a=1");
        assert_eq!(
            s.header(&loc).unwrap().0,
            "https://x.test/cb?api_key=latchkey.acme&a=1"
        );
        assert!(s.header(&HeaderValue::from_static("text/plain")).is_none());
    }

    #[test]
    fn nothing_to_look_for() {
        assert!(Scrubber::new([&b""[..]], [], "x").is_none());
    }
}
