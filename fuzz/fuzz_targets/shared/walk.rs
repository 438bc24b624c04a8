//! Reads the bytes `strict::check` passed as a stream of requests, on its own: each head with
//! `httparse`, each body by its framing. Shared by the strict_* targets (`#[path]`).

/// What an h2 connection opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One request read from the passed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub method: String,
    pub target: String,
    /// `Some(1)` for HTTP/1.1.
    pub version: Option<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// The body ended within the bytes (else they end inside it).
    pub whole: bool,
}

impl Read {
    fn header<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The request asks for the connection to become something else (CONNECT, or `Upgrade` in
    /// HTTP/1.1): what follows it is not checked as requests by a server that switches.
    pub fn upgrade(&self) -> bool {
        self.method == "CONNECT" || (self.version == Some(1) && self.header("upgrade").count() > 0)
    }

    /// The connection ends after this request's answer (`Connection: close`, or HTTP/1.0
    /// without `keep-alive`), as hyper's server (1.12) decides it: a `close` in any value ends
    /// it; otherwise an HTTP/1.0 request is kept alive from the first value naming
    /// `keep-alive`; a value that is not visible ASCII (`HeaderValue::to_str` fails) names
    /// nothing.
    pub fn last(&self) -> bool {
        let mut keep = self.version != Some(0);
        let mut close = false;
        for v in self.header("connection") {
            let visible = v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
            let has = |token: &str| {
                visible
                    && v.split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
            };
            if close || has("close") {
                close = true;
                keep = false;
            } else if !keep {
                keep = has("keep-alive");
            }
        }
        !keep
    }
}

/// Reads every request in `bytes`, which `strict::check` passed; panics where one does not read
/// (that `check` passed it is then wrong). The last request may end inside its body.
pub fn walk(bytes: &[u8]) -> Vec<Read> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        while bytes.get(at..).is_some_and(|r| r.starts_with(b"\r\n")) {
            at += 2;
        }
        if at >= bytes.len() {
            return out;
        }
        if out.is_empty() && bytes[at..].starts_with(H2_PREFACE) {
            // An h2 connection: strict passes it unchecked, and there are no HTTP/1 requests.
            return out;
        }
        let mut fields = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut fields);
        let n = match req.parse(&bytes[at..]) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("a passed head does not parse with httparse: {other:?}"),
        };
        at += n;
        let mut read = Read {
            method: req.method.unwrap_or_default().to_string(),
            target: req.path.unwrap_or_default().to_string(),
            version: req.version,
            headers: req
                .headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect(),
            body: Vec::new(),
            whole: true,
        };
        let chunked = read.header("transfer-encoding").count() > 0;
        let length = read.header("content-length").next().map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        });
        if chunked {
            at = chunks(bytes, at, &mut read);
        } else if let Some(length) = length {
            let length = length.expect("a passed Content-Length is not a number");
            let left = bytes.len() - at;
            let n = usize::try_from(length).unwrap_or(usize::MAX).min(left);
            read.body.extend_from_slice(&bytes[at..at + n]);
            read.whole = n as u64 == length;
            at += n;
        }
        let whole = read.whole;
        out.push(read);
        if !whole {
            return out;
        }
    }
}

/// Reads a chunked body from `at`: where it ends (or the end of `bytes`, `read.whole` false).
fn chunks(bytes: &[u8], mut at: usize, read: &mut Read) -> usize {
    let unfinished = |read: &mut Read| {
        read.whole = false;
        bytes.len()
    };
    loop {
        let rest = &bytes[at..];
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return unfinished(read);
        };
        let line = &rest[..line_end];
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        assert!(digits > 0, "a passed chunk-size line has no size");
        let size = line[..digits].iter().fold(0u64, |n, &b| {
            let d = (b as char).to_digit(16).unwrap_or(0);
            n.checked_mul(16)
                .and_then(|n| n.checked_add(u64::from(d)))
                .expect("a passed chunk size overflows")
        });
        at += line_end + 2;
        if size == 0 {
            let mut fields = [httparse::EMPTY_HEADER; 100];
            return match httparse::parse_headers(&bytes[at..], &mut fields) {
                Ok(httparse::Status::Complete((n, _))) => at + n,
                Ok(httparse::Status::Partial) => unfinished(read),
                Err(e) => panic!("passed trailers do not parse with httparse: {e:?}"),
            };
        }
        let left = bytes.len() - at;
        let n = usize::try_from(size).unwrap_or(usize::MAX).min(left);
        read.body.extend_from_slice(&bytes[at..at + n]);
        at += n;
        if (n as u64) < size {
            return unfinished(read);
        }
        match bytes.get(at..at + 2) {
            Some(b"\r\n") => at += 2,
            Some(other) => panic!("passed chunk data is followed by {other:?}, not CRLF"),
            None => return unfinished(read),
        }
    }
}
