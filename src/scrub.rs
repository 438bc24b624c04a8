//! Response scrubbing: the credential does not come back to the client (PRODUCT.md section 4,
//! step 7, and section 10, property 8).
//!
//! An upstream that echoes what it was sent (a debug endpoint, an error quoting the key, a
//! redirect carrying the query key) would hand the credential to the workflow. A [`Scrubber`]
//! holds the forms the credential can come back in (as stored, base64 at every byte
//! alignment, the Basic pair as sent, and each of those spelled with escapes: percent,
//! JSON and HTML character references in any mix, [`spell`]) and replaces each with the
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

/// The longest text that spells one character in [`spell`] (`&#x10FFFF;`, `\ud83d\ude00`
/// for four bytes).
const MAX_UNIT: usize = 12;

/// The forms of one connection's credential, and the placeholder that replaces them.
pub struct Scrubber {
    finder: AhoCorasick,
    forms: Vec<Zeroizing<Vec<u8>>>,
    /// The forms with a byte that an encoder may escape, looked for spelled one byte at a time
    /// ([`spell`]): each byte as itself, percent-encoded, JSON-escaped or an HTML character
    /// reference, in any mix. Such a spelling holds `%`, `\` or `&` (one without is a form
    /// as it is, which `finder` finds).
    spelled: Vec<Zeroizing<Vec<u8>>>,
    /// The longest text a form in `spelled` can be spelled in.
    longest_spelled: usize,
    /// Which bytes begin some form: a tail is held back only from such a byte.
    starts: [bool; 256],
    longest: usize,
    /// A value shorter than this holds no form (most header values: no search).
    shortest: usize,
    /// The forms a header name could hold (made of a name's characters), in lower case, as
    /// names are kept; and the shortest of them (most names are shorter: no search).
    in_names: Vec<Zeroizing<Vec<u8>>>,
    shortest_in_names: usize,
    placeholder: Bytes,
    /// The connection's ID, to label the count.
    id: Arc<str>,
    /// What this scrubber was made from for the connection's current version (its secret
    /// values and sent forms), without those of the version before ([`Scrubber::and_previous`]):
    /// a scrubber carries the key one rotation replaced, never a chain of them.
    own: Own,
}

/// A scrubber's inputs for one version of a connection.
#[derive(Default)]
struct Own {
    secrets: Vec<Zeroizing<Vec<u8>>>,
    sent: Vec<Zeroizing<Vec<u8>>>,
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
        let own = Own {
            secrets: secrets
                .into_iter()
                .filter(|s| !s.is_empty())
                .map(|s| Zeroizing::new(s.to_vec()))
                .collect(),
            sent: sent
                .into_iter()
                .map(|s| Zeroizing::new(s.to_vec()))
                .collect(),
        };
        Scrubber::build(own, None, id)
    }

    /// This scrubber, also finding the forms of the key that `previous` (the same connection's
    /// version before a rotation) scrubbed: services often keep a replaced key valid for a
    /// while, and one that echoes it must not hand it to the client either. Only `previous`'s
    /// own key is added, not the one before it.
    pub fn and_previous(&self, previous: &Scrubber) -> Option<Arc<Scrubber>> {
        let own = Own {
            secrets: self.own.secrets.clone(),
            sent: self.own.sent.clone(),
        };
        Scrubber::build(own, Some(&previous.own), &self.id)
    }

    /// The scrubber for `own`'s forms and `also`'s (a replaced key's).
    fn build(own: Own, also: Option<&Own>, id: &str) -> Option<Arc<Scrubber>> {
        let both = |part: fn(&Own) -> &[Zeroizing<Vec<u8>>]| -> Vec<&[u8]> {
            std::iter::once(&own)
                .chain(also)
                .flat_map(part)
                .map(|s| s.as_slice())
                .collect()
        };
        let secrets = both(|o| &o.secrets);
        let sent = both(|o| &o.sent);
        let mut forms: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        // The forms as bytes (the secret, its base64, what was sent), to be looked for spelled
        // too: those with a byte an encoder may escape.
        let mut spelled: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut add = |form: Zeroizing<Vec<u8>>, literal: bool| {
            if literal
                && form.iter().any(|b| !b.is_ascii_alphanumeric())
                && !spelled.contains(&form)
            {
                spelled.push(form.clone());
            }
            if !form.is_empty() && !forms.contains(&form) {
                forms.push(form);
            }
        };
        for s in secrets {
            if s.is_empty() {
                continue;
            }
            add(Zeroizing::new(s.to_vec()), true);
            for hex in [b"0123456789ABCDEF", b"0123456789abcdef"] {
                add(percent_encoded(s, hex, b"-._~"), false);
                // Encoders that leave only letters and digits alone.
                add(percent_encoded(s, hex, b""), false);
            }
            add(json_escaped(s), false);
            for form in base64_forms(s) {
                add(form, true);
            }
        }
        for s in sent {
            add(Zeroizing::new(s.to_vec()), true);
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
        let longest_spelled = spelled
            .iter()
            .map(|f| f.len() * MAX_UNIT)
            .max()
            .unwrap_or(0);
        let longest = forms.iter().map(|f| f.len()).max().unwrap_or(0);
        let shortest = forms.iter().map(|f| f.len()).min().unwrap_or(0);
        let in_names: Vec<Zeroizing<Vec<u8>>> = forms
            .iter()
            .filter(|f| f.iter().all(|&b| is_name_byte(b)))
            .map(|f| Zeroizing::new(f.to_ascii_lowercase()))
            .collect();
        let shortest_in_names = in_names.iter().map(|f| f.len()).min().unwrap_or(usize::MAX);
        Some(Arc::new(Scrubber {
            finder,
            forms,
            spelled,
            longest_spelled,
            starts,
            longest,
            shortest,
            in_names,
            shortest_in_names,
            placeholder: Bytes::from(format!("latchkey.{id}")),
            id: Arc::from(id),
            own,
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
        if bytes.len() < self.shortest || !self.is_match(bytes) {
            return None;
        }
        let mut out = BytesMut::with_capacity(bytes.len() + self.placeholder.len());
        let n = self.replace(bytes, bytes.len(), &mut out).1;
        // The placeholder is visible ASCII, so what was a valid value still is.
        let mut v = HeaderValue::from_maybe_shared(out.freeze()).ok()?;
        v.set_sensitive(value.is_sensitive());
        Some((v, n))
    }

    /// Replaces the forms in every header value of `headers`, and takes out every header whose
    /// name holds one (a name cannot be given the placeholder a client would read); counts and
    /// returns how many there were.
    pub fn headers(&self, headers: &mut HeaderMap) -> u64 {
        let mut n = 0;
        if headers.keys().any(|name| self.in_name(name.as_str())) {
            let named: Vec<http::HeaderName> = headers
                .keys()
                .filter(|name| self.in_name(name.as_str()))
                .cloned()
                .collect();
            for name in named {
                if let http::header::Entry::Occupied(entry) = headers.entry(name) {
                    n += entry.remove_entry_mult().1.count() as u64;
                }
            }
        }
        for value in headers.values_mut() {
            if let Some((scrubbed, k)) = self.header(value) {
                *value = scrubbed;
                n += k;
            }
        }
        self.count(n);
        n
    }

    /// Whether a header name holds a form of the credential. Names are lower case (as the
    /// `http` crate keeps them), and so are the forms looked for in them; most names are
    /// shorter than the shortest such form, and cost one comparison.
    fn in_name(&self, name: &str) -> bool {
        let name = name.as_bytes();
        name.len() >= self.shortest_in_names
            && self
                .in_names
                .iter()
                .any(|form| memchr::memmem::find(name, form).is_some())
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
        if !self.is_match(&body) {
            return (body, 0);
        }
        let mut out = BytesMut::with_capacity(body.len() + self.placeholder.len());
        let n = self.replace(&body, body.len(), &mut out).1;
        self.count(n);
        (out.freeze(), n)
    }

    /// `text` with every form replaced (`text` itself when there was none; one shorter than
    /// every form is not searched). Not counted: for latchkey's own messages (the admin API's)
    /// and log lines (a request's path), not for answers to workflows.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if text.len() < self.shortest || !self.is_match(text.as_bytes()) {
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
        self.find(text, 0).is_some()
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
        while let Some((start, end)) = self.find(buf, pos) {
            if start >= hold {
                break;
            }
            out.extend_from_slice(&buf[pos..start]);
            out.extend_from_slice(&self.placeholder);
            pos = end;
            n += 1;
            if pos > hold {
                hold = self.hold_from(buf, pos);
            }
        }
        out.extend_from_slice(&buf[pos..hold.max(pos)]);
        (hold.max(pos), n)
    }

    /// Whether `buf` holds a form, as it is or spelled: [`Scrubber::find`]'s answer, quicker
    /// when there is none (most answers).
    fn is_match(&self, buf: &[u8]) -> bool {
        self.finder.is_match(buf)
            || (!self.spelled.is_empty()
                && memchr::memchr3(b'%', b'\\', b'&', buf).is_some()
                && self.find_spelled(buf, 0, buf.len()).is_some())
    }

    /// The leftmost match at or after `from` (the longest of those starting there): a form as
    /// it is, or spelled ([`spell`]).
    fn find(&self, buf: &[u8], from: usize) -> Option<(usize, usize)> {
        let whole = self
            .finder
            .find(aho_corasick::Input::new(buf).range(from..))
            .map(|m| (m.start(), m.end()));
        let spelled = self.find_spelled(buf, from, whole.map_or(buf.len(), |m| m.0));
        match (whole, spelled) {
            (Some(w), Some(s)) if s.0 < w.0 || (s.0 == w.0 && s.1 > w.1) => Some(s),
            (Some(w), _) => Some(w),
            (None, s) => s,
        }
    }

    /// The leftmost spelling of a form in `spelled` that starts at or after `from` and at or
    /// before `until`. A spelling holds a `%`, `\` or `&` (one without is the form as it
    /// is), with at most the form's length less one bytes before the first: so only the
    /// positions that close before each of those are tried.
    fn find_spelled(&self, buf: &[u8], from: usize, until: usize) -> Option<(usize, usize)> {
        if self.spelled.is_empty() || from >= buf.len() {
            return None;
        }
        let before = self.spelled.iter().map(|f| f.len()).max().unwrap_or(1) - 1;
        let mut tried = from;
        for t in memchr::memchr3_iter(b'%', b'\\', b'&', &buf[from..]).map(|t| t + from) {
            let lo = t.saturating_sub(before).max(tried);
            if lo > until {
                break;
            }
            for i in lo..=t.min(until) {
                let end = self
                    .spelled
                    .iter()
                    .filter_map(|f| match spell(f, buf, i) {
                        Spelled::Whole(end) => Some(end),
                        _ => None,
                    })
                    .max();
                if let Some(end) = end {
                    return Some((i, end));
                }
            }
            tried = t + 1;
        }
        None
    }

    /// The first position at or after `floor` from which the rest of `buf` is a proper start
    /// of some form, as it is or spelled (so that more bytes could complete it), or
    /// `buf.len()`.
    fn hold_from(&self, buf: &[u8], floor: usize) -> usize {
        let whole_floor = floor.max(buf.len().saturating_sub(self.longest - 1));
        let whole = (whole_floor..buf.len())
            .find(|&i| {
                self.starts[usize::from(buf[i])]
                    && self
                        .forms
                        .iter()
                        .any(|f| f.len() > buf.len() - i && f.starts_with(&buf[i..]))
            })
            .unwrap_or(buf.len());
        let spelled_floor = floor.max(buf.len().saturating_sub(self.longest_spelled));
        (spelled_floor..whole)
            .find(|&i| {
                self.spelled
                    .iter()
                    .any(|f| spell(f, buf, i) == Spelled::Partial)
            })
            .unwrap_or(whole)
    }
}

/// How much of `form` the text at `text[at..]` spells.
#[derive(Debug, PartialEq, Eq)]
enum Spelled {
    /// All of it, up to this position.
    Whole(usize),
    /// A start of it, up to the end of `text`: more text could complete it.
    Partial,
    No,
}

/// Whether `text[at..]` spells `form`, each character of it as itself, percent-encoded (`%2F`,
/// `%2f`), JSON-escaped (`\/`, `\u002F`, `\u00e9`, a surrogate pair) or an HTML character
/// reference (`&#47;`, `&#x2F;`, `&amp;`), in any mix. An escape is read as such when what it
/// stands for is the form's next character, and as itself otherwise.
fn spell(form: &[u8], text: &[u8], at: usize) -> Spelled {
    let (mut p, mut k) = (at, 0);
    while k < form.len() {
        let Some(&first) = text.get(p) else {
            return Spelled::Partial;
        };
        match escape(&text[p..]) {
            Escape::Stands(bytes, n, len) if form[k..].starts_with(&bytes[..n]) => {
                k += n;
                p += len;
                continue;
            }
            Escape::Cut if could_begin(&text[p..], &form[k..]) => return Spelled::Partial,
            _ => {}
        }
        if first != form[k] {
            return Spelled::No;
        }
        k += 1;
        p += 1;
    }
    Spelled::Whole(p)
}

/// Whether `cut`, an escape cut short by the end of the text, could still become one that
/// stands for the start of `rest` (its first character, or its first byte percent-encoded).
fn could_begin(cut: &[u8], rest: &[u8]) -> bool {
    let cut = cut.to_ascii_lowercase();
    let begins = |whole: &str| whole.as_bytes().starts_with(&cut);
    if begins(&format!("%{:02x}", rest[0])) {
        return true;
    }
    let Some(c) = (1..=rest.len().min(4)).find_map(|n| {
        std::str::from_utf8(&rest[..n])
            .ok()
            .and_then(|s| s.chars().next())
    }) else {
        return false;
    };
    let code = u32::from(c);
    let json = if code < 0x10000 {
        format!("\\u{code:04x}")
    } else {
        let v = code - 0x10000;
        format!(
            "\\u{:04x}\\u{:04x}",
            0xD800 + (v >> 10),
            0xDC00 + (v & 0x3FF)
        )
    };
    let short = match c {
        '"' | '\\' | '/' => format!("\\{c}"),
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => "\\t".into(),
        '\u{8}' => "\\b".into(),
        '\u{c}' => "\\f".into(),
        _ => String::new(),
    };
    let named = match c {
        '&' => "&amp;",
        '<' => "&lt;",
        '>' => "&gt;",
        '"' => "&quot;",
        '\'' => "&apos;",
        _ => "",
    };
    // Numeric references may have leading zeros: `&#x002f;`.
    let numeric = |prefix: &[u8], digits: String| {
        cut.strip_prefix(prefix).is_some_and(|d| {
            let first = d.iter().position(|b| *b != b'0').unwrap_or(d.len());
            format!("{digits};").as_bytes().starts_with(&d[first..])
        })
    };
    begins(&json)
        || (!short.is_empty() && begins(&short))
        || (!named.is_empty() && begins(named))
        || begins("&#")
        || numeric(b"&#x", format!("{code:x}"))
        || (cut.get(2) != Some(&b'x') && numeric(b"&#", code.to_string()))
}

/// An escape at the start of a text.
enum Escape {
    /// It stands for these bytes (the first `.1`), and is `.2` bytes long.
    Stands([u8; 4], usize, usize),
    /// The text ends inside what could be one.
    Cut,
    None,
}

/// The escape at the start of `text`, if any (see [`spell`]).
fn escape(text: &[u8]) -> Escape {
    let hex = |b: &[u8]| -> Option<u32> {
        b.iter().try_fold(0u32, |n, &c| {
            char::from(c).to_digit(16).map(|d| (n << 4) | d)
        })
    };
    // `len` bytes of `text` from `from` are hex digits: their value; the text cut short in
    // them: Cut; else None.
    let hex_at = |from: usize, len: usize| -> Result<u32, Escape> {
        let have = &text[from.min(text.len())..(from + len).min(text.len())];
        match hex(have) {
            Some(_) if have.len() < len => Err(Escape::Cut),
            Some(v) => Ok(v),
            None => Err(Escape::None),
        }
    };
    let stands = |c: u32, len: usize| match char::from_u32(c) {
        Some(c) => {
            let mut bytes = [0u8; 4];
            let n = c.encode_utf8(&mut bytes).len();
            Escape::Stands(bytes, n, len)
        }
        None => Escape::None,
    };
    match text.first() {
        Some(b'%') => match hex_at(1, 2) {
            Ok(b) => Escape::Stands([b as u8, 0, 0, 0], 1, 3),
            Err(e) => e,
        },
        Some(b'\\') => match text.get(1) {
            None => Escape::Cut,
            Some(b'u') => {
                let high = match hex_at(2, 4) {
                    Ok(v) => v,
                    Err(e) => return e,
                };
                if !(0xD800..0xDC00).contains(&high) {
                    return stands(high, 6);
                }
                // A surrogate pair: `\ud83d\ude00`.
                match (text.get(6), text.get(7)) {
                    (None, _) | (Some(b'\\'), None) => return Escape::Cut,
                    (Some(b'\\'), Some(b'u')) => {}
                    _ => return Escape::None,
                }
                match hex_at(8, 4) {
                    Ok(low @ 0xDC00..=0xDFFF) => {
                        stands(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00), 12)
                    }
                    Ok(_) => Escape::None,
                    Err(e) => e,
                }
            }
            Some(&c) => match c {
                b'"' | b'\\' | b'/' => Escape::Stands([c, 0, 0, 0], 1, 2),
                b'b' => Escape::Stands([0x08, 0, 0, 0], 1, 2),
                b'f' => Escape::Stands([0x0c, 0, 0, 0], 1, 2),
                b'n' => Escape::Stands([b'\n', 0, 0, 0], 1, 2),
                b'r' => Escape::Stands([b'\r', 0, 0, 0], 1, 2),
                b't' => Escape::Stands([b'\t', 0, 0, 0], 1, 2),
                _ => Escape::None,
            },
        },
        Some(b'&') => {
            let rest = &text[1..];
            for (name, c) in [
                (&b"amp;"[..], b'&'),
                (b"lt;", b'<'),
                (b"gt;", b'>'),
                (b"quot;", b'"'),
                (b"apos;", b'\''),
            ] {
                if rest.starts_with(name) {
                    return Escape::Stands([c, 0, 0, 0], 1, 1 + name.len());
                }
                if name.starts_with(rest) {
                    return Escape::Cut;
                }
            }
            // `&#47;` or `&#x2F;`: at most 7 decimal or 6 hex digits.
            let (digits_at, radix, most) = match (rest.first(), rest.get(1)) {
                (None, _) | (Some(b'#'), None) => return Escape::Cut,
                (Some(b'#'), Some(b'x' | b'X')) => (3, 16, 6),
                (Some(b'#'), Some(_)) => (2, 10, 7),
                _ => return Escape::None,
            };
            let digits = text[digits_at.min(text.len())..]
                .iter()
                .take(most + 1)
                .take_while(|c| char::from(**c).is_digit(radix))
                .count();
            let end = digits_at + digits;
            match text.get(end) {
                _ if digits > most => Escape::None,
                None => Escape::Cut,
                Some(b';') if digits > 0 => {
                    let value = text[digits_at..end].iter().fold(0u32, |n, &c| {
                        n * radix + char::from(c).to_digit(radix).unwrap_or(0)
                    });
                    stands(value, end + 1)
                }
                Some(_) => Escape::None,
            }
        }
        _ => Escape::None,
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
            if !s.is_match(&chunk) {
                let hold = s.hold_from(&chunk, 0);
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
                            crate::hop_by_hop::strip_latchkey_error(&mut t);
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
            // An upstream's `Latchkey-Error` is not passed on, in trailers either.
            AnswerProj::Pass { inner } => {
                inner
                    .poll_frame(cx)
                    .map_ok(|frame| match frame.into_trailers() {
                        Ok(mut t) => {
                            crate::hop_by_hop::strip_latchkey_error(&mut t);
                            Frame::trailers(t)
                        }
                        Err(frame) => frame,
                    })
            }
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

/// A byte a header name may hold (RFC 9110 `tchar`).
fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
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

    /// What encoders of the day write for `KEY` (`sk-live_4f9a/b+c=d`) beside the forms
    /// above: each with its own idea of what to escape.
    fn spellings() -> Vec<&'static [u8]> {
        vec![
            // Python's `quote()` (keeps `/`), JavaScript's `encodeURI`.
            b"sk-live_4f9a/b%2Bc%3Dd",
            b"sk-live_4f9a/b+c%3dd",
            // `encodeURIComponent` with lower-case hex from another library.
            b"sk-live_4f9a%2fb%2bc%3dd",
            // PHP's `json_encode` of a percent-encoded URL: `\/` beside `%2B`.
            b"sk-live_4f9a\\/b%2Bc%3Dd",
            // JSON `\u` escapes: Go's (`+`, `=`, none of the key's, but `/` by one library),
            // every character (either case), a Java escaper.
            b"sk-live_4f9a\\u002fb+c\\u003dd",
            b"\\u0073\\u006B\\u002D\\u006c\\u0069\\u0076\\u0065\\u005f\\u0034\\u0066\\u0039\\u0061\\u002f\\u0062\\u002b\\u0063\\u003d\\u0064",
            // HTML character references: an error page quoting the key.
            b"sk-live_4f9a&#47;b&#x2B;c&#61;d",
            b"sk-live_4f9a&#x2f;b&#43;c&#X3D;d",
        ]
    }

    #[test]
    fn a_key_spelled_with_any_mix_of_escapes_is_replaced_split_at_every_point() {
        let s = scrubber();
        for form in spellings() {
            let mut body = b"{\"url\": \"https://x.test/?k=".to_vec();
            body.extend_from_slice(form);
            body.extend_from_slice(b"&more=1\"}");
            let (whole, n) = s.whole(Bytes::from(body.clone()));
            let whole = String::from_utf8_lossy(&whole).into_owned();
            assert_eq!(n, 1, "{whole}");
            assert!(whole.contains("?k=latchkey.acme&more=1"), "{whole}");
            for cut in 0..=body.len() {
                let (out, n) = streamed(&s, &[&body[..cut], &body[cut..]]);
                assert_eq!(String::from_utf8_lossy(&out), whole, "cut at {cut}");
                assert_eq!(n, 1);
            }
            let value = HeaderValue::from_bytes(form).unwrap();
            assert_eq!(s.header(&value).unwrap().0, "latchkey.acme");
        }
    }

    #[test]
    fn keys_with_quotes_backslashes_and_non_ascii_spelled_as_json_encoders_do() {
        for (key, spelled) in [
            // Python's `json.dumps`: `"` and `\` escaped, `/` not.
            (&b"sk_\"live/abc123"[..], &b"sk_\\\"live/abc123"[..]),
            (b"sk_\\live/abc123", b"sk_\\\\live/abc123"),
            // ... and non-ASCII as `\u` escapes, a surrogate pair for what is beyond the BMP.
            (
                "cl\u{e9}/\u{1F511}-9".as_bytes(),
                b"cl\\u00e9/\\ud83d\\udd11-9",
            ),
            // Go's `<`, `>` and `&`.
            (b"pw&<x>/3", b"pw\\u0026\\u003cx\\u003e/3"),
        ] {
            let s = Scrubber::new([key], [], "k").unwrap();
            let body = [&b"{\"k\":\""[..], spelled, b"\"}"].concat();
            let (out, n) = s.whole(Bytes::from(body));
            assert_eq!(
                (&out[..], n),
                (&b"{\"k\":\"latchkey.k\"}"[..], 1),
                "{key:?}"
            );
        }
    }

    #[test]
    fn escapes_that_do_not_spell_the_key_leave_the_text_as_it_was() {
        let s = scrubber();
        for text in [
            &b"sk-live_4f9a%2Fb%2Bc%3De"[..],
            b"sk-live_4f9a\\u002fb+c\\u003d",
            b"sk-live_4f9a&#47b+c=d",
            b"sk-live_4f9a&#x2F;b+c&#61;&#100;x",
            b"100% & \\ nothing %zz &#; &#x; &amp &#99999999; \\ud83d \\u12",
        ] {
            let (out, n) = s.whole(Bytes::copy_from_slice(text));
            // The last but one is the key (`&#100;` is `d`), followed by `x`.
            if text.ends_with(b";x") {
                assert_eq!((&out[..], n), (&b"latchkey.acmex"[..], 1));
                continue;
            }
            assert_eq!(
                (&out[..], n),
                (text, 0),
                "{}",
                String::from_utf8_lossy(text)
            );
            // Nothing is held back of a text that ends no start of a spelling.
            assert_eq!(streamed(&s, &[text]).0, text);
        }
        // A tail that could still become a spelling is held until it cannot.
        let mut st = s.stream();
        assert_eq!(&st.push(Bytes::from_static(b"k=sk-live_4f9a%2"))[..], b"k=");
        assert_eq!(
            &st.push(Bytes::from_static(b"0 no"))[..],
            b"sk-live_4f9a%20 no"
        );
        // `\u00` could still become `\u0073`, the key's `s`; `\u01` nothing of it.
        assert_eq!(&st.push(Bytes::from_static(b"x \\u00"))[..], b"x ");
        assert_eq!(
            &st.push(Bytes::from_static(b"41 \\u01"))[..],
            b"\\u0041 \\u01"
        );
        assert_eq!(&st.push(Bytes::from_static(b"&#x00"))[..], b"");
        assert_eq!(&st.push(Bytes::from_static(b"9 &#2"))[..], b"&#x009 &#2");
        assert_eq!(&st.push(Bytes::from_static(b"; %7"))[..], b"; ");
        assert_eq!(&st.push(Bytes::from_static(b"3"))[..], b"");
        assert_eq!(&st.push(Bytes::from_static(b"!"))[..], b"%73!");
        assert!(st.finish().is_empty());
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
    fn a_header_whose_name_holds_the_key_is_taken_out() {
        let s = Scrubber::new([b"SekritLower9zz".as_slice()], [], "acme").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-sekritlower9zz", HeaderValue::from_static("1"));
        headers.append("x-sekritlower9zz", HeaderValue::from_static("2"));
        headers.insert("x-long-but-harmless-name", HeaderValue::from_static("3"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        assert_eq!(s.headers(&mut headers), 2);
        assert!(!headers.contains_key("x-sekritlower9zz"));
        assert_eq!(headers.len(), 2);
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
