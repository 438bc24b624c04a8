//! What the web page's sign-in reads from a browser's request (`src/admin/web.rs`): the session
//! ID in `Cookie` headers, and whether `Origin` names the host the request went to (its `Host`
//! header, or over HTTP/2 its `:authority`).
//!
//! Input: a first byte giving how many `Cookie` headers follow (0 to 3), then one line each,
//! then the `Origin`, `Host` and authority lines (an empty line: absent).
//!
//! Beyond "no panic":
//! - a session ID found is not empty, holds no `;`, and one of the
//!   `Cookie` headers holds `latchkey_session=ID`; none is found when no header holds
//!   `latchkey_session=` followed by something;
//! - with no `Origin` a request is same-origin; with one, it is exactly when the part after the
//!   first `://` equals, ignoring ASCII case, the `Host` (or, with no `Host`, the authority).

use http::uri::Authority;
use http::{header, HeaderMap, HeaderValue};
use latchkey::admin::fuzzing::{same_origin, session_cookie, COOKIE};

fn main() {
    afl::fuzz(true, |data: &[u8]| {
        let Some((&n, rest)) = data.split_first() else {
            return;
        };
        let mut lines = rest.split(|b| *b == b'\n');
        let mut headers = HeaderMap::new();
        let mut cookies = Vec::new();
        for _ in 0..n % 4 {
            let Some(line) = lines.next() else { return };
            let Ok(v) = HeaderValue::from_bytes(line) else {
                return;
            };
            cookies.push(line.to_vec());
            headers.append(header::COOKIE, v);
        }
        cookie(&headers, &cookies);

        let mut next = || lines.next().filter(|l| !l.is_empty());
        let (origin, host, authority) = (next(), next(), next());
        for (name, value) in [(header::ORIGIN, origin), (header::HOST, host)] {
            if let Some(v) = value {
                let Ok(v) = HeaderValue::from_bytes(v) else {
                    return;
                };
                headers.insert(name, v);
            }
        }
        let authority = authority.and_then(|a| Authority::try_from(a).ok());
        origin_check(&headers, origin, host, authority.as_ref());
    });
}

fn cookie(headers: &HeaderMap, cookies: &[Vec<u8>]) {
    let found = session_cookie(headers);
    let prefix = format!("{COOKIE}=");
    let text: Vec<String> = cookies
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    match found {
        Some(id) => {
            assert!(!id.is_empty(), "an empty session ID");
            assert!(!id.contains(';'), "{id:?} holds a ;");
            let pair = format!("{prefix}{id}");
            assert!(
                text.iter().any(|c| c.contains(&pair)),
                "{pair:?} is in none of {text:?}"
            );
        }
        None => {
            // No header that is text holds the name followed by a value.
            for (c, raw) in text.iter().zip(cookies) {
                if !visible(raw) {
                    continue;
                }
                for pair in c.split(';') {
                    let pair = pair.trim();
                    if let Some(v) = pair.strip_prefix(&prefix) {
                        assert!(v.is_empty(), "{pair:?} in {c:?} was not found");
                    }
                }
            }
        }
    }
}

fn origin_check(
    headers: &HeaderMap,
    origin: Option<&[u8]>,
    host: Option<&[u8]>,
    authority: Option<&Authority>,
) {
    let same = same_origin(headers, authority);
    let Some(origin) = origin else {
        assert!(same, "no Origin, yet not same-origin");
        return;
    };
    let text = |b: &[u8]| visible(b).then(|| String::from_utf8_lossy(b).into_owned());
    let target = match host {
        Some(h) => text(h),
        None => authority.map(|a| a.as_str().to_string()),
    };
    let want = match (text(origin), target) {
        (Some(o), Some(t)) => o
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(&t)),
        _ => false,
    };
    assert_eq!(
        same, want,
        "Origin {origin:?}, Host {host:?}, authority {authority:?}"
    );
}

/// What `HeaderValue::to_str` takes: visible ASCII, spaces and tabs.
fn visible(b: &[u8]) -> bool {
    b.iter().all(|c| *c == b'\t' || (0x20..0x7f).contains(c))
}
