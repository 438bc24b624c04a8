//! Hop-by-hop and framing headers: which they are, and taking them off a message.
//!
//! `Connection`, `Keep-Alive`, `Proxy-Authenticate`, `Proxy-Authorization`, `Proxy-Connection`,
//! `TE`, `Trailer`, `Upgrade`, every header that `Connection` names, and the framing headers
//! `Content-Length` and `Transfer-Encoding` belong to one hop and are never forwarded, in either
//! direction: each side frames the message it sends from the body itself, so that no CL/TE
//! disagreement can pass from one side to the other. One rule for requests and responses, and
//! for the HTTP/1.1 client that leaves them out while it parses. (A WebSocket handshake is
//! stripped too; the websocket module then writes its own `Upgrade` and `Connection`.)

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that belong to one hop (`Connection`, `Keep-Alive`, `Proxy-Authenticate`,
/// `Proxy-Authorization`, `Proxy-Connection`, `TE`, `Trailer`, `Upgrade`) and framing headers
/// (`Content-Length`, `Transfer-Encoding`), never forwarded in either direction: hyper frames
/// the forwarded message itself from the body it is given, so that no CL/TE disagreement can
/// pass from one side to the other.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_bytes(name.as_str().as_bytes())
}

/// [`is_hop_by_hop`] for a name still in bytes (any case), as a parser has it before it builds a
/// `HeaderName`: what it would leave out costs no name built. One length switch, then a compare
/// or two, rather than ten name comparisons: this runs for every header of every message.
pub fn is_hop_by_hop_bytes(name: &[u8]) -> bool {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    match name.len() {
        2 => is(b"te"),
        7 => is(b"trailer") || is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        14 => is(b"content-length"),
        16 => is(b"proxy-connection"),
        17 => is(b"transfer-encoding"),
        18 => is(b"proxy-authenticate"),
        19 => is(b"proxy-authorization"),
        _ => false,
    }
}

/// Removes hop-by-hop and framing headers, and every header that `Connection` names.
///
/// One pass over the names present decides what must go: a message that carries none of them
/// (most requests without a body) costs no hash lookup, and one that does (a response's
/// `Content-Length`, a `Connection: keep-alive`) one removal per name present, not ten.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // The names present, found in one pass; only what is there is removed.
    let mut present: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if is_hop_by_hop(name) {
            present.push(name.clone());
        }
    }
    if present.is_empty() {
        return;
    }
    if present.contains(&header::CONNECTION) {
        for value in headers.get_all(header::CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for name in value.split(',') {
                let name = name.trim();
                if name.is_empty()
                    || name.eq_ignore_ascii_case("keep-alive")
                    || name.eq_ignore_ascii_case("close")
                {
                    // Connection options, not header names (keep-alive is removed anyway).
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    present.push(name);
                }
            }
        }
        present.push(HeaderName::from_static("keep-alive"));
    }
    for name in present {
        headers.remove(name);
    }
}

/// The header latchkey marks its own error answers with (`Latchkey-Error`, PRODUCT.md section
/// 4), in bytes of any case. An upstream's is never passed on, so that a client can trust it to
/// tell latchkey's errors from the upstream's; it is not hop-by-hop, and only answers lose it.
#[inline]
pub fn is_latchkey_error(name: &[u8]) -> bool {
    name.len() == 14 && name.eq_ignore_ascii_case(b"latchkey-error")
}

/// Removes an upstream's `Latchkey-Error` from its headers or trailers
/// ([`is_latchkey_error`]).
pub fn strip_latchkey_error(headers: &mut HeaderMap) {
    if headers
        .keys()
        .any(|n| is_latchkey_error(n.as_str().as_bytes()))
    {
        headers.remove("latchkey-error");
    }
}

/// Removes hop-by-hop and framing headers from an upstream response, and its
/// `Latchkey-Error` ([`is_latchkey_error`]).
///
/// The answer to a `HEAD` (`to_head`) keeps its `Content-Length` when that is one plain
/// number: there it frames nothing and tells the client the size of what a `GET` would return,
/// which is what it asked. (hyper leaves `Content-Length` out of 304 and 204 answers itself.)
pub fn strip_response(headers: &mut HeaderMap, to_head: bool) {
    let length = if to_head {
        single_content_length(headers)
    } else {
        None
    };
    strip_latchkey_error(headers);
    strip_hop_by_hop(headers);
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, length);
    }
}

/// The `Content-Length` value when there is exactly one and it is a plain decimal number.
fn single_content_length(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let digits = value.as_bytes();
    let plain = !digits.is_empty() && digits.len() <= 19 && digits.iter().all(u8::is_ascii_digit);
    plain.then(|| value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every hop-by-hop and framing header name.
    const HOP_BY_HOP: [&str; 10] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "transfer-encoding",
    ];

    /// The byte form says what the `HeaderName` form says, for every hop-by-hop name in any
    /// case, names one byte off them, and names of every other length.
    #[test]
    fn hop_by_hop_bytes_agrees_with_the_header_name_check() {
        let mut names: Vec<String> = Vec::new();
        for h in HOP_BY_HOP {
            let rest = h.get(1..).unwrap();
            names.push(h.to_string());
            names.push(h.to_ascii_uppercase());
            names.push(format!(
                "{}{rest}",
                h.get(..1).unwrap().to_ascii_uppercase()
            ));
            names.push(format!("{h}s"));
            names.push(rest.to_string());
            names.push(format!("x{rest}"));
            names.push(h.replace('-', "_"));
        }
        names.extend(
            [
                "host",
                "content-type",
                "date",
                "server",
                "tee",
                "t",
                "x-upgrade",
                "proxy",
            ]
            .map(String::from),
        );
        for n in &names {
            let by_name = HeaderName::from_bytes(n.as_bytes())
                .map(|name| is_hop_by_hop(&name))
                .unwrap();
            assert_eq!(is_hop_by_hop_bytes(n.as_bytes()), by_name, "{n}");
        }
    }

    #[test]
    fn a_head_answer_keeps_one_plain_content_length_and_nothing_else_framing() {
        let answer = |lengths: &[&str]| {
            let mut h = HeaderMap::new();
            for v in lengths {
                h.append(header::CONTENT_LENGTH, v.parse().unwrap());
            }
            h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
            h.insert(header::CONNECTION, "keep-alive".parse().unwrap());
            h
        };
        let lengths = |h: &HeaderMap| -> Vec<String> {
            h.get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect()
        };

        let mut h = answer(&["5678"]);
        strip_response(&mut h, true);
        assert_eq!(lengths(&h), ["5678"]);
        assert!(!h.contains_key(header::TRANSFER_ENCODING));
        assert!(!h.contains_key(header::CONNECTION));

        // Not to a HEAD: the body's framing is hyper's to write.
        let mut h = answer(&["5678"]);
        strip_response(&mut h, false);
        assert!(lengths(&h).is_empty());

        // Two values, or one that is not a plain number: dropped.
        for bad in [
            &["1", "2"][..],
            &["12, 12"],
            &["-1"],
            &["0x10"],
            &[""],
            &["99999999999999999999"],
        ] {
            let mut h = answer(bad);
            strip_response(&mut h, true);
            assert!(lengths(&h).is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn hop_by_hop_names() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "authorization",
            "host",
            "content-type",
            "x-connection",
            "trailers",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, close, X-Drop".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-drop", "1".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            vec!["x-keep"]
        );
    }
}
