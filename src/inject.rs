//! The request rewrite: strip what the client must not control, then inject the credential.
//!
//! Pure functions over `http` types, with no I/O, so that they are unit-tested here and measured
//! by `benches/hot_path.rs`. Stripping always runs before injecting, so that whatever the client
//! sent under the credential's name (in any case, repeated) is gone and exactly one credential
//! reaches the upstream.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme as UriScheme, Uri};
use zeroize::Zeroizing;

use crate::connection::{Connection, Credential, Scheme};

/// Headers that belong to one hop (`Connection`, `Keep-Alive`, `Proxy-Authenticate`,
/// `Proxy-Authorization`, `Proxy-Connection`, `TE`, `Trailer`, `Upgrade`) and framing headers
/// (`Content-Length`, `Transfer-Encoding`), never forwarded in either direction: hyper frames
/// the forwarded message itself from the body it is given, so that no CL/TE disagreement can
/// pass from one side to the other.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    // One string match (a length switch, then a compare) rather than ten name comparisons:
    // this runs for every header of every message.
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "transfer-encoding"
    )
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

/// What the rewrite was given about the destination.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub scheme: Scheme,
    /// `host` or `host:port`.
    pub authority: &'a Authority,
    /// Prepended to the client's path (a gateway request's base URL path); empty in forward form.
    pub path_prefix: &'a str,
}

/// Why a request cannot be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("the request path must start with '/'")]
    Path,
    #[error("the upstream URL would not be valid")]
    Uri,
}

/// Rewrites a request's head for the upstream: strips hop-by-hop headers and anything the
/// credential will set, sets the upstream URI, injects the credential and the connector's default
/// headers. `path_and_query` is the client's path and query. Returns the path to log, with the
/// credential's query value masked.
pub fn rewrite(
    parts: &mut http::request::Parts,
    path_and_query: &str,
    target: Target<'_>,
    connection: &Connection,
) -> Result<LogPath, RewriteError> {
    // An empty path with a query (`/conn?x=1` in gateway form, `http://host?x=1` in forward
    // form) is the root path with that query.
    if !path_and_query.is_empty() && !path_and_query.starts_with(['/', '?']) {
        return Err(RewriteError::Path);
    }
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    // The client's `Host` names latchkey (the pool sets the upstream's); `Expect:
    // 100-continue` was answered by latchkey's own server when it read the body.
    headers.remove(header::HOST);
    headers.remove(header::EXPECT);

    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let path = if path.is_empty() && target.path_prefix.is_empty() {
        "/"
    } else {
        path
    };

    // The path and query as the upstream will see them.
    let extra = match &connection.credential {
        Credential::Query { pair, .. } => pair.expose().len() + 1,
        Credential::Header { .. } => 0,
    };
    let mut upstream =
        String::with_capacity(target.path_prefix.len() + path_and_query.len() + extra);
    upstream.push_str(target.path_prefix);
    upstream.push_str(path);
    let query_param = match &connection.credential {
        Credential::Query { name, .. } => Some(name.as_str()),
        Credential::Header { .. } => None,
    };
    let mut first = true;
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            if let Some(param) = query_param {
                let name = pair.split_once('=').map_or(pair, |(n, _)| n);
                if percent_decoded_eq_ignore_case(name, param) {
                    continue;
                }
            }
            upstream.push(if first { '?' } else { '&' });
            first = false;
            upstream.push_str(pair);
        }
    }

    let (path_and_query, log_path) = match &connection.credential {
        Credential::Header { name, value } => {
            // `insert` replaces every value the client sent under this name.
            headers.insert(name.clone(), value.clone());
            // No secret in the path: the log shares it.
            let pq = PathAndQuery::from_maybe_shared(Bytes::from(upstream))
                .map_err(|_| RewriteError::Uri)?;
            (pq.clone(), LogPath::Shared(pq))
        }
        Credential::Query { name, pair } => {
            let mut log = String::with_capacity(upstream.len() + name.len() + 12);
            log.push_str(&upstream);
            log.push(if first { '?' } else { '&' });
            log.push_str(name);
            log.push_str("=<redacted>");
            // The capacity was reserved above, so pushing the pair never moves the buffer and
            // leaves no copy of the secret behind; the buffer is zeroized when dropped.
            let mut with_key = Zeroizing::new(upstream);
            with_key.push(if first { '?' } else { '&' });
            with_key.push_str(pair.expose());
            let pq = PathAndQuery::from_maybe_shared(Bytes::from_owner(ZeroizingString(with_key)))
                .map_err(|_| RewriteError::Uri)?;
            (pq, LogPath::Masked(log))
        }
    };
    for (name, value) in &connection.connector.headers {
        headers.entry(name).or_insert_with(|| value.clone());
    }

    let authority = target.authority.clone();
    let scheme = match target.scheme {
        Scheme::Http => UriScheme::HTTP,
        Scheme::Https => UriScheme::HTTPS,
    };
    parts.uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| RewriteError::Uri)?;
    parts.version = http::Version::HTTP_11;
    Ok(log_path)
}

/// The path the access log shows: the upstream path itself when it carries no secret, or a
/// copy with the credential's query value masked.
#[derive(Debug, Clone)]
pub enum LogPath {
    Shared(PathAndQuery),
    Masked(String),
}

impl LogPath {
    pub fn as_str(&self) -> &str {
        match self {
            LogPath::Shared(p) => p.as_str(),
            LogPath::Masked(s) => s,
        }
    }
}

impl std::fmt::Display for LogPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for LogPath {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Removes hop-by-hop and framing headers from an upstream response.
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

struct ZeroizingString(Zeroizing<String>);

impl AsRef<[u8]> for ZeroizingString {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode_into(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

/// Compares a raw query parameter name, percent- and plus-decoded, with `want`, ignoring ASCII
/// case, so that `KEY`, `k%65y` and `key` are all the credential's parameter.
fn percent_decoded_eq_ignore_case(raw: &str, want: &str) -> bool {
    let raw = raw.as_bytes();
    let want = want.as_bytes();
    let (mut i, mut j) = (0, 0);
    while i < raw.len() {
        let c = match raw[i] {
            b'%' if i + 2 < raw.len() => match (hex(raw[i + 1]), hex(raw[i + 2])) {
                (Some(h), Some(l)) => {
                    i += 3;
                    h << 4 | l
                }
                _ => {
                    i += 1;
                    b'%'
                }
            },
            b'+' => {
                i += 1;
                b' '
            }
            other => {
                i += 1;
                other
            }
        };
        if j >= want.len() || !c.eq_ignore_ascii_case(&want[j]) {
            return false;
        }
        j += 1;
    }
    j == want.len()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::connection::{ConnectionId, StoredConnection};
    use crate::secret::Secret;

    pub(crate) fn connection(fields: &[(&str, &str)]) -> Connection {
        let catalog = Catalog::builtin().unwrap();
        Connection::from_stored(
            ConnectionId::parse("c1").unwrap(),
            StoredConnection {
                fields: fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), Secret::new(*v)))
                    .collect(),
                version: 1,
                custom_metadata: Default::default(),
            },
            &catalog,
        )
        .unwrap()
    }

    fn request(headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri("/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn target(c: &Connection) -> Target<'_> {
        Target {
            scheme: c.base.scheme,
            authority: Box::leak(Box::new(Authority::from_static("api.example.com"))),
            path_prefix: &c.base.path,
        }
    }

    #[test]
    fn bearer_replaces_every_client_authorization() {
        let c = connection(&[("connector", "stripe"), ("api_key", "sk_test_ours")]);
        let mut p = request(&[
            ("Authorization", "Bearer theirs"),
            ("AUTHORIZATION", "Basic eA=="),
            ("authorization", "x"),
            ("Proxy-Authorization", "Basic Yzp0"),
            ("X-Other", "kept"),
        ]);
        let log = rewrite(&mut p, "/v1/charges?limit=3", target(&c), &c).unwrap();
        let auth: Vec<_> = p.headers.get_all("authorization").iter().collect();
        assert_eq!(auth.len(), 1);
        assert_eq!(auth[0], "Bearer sk_test_ours");
        assert!(auth[0].is_sensitive());
        assert!(p.headers.get("proxy-authorization").is_none());
        assert_eq!(p.headers["x-other"], "kept");
        assert_eq!(
            p.uri.to_string(),
            "https://api.example.com/v1/charges?limit=3"
        );
        assert_eq!(log, "/v1/charges?limit=3");
    }

    #[test]
    fn header_scheme_and_default_headers() {
        let c = connection(&[("connector", "anthropic"), ("api_key", "sk-ant-ours")]);
        let mut p = request(&[("X-Api-Key", "theirs"), ("x-api-key", "again")]);
        rewrite(&mut p, "/v1/messages", target(&c), &c).unwrap();
        let keys: Vec<_> = p.headers.get_all("x-api-key").iter().collect();
        assert_eq!(keys, vec!["sk-ant-ours"]);
        assert_eq!(p.headers["anthropic-version"], "2023-06-01");

        // A client's own version pin wins over the connector's default.
        let mut p = request(&[("Anthropic-Version", "2099-01-01")]);
        rewrite(&mut p, "/v1/messages", target(&c), &c).unwrap();
        assert_eq!(p.headers["anthropic-version"], "2099-01-01");
    }

    #[test]
    fn query_scheme_replaces_client_params_and_masks_the_log() {
        let c = connection(&[("connector", "google-maps"), ("api_key", "AIzaOURS")]);
        let mut p = request(&[]);
        let log = rewrite(
            &mut p,
            "/maps/api/geocode/json?key=theirs&address=x&KEY=2&k%65y=3&other=1",
            target(&c),
            &c,
        )
        .unwrap();
        assert_eq!(
            p.uri.to_string(),
            "https://api.example.com/maps/api/geocode/json?address=x&other=1&key=AIzaOURS"
        );
        assert_eq!(
            log,
            "/maps/api/geocode/json?address=x&other=1&key=<redacted>"
        );
        let mut p = request(&[]);
        rewrite(&mut p, "/p", target(&c), &c).unwrap();
        assert_eq!(p.uri.path_and_query().unwrap().as_str(), "/p?key=AIzaOURS");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let c = connection(&[("connector", "stripe"), ("api_key", "sk_test_ours")]);
        let mut p = request(&[
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "5"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Proxy-Connection", "keep-alive"),
            ("Host", "evil.example.com"),
            ("Expect", "100-continue"),
        ]);
        rewrite(&mut p, "/", target(&c), &c).unwrap();
        let names: Vec<_> = p.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["authorization"]);
    }

    #[test]
    fn base_path_prefix_and_empty_paths() {
        let c = connection(&[
            ("connector", "shopify"),
            ("store", "acme"),
            ("api_key", "shpat_00"),
        ]);
        let t = Target {
            scheme: c.base.scheme,
            authority: Box::leak(Box::new(Authority::from_static("acme.myshopify.com"))),
            path_prefix: &c.base.path,
        };
        let mut p = request(&[]);
        rewrite(&mut p, "/products.json", t, &c).unwrap();
        assert_eq!(
            p.uri.to_string(),
            "https://acme.myshopify.com/admin/api/2024-10/products.json"
        );
        let mut p = request(&[]);
        rewrite(
            &mut p,
            "",
            Target {
                path_prefix: "",
                ..t
            },
            &c,
        )
        .unwrap();
        assert_eq!(p.uri.path(), "/");
        let mut p = request(&[]);
        assert_eq!(rewrite(&mut p, "x", t, &c).err(), Some(RewriteError::Path));
        let mut p = request(&[]);
        rewrite(&mut p, "?a=1", t, &c).unwrap();
        assert_eq!(
            p.uri.path_and_query().unwrap().as_str(),
            "/admin/api/2024-10?a=1"
        );
        let mut p = request(&[]);
        rewrite(
            &mut p,
            "?a=1",
            Target {
                path_prefix: "",
                ..t
            },
            &c,
        )
        .unwrap();
        assert_eq!(p.uri.path_and_query().unwrap().as_str(), "/?a=1");
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
        for name in [
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
        ] {
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

    #[test]
    fn decoded_param_names() {
        assert!(percent_decoded_eq_ignore_case("key", "key"));
        assert!(percent_decoded_eq_ignore_case("KeY", "key"));
        assert!(percent_decoded_eq_ignore_case("%6bey", "key"));
        assert!(percent_decoded_eq_ignore_case("%4B%45%59", "key"));
        assert!(!percent_decoded_eq_ignore_case("keys", "key"));
        assert!(!percent_decoded_eq_ignore_case("ke", "key"));
        assert!(!percent_decoded_eq_ignore_case("k%", "key"));
        assert!(percent_decoded_eq_ignore_case("api+key", "api key"));
    }
}
