//! The request rewrite: strip what the client must not control, then inject the credential.
//!
//! Pure functions over `http` types, with no I/O, so that they are unit-tested here and measured
//! by `benches/hot_path.rs`. Stripping always runs before injecting, so that whatever the client
//! sent under the credential's name (in any case, repeated) is gone and exactly one credential
//! reaches the upstream.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme as UriScheme, Uri};
use zeroize::Zeroizing;

use crate::catalog::{Connector, Inject};
use crate::destination::Scheme;
use crate::hop_by_hop::strip_hop_by_hop;
use crate::secret::Secret;
use crate::telemetry::LogPath;

/// The credential, rendered once per connection load and cloned per request.
#[derive(Clone)]
pub enum Credential {
    /// A header, value marked sensitive and backed by a zeroizing buffer.
    Header {
        name: HeaderName,
        value: HeaderValue,
    },
    /// A query parameter: `name` and the percent-encoded `name=value` pair.
    Query { name: String, pair: Secret },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Header { name, .. } => write!(f, "Header({name}: <redacted>)"),
            Credential::Query { name, .. } => write!(f, "Query({name}=<redacted>)"),
        }
    }
}

impl Credential {
    /// Renders the connector's injection template with a connection's field values (`lookup`
    /// gives a field's value, secret or not). Every intermediate buffer that holds the secret is
    /// a [`Secret`], zeroized when dropped.
    pub fn render<'a>(
        connector: &Connector,
        lookup: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Credential, RenderError> {
        render(connector, &lookup)
    }

    /// The credential as it goes out, where that is a form of its own rather than the secret
    /// with something around it: a Basic pair's base64.
    pub fn sent_form(&self) -> Option<&[u8]> {
        match self {
            Credential::Header { value, .. } => value.as_bytes().strip_prefix(b"Basic "),
            Credential::Query { .. } => None,
        }
    }
}

/// Why a credential cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("required field {0:?} is missing")]
    MissingField(String),
    #[error("the credential cannot be sent: {0}")]
    Invalid(&'static str),
}

fn render<'a>(
    connector: &Connector,
    lookup: &dyn Fn(&str) -> Option<&'a str>,
) -> Result<Credential, RenderError> {
    let missing = RenderError::MissingField;
    let header = |name: HeaderName, text: Secret| -> Result<Credential, RenderError> {
        let mut value = HeaderValue::from_maybe_shared(text.into_shared_bytes()).map_err(|_| {
            RenderError::Invalid("the rendered header value is not a valid header value")
        })?;
        value.set_sensitive(true);
        Ok(Credential::Header { name, value })
    };
    match &connector.inject {
        Inject::Bearer { value } => {
            let mut out = String::from("Bearer ");
            let r = value.render(&mut out, lookup);
            let out = Secret::from(out);
            r.map_err(missing)?;
            header(http::header::AUTHORIZATION, out)
        }
        Inject::Header {
            header: name,
            value,
        } => {
            let mut out = String::new();
            let r = value.render(&mut out, lookup);
            let out = Secret::from(out);
            r.map_err(missing)?;
            header(name.clone(), out)
        }
        Inject::Basic { username, password } => {
            let mut pair = String::new();
            let r = username.render(&mut pair, lookup);
            let mut pair = Secret::from(pair);
            r.map_err(missing)?;
            if pair.expose().contains(':') {
                return Err(RenderError::Invalid("a Basic user name cannot contain ':'"));
            }
            let mut joined = String::with_capacity(pair.expose().len() + 64);
            joined.push_str(pair.expose());
            joined.push(':');
            let r = password.render(&mut joined, lookup);
            pair = Secret::from(joined);
            r.map_err(missing)?;
            let mut out = String::from("Basic ");
            base64::engine::general_purpose::STANDARD.encode_string(pair.expose(), &mut out);
            header(http::header::AUTHORIZATION, Secret::from(out))
        }
        Inject::Query { param, value } => {
            let mut raw = String::new();
            let r = value.render(&mut raw, lookup);
            let raw = Secret::from(raw);
            r.map_err(missing)?;
            let mut pair = String::with_capacity(param.len() + 1 + raw.expose().len() * 3);
            pair.push_str(param);
            pair.push('=');
            percent_encode_into(raw.expose(), &mut pair);
            Ok(Credential::Query {
                name: param.clone(),
                pair: Secret::from(pair),
            })
        }
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
    credential: &Credential,
    connector: &Connector,
) -> Result<LogPath, RewriteError> {
    // An empty path with a query (`/conn?x=1` in gateway form, `http://host?x=1` in forward
    // form) is the root path with that query.
    if !path_and_query.is_empty() && !path_and_query.starts_with(['/', '?']) {
        return Err(RewriteError::Path);
    }
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    // Which of the rarely sent names below are there: a walk of the few names is cheaper than
    // the hashed lookups that would find nothing.
    let (mut expect, mut range) = (false, false);
    for k in headers.keys() {
        expect |= k == header::EXPECT;
        range |= k == header::RANGE || k == header::IF_RANGE;
    }
    // The client's `Host` names latchkey (the pool sets the upstream's); `Expect:
    // 100-continue` was answered by latchkey's own server when it read the body.
    headers.remove(header::HOST);
    if expect {
        headers.remove(header::EXPECT);
    }
    // An answer is scanned for the credential on its way back: asked for as it is, not
    // compressed (one compressed anyway is decoded to be scanned).
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    // Nor in pieces: a range of an echo could hold part of the key where no whole form is
    // left to find. The whole answer comes back instead (RFC 9110 lets a server ignore
    // `Range`).
    if range {
        headers.remove(header::RANGE);
        headers.remove(header::IF_RANGE);
    }
    // Where the client's own key sits under another name than the service reads: gone, so
    // that only latchkey's credential reaches the service.
    for name in &connector.strip {
        headers.remove(name);
    }

    let (upstream, first) = upstream_path(path_and_query, target.path_prefix, credential);
    let (path_and_query, log_path) = match credential {
        Credential::Header { name, value } => {
            // `insert` replaces every value the client sent under this name; look-alikes that
            // servers read as the same name go too.
            strip_look_alikes(headers, name);
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
            // The capacity was reserved by `upstream_path`, so pushing the pair never moves
            // the buffer and leaves no copy of the secret behind; it is zeroized when dropped.
            let mut with_key = Zeroizing::new(upstream);
            with_key.push(if first { '?' } else { '&' });
            with_key.push_str(pair.expose());
            let pq = PathAndQuery::from_maybe_shared(Bytes::from_owner(ZeroizingString(with_key)))
                .map_err(|_| RewriteError::Uri)?;
            (pq, LogPath::Masked(log))
        }
    };
    for (name, value) in &connector.headers {
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

/// The path and query as the upstream will see them, before a query credential goes in: the
/// prefix, the client's path, and its query without any parameter of the credential's name.
/// Room for the credential is reserved. Also returns whether no query parameter was written.
fn upstream_path(path_and_query: &str, prefix: &str, credential: &Credential) -> (String, bool) {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let path = if path.is_empty() && prefix.is_empty() {
        "/"
    } else {
        path
    };
    let (query_param, extra) = match credential {
        Credential::Query { name, pair } => (Some(name.as_str()), pair.expose().len() + 1),
        Credential::Header { .. } => (None, 0),
    };
    let mut upstream = String::with_capacity(prefix.len() + path_and_query.len() + extra);
    upstream.push_str(prefix);
    upstream.push_str(path);
    let mut first = true;
    // A query that loses no parameter goes on as the client wrote it (a service may sign the
    // exact text); one whose credential parameter is replaced is rebuilt without it.
    if let (Some(query), None) = (query, query_param) {
        upstream.push('?');
        upstream.push_str(query);
        return (upstream, false);
    }
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        if query_param.is_some_and(|param| names_param(pair, param)) {
            continue;
        }
        upstream.push(if first { '?' } else { '&' });
        first = false;
        upstream.push_str(pair);
    }
    (upstream, first)
}

struct ZeroizingString(Zeroizing<String>);

impl AsRef<[u8]> for ZeroizingString {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Everything but RFC 3986's unreserved characters is percent-encoded in a query value.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Appends `value` to `out`, percent-encoded for a query value.
pub fn percent_encode_into(value: &str, out: &mut String) {
    for piece in percent_encoding::utf8_percent_encode(value, QUERY_VALUE) {
        out.push_str(piece);
    }
}

/// Removes headers that servers read as `name`: the same name with `_` for `-` (CGI, WSGI and
/// Rack turn both `X-Api-Key` and `X_Api_Key` into `HTTP_X_API_KEY`).
fn strip_look_alikes(headers: &mut http::HeaderMap, name: &HeaderName) {
    let want = name.as_str().as_bytes();
    if !want.contains(&b'-') {
        return;
    }
    let look_alikes: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str().as_bytes();
            k.len() == want.len()
                && k.contains(&b'_')
                && k.iter()
                    .zip(want)
                    .all(|(a, b)| a == b || (*a == b'_' && *b == b'-'))
        })
        .cloned()
        .collect();
    for k in look_alikes {
        headers.remove(k);
    }
}

/// Whether a query pair is, for some server, the credential's parameter `param`: its name
/// read as a form decoder reads it (`+` a space, then percent-decoded) and compared ignoring
/// case, as itself, as an array (`key[]`, `key[0]`, as PHP and Rails read them), or as any
/// piece of the pair split at `;` (a separator to some). PHP also drops leading spaces from a
/// name and reads `.`, ` ` and an unclosed `[` in it as `_`: where `param` has a `_`, any of
/// those matches it (`api.key`, `api+key`, `api[key` are `api_key` to PHP).
fn names_param(pair: &str, param: &str) -> bool {
    let param = param.as_bytes();
    pair.split(';').any(|piece| {
        let raw = piece.split_once('=').map_or(piece, |(n, _)| n);
        let name = form_decoded(raw);
        let name = name.trim_ascii_start();
        php_name_eq(name, param)
            || (name.len() > param.len()
                && php_name_eq(&name[..param.len()], param)
                && name[param.len()] == b'[')
    })
}

/// A query parameter name as a form decoder reads it: `+` is a space, then `%XX` a byte.
fn form_decoded(raw: &str) -> Cow<'_, [u8]> {
    if !raw.contains('+') {
        return percent_encoding::percent_decode_str(raw).into();
    }
    let spaced = raw.replace('+', " ");
    Cow::Owned(percent_encoding::percent_decode_str(&spaced).collect())
}

/// Whether the decoded name `name` is `want`, ignoring ASCII case, with `.`, ` ` or `[` read
/// as `_` where `want` has one.
fn php_name_eq(name: &[u8], want: &[u8]) -> bool {
    name.len() == want.len()
        && name.iter().zip(want).all(|(&n, &w)| {
            n.eq_ignore_ascii_case(&w) || (w == b'_' && matches!(n, b'.' | b' ' | b'['))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::connection::Connection;
    use crate::connection_id::ConnectionId;
    use crate::record::StoredConnection;

    /// The rewrite with a loaded connection's credential and connector.
    fn rewrite(
        parts: &mut http::request::Parts,
        path_and_query: &str,
        target: Target<'_>,
        c: &Connection,
    ) -> Result<LogPath, RewriteError> {
        super::rewrite(parts, path_and_query, target, &c.credential, &c.connector)
    }

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
                not_text: Vec::new(),
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

    /// Issue 10: look-alike names passed next to ours, and a server may read them as ours.
    #[test]
    fn look_alike_credential_names_are_removed() {
        let c = connection(&[("connector", "anthropic"), ("api_key", "sk-ant-ours")]);
        let mut p = request(&[
            ("X_Api_Key", "theirs"),
            ("x-api_key", "theirs"),
            ("X-Api-Key", "theirs"),
            ("x_other", "kept"),
        ]);
        rewrite(&mut p, "/v1/messages", target(&c), &c).unwrap();
        let names: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
        assert!(!names.contains(&"x_api_key"), "{names:?}");
        assert!(!names.contains(&"x-api_key"), "{names:?}");
        assert_eq!(p.headers.get_all("x-api-key").iter().count(), 1);
        assert_eq!(p.headers["x-api-key"], "sk-ant-ours");
        assert_eq!(p.headers["x_other"], "kept");

        let c = connection(&[("connector", "google-maps"), ("api_key", "AIzaOurs")]);
        let mut p = request(&[]);
        let q =
            "/geo?a=1&api_key=x&key[]=t1&KEY%5B0%5D=t2&x=1;key=t3&key;y=t4&keys=kept&keyx[]=kept";
        rewrite(&mut p, q, target(&c), &c).unwrap();
        let uri = p.uri.to_string();
        for theirs in ["t1", "t2", "t3", "t4"] {
            assert!(!uri.contains(theirs), "{theirs} in {uri}");
        }
        assert!(
            uri.contains("keys=kept") && uri.contains("keyx[]=kept"),
            "{uri}"
        );
        assert_eq!(uri.matches("key=AIzaOurs").count(), 1, "{uri}");
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
    fn a_connectors_strip_list_removes_the_sdks_own_key() {
        // The Anthropic SDK sends its (placeholder) key as Authorization: Bearer as well.
        let c = connection(&[("connector", "anthropic"), ("api_key", "sk-ant-ours")]);
        let mut p = request(&[
            ("Authorization", "Bearer sk-ant-placeholder"),
            ("authorization", "Bearer again"),
            ("x-api-key", "sk-ant-placeholder"),
        ]);
        rewrite(&mut p, "/v1/messages", target(&c), &c).unwrap();
        assert!(
            p.headers.get("authorization").is_none(),
            "{:?}",
            p.headers.keys()
        );
        let keys: Vec<_> = p.headers.get_all("x-api-key").iter().collect();
        assert_eq!(keys, vec!["sk-ant-ours"]);
        // A connector without a strip list leaves other headers alone.
        let c = connection(&[("connector", "stripe"), ("api_key", "sk_test_ours")]);
        let mut p = request(&[("x-api-key", "kept")]);
        rewrite(&mut p, "/v1/charges", target(&c), &c).unwrap();
        assert_eq!(p.headers["x-api-key"], "kept");
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
            ("Range", "bytes=9-23"),
            ("If-Range", "\"v1\""),
        ]);
        rewrite(&mut p, "/", target(&c), &c).unwrap();
        let names: Vec<_> = p.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["accept-encoding", "authorization"]);
        assert_eq!(p.headers["accept-encoding"], "identity");
        // Each alone goes too.
        for one in [
            ("Expect", "100-continue"),
            ("Range", "bytes=0-1"),
            ("If-Range", "\"v1\""),
            ("Host", "evil.example.com"),
        ] {
            let mut p = request(&[one, ("X-Kept", "1")]);
            rewrite(&mut p, "/", target(&c), &c).unwrap();
            let mut names: Vec<_> = p.headers.keys().map(|k| k.as_str()).collect();
            names.sort_unstable();
            assert_eq!(
                names,
                vec!["accept-encoding", "authorization", "x-kept"],
                "{one:?}"
            );
        }
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
        // A query that loses nothing goes on as written: empty pairs, a bare `?`.
        for (asked, sent) in [
            ("/p?a=1&&b=2&", "/admin/api/2024-10/p?a=1&&b=2&"),
            ("/p?", "/admin/api/2024-10/p?"),
            ("/p?a=%41;b", "/admin/api/2024-10/p?a=%41;b"),
        ] {
            let mut p = request(&[]);
            rewrite(&mut p, asked, t, &c).unwrap();
            assert_eq!(p.uri.path_and_query().unwrap().as_str(), sent);
        }
    }

    #[test]
    fn decoded_param_names() {
        for (pair, param) in [
            ("key", "key"),
            ("KeY=x", "key"),
            ("%6bey=x", "key"),
            ("%4B%45%59=x", "key"),
            ("key[]=x", "key"),
            ("KEY[0]=x", "key"),
            ("a=1;key=x", "key"),
            // PHP's reading of names: `.`, ` ` (or `+`), an unclosed `[` are `_`; leading
            // spaces go.
            ("api.key=x", "api_key"),
            ("api+key=x", "api_key"),
            ("api%20key=x", "api_key"),
            ("api[key=x", "api_key"),
            ("api%2ekey=x", "api_key"),
            ("API%5BKEY=x", "api_key"),
            ("+api_key=x", "api_key"),
            ("%20api_key=x", "api_key"),
            ("api.key[]=x", "api_key"),
        ] {
            assert!(names_param(pair, param), "{pair} is {param}");
        }
        for (pair, param) in [
            ("keys=x", "key"),
            ("ke=x", "key"),
            ("k%=x", "key"),
            ("k.y=x", "key"),
            ("api[key]=x", "api_key"),
            ("api_key=x", "api.key"),
            ("api%2bkey=x", "api_key"),
            ("apixkey=x", "api_key"),
            ("a=key", "key"),
        ] {
            assert!(!names_param(pair, param), "{pair} is not {param}");
        }
    }
}
