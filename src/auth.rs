//! Who may use which connection: the client token a request carries, and the `[[clients]]`
//! allow-lists.
//!
//! Tokens arrive in `Proxy-Authorization` (Basic or Bearer), are hashed with SHA-256 and compared
//! with every configured hash in constant time; the configuration holds only the hashes. With no
//! `[[clients]]`, latchkey is open (the configuration allows that only on loopback listeners).

use std::fmt;

use base64::Engine as _;
use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::connection_id::ConnectionId;
use crate::secret::Secret;

/// What a `Proxy-Authorization` header carried.
pub struct ProxyCredentials {
    /// The Basic user name, if Basic was used (the connection ID in forward form).
    pub user: Option<String>,
    pub token: Secret,
}

/// Why a `Proxy-Authorization` header could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialsError {
    Missing,
    Malformed,
}

/// Reads `Proxy-Authorization: Basic base64(user:token)` or `Bearer token`.
pub fn proxy_credentials(headers: &HeaderMap) -> Result<ProxyCredentials, CredentialsError> {
    let mut values = headers.get_all(http::header::PROXY_AUTHORIZATION).iter();
    let value = values.next().ok_or(CredentialsError::Missing)?;
    if values.next().is_some() {
        return Err(CredentialsError::Malformed);
    }
    let value = value.to_str().map_err(|_| CredentialsError::Malformed)?;
    let (scheme, rest) = value
        .trim()
        .split_once(' ')
        .ok_or(CredentialsError::Malformed)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| CredentialsError::Malformed)?;
        let decoded =
            Secret::from(String::from_utf8(decoded).map_err(|_| CredentialsError::Malformed)?);
        let (user, token) = decoded
            .expose()
            .split_once(':')
            .ok_or(CredentialsError::Malformed)?;
        Ok(ProxyCredentials {
            user: Some(user.to_string()),
            token: Secret::new(token),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Ok(ProxyCredentials {
            user: None,
            token: Secret::new(rest),
        })
    } else {
        Err(CredentialsError::Malformed)
    }
}

/// Where, in gateway form, a client may put its token instead of `Proxy-Authorization`: the
/// places where connectors' credentials go (`Authorization`, each connector's header, each query
/// parameter). So an SDK with no way to add a header sends the client token as its API key.
#[derive(Debug, Clone, Default)]
pub struct TokenPlaces {
    headers: Vec<HeaderName>,
    query: Vec<String>,
}

/// Where a client token was found, to be removed before the request goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Header(HeaderName),
    Query(String),
}

impl TokenPlaces {
    /// `Authorization` always; then the given header names and query parameters, each once.
    pub fn new(
        headers: impl IntoIterator<Item = HeaderName>,
        query: impl IntoIterator<Item = String>,
    ) -> TokenPlaces {
        let mut places = TokenPlaces {
            headers: vec![http::header::AUTHORIZATION],
            query: Vec::new(),
        };
        for h in headers {
            if !places.headers.contains(&h) {
                places.headers.push(h);
            }
        }
        for q in query {
            if !places
                .query
                .iter()
                .any(|have| have.eq_ignore_ascii_case(&q))
            {
                places.query.push(q);
            }
        }
        places
    }

    /// Every value in these places that could be a token, with its place: a header's value
    /// after its scheme word (`Bearer`, `token`, `Token token=`) or the whole value, either half
    /// of a Basic pair, and a
    /// query parameter's decoded value.
    pub fn candidates(&self, headers: &HeaderMap, query: Option<&str>) -> Vec<(Secret, Place)> {
        let mut out = Vec::new();
        for name in &self.headers {
            for value in headers.get_all(name) {
                let Ok(value) = value.to_str() else { continue };
                let value = value.trim();
                // Either half of a Basic pair: the password where most services take their
                // key, the user name where the others do (`sk_live_...:`).
                if let Some((user, password)) = basic_pair(value) {
                    out.push((password, Place::Header(name.clone())));
                    out.push((user, Place::Header(name.clone())));
                    continue;
                }
                // `Bearer {token}`, `token {token}`, `Token token={token}`, or the bare token.
                let last = value.rsplit_once(' ').map_or(value, |(_, t)| t.trim());
                out.push((Secret::new(last), Place::Header(name.clone())));
                if let Some((_, after)) = last.split_once('=') {
                    out.push((Secret::new(after), Place::Header(name.clone())));
                }
            }
        }
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(param) = self.query.iter().find(|p| p.eq_ignore_ascii_case(name)) else {
                continue;
            };
            let decoded = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
            out.push((Secret::new(&*decoded), Place::Query(param.clone())));
        }
        out
    }
}

fn basic_pair(value: &str) -> Option<(Secret, Secret)> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let decoded = Secret::from(String::from_utf8(decoded).ok()?);
    let (user, password) = decoded.expose().split_once(':')?;
    Some((Secret::new(user), Secret::new(password)))
}

/// `path_and_query` without the query parameters named `param` (compared ignoring ASCII case).
pub fn without_query_param(path_and_query: &str, param: &str) -> String {
    without_query_pairs(path_and_query, |pair| {
        pair.split_once('=')
            .map_or(pair, |(n, _)| n)
            .eq_ignore_ascii_case(param)
    })
}

/// `path_and_query` without the query's empty pairs and those `drop` says go (`name=value`
/// as written); no `?` is left when no pair stays.
pub fn without_query_pairs(path_and_query: &str, drop: impl Fn(&str) -> bool) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let mut out = String::with_capacity(path_and_query.len());
    out.push_str(path);
    for pair in query.split('&').filter(|p| !p.is_empty() && !drop(p)) {
        out.push(if out.len() == path.len() { '?' } else { '&' });
        out.push_str(pair);
    }
    out
}

/// Hex SHA-256, as `token_sha256` values are written.
pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The candidate whose stored hash is the SHA-256 of `token`. Every hash is compared, in
/// constant time, whether one matched already or not, so the time taken says nothing about which
/// (or whether any) matched. Client tokens and admin tokens are both checked here.
pub fn find_by_token<'a, T>(
    token: &str,
    candidates: impl IntoIterator<Item = (&'a [u8; 32], T)>,
) -> Option<T> {
    let digest = Sha256::digest(token.as_bytes());
    let mut found = None;
    for (hash, item) in candidates {
        if bool::from(digest.as_slice().ct_eq(hash)) {
            found = Some(item);
        }
    }
    found
}

/// A configured client: its name (for the access log and metrics), the SHA-256 of its token,
/// and the connections it may use.
#[derive(Debug, Clone)]
pub struct Client {
    /// Shared, for the access log and metrics.
    pub name: std::sync::Arc<str>,
    pub token_sha256: [u8; 32],
    pub connections: Vec<Glob>,
}

/// The configured clients.
#[derive(Debug, Clone, Default)]
pub struct Clients {
    clients: Vec<Client>,
}

impl Clients {
    pub fn new(clients: Vec<Client>) -> Self {
        Clients { clients }
    }

    /// No clients configured: every request is let through (loopback only).
    pub fn is_open(&self) -> bool {
        self.clients.is_empty()
    }

    /// The client with this token hash, as configured now (a tunnel's client, authenticated at
    /// its CONNECT, looked up again after a reload).
    pub fn by_token_hash(&self, hash: &[u8; 32]) -> Option<&Client> {
        self.clients.iter().find(|c| c.token_sha256 == *hash)
    }

    /// The client whose token this is. Every hash is compared, matched or not.
    pub fn authenticate(&self, token: &Secret) -> Option<&Client> {
        find_by_token(
            token.expose(),
            self.clients.iter().map(|c| (&c.token_sha256, c)),
        )
    }
}

impl Client {
    /// Whether this client may use the connection.
    pub fn may_use(&self, connection_id: &str) -> bool {
        self.connections.iter().any(|g| g.matches(connection_id))
    }
}

/// A connection ID pattern of a client's allow-list: an ID, or one with `*` (any run of
/// characters) and `?` (one character).
#[derive(Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn parse(s: &str) -> Result<Glob, String> {
        let ok = !s.is_empty()
            && s.len() <= ConnectionId::MAX_LEN
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*' | '?'));
        if ok {
            Ok(Glob(s.to_string()))
        } else {
            Err(format!(
                "{s:?} is not a connection pattern (connection ID characters, '*' and '?')"
            ))
        }
    }

    pub fn matches(&self, id: &str) -> bool {
        wildcard_match(self.0.as_bytes(), id.as_bytes())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// `*` and `?` matching without recursion: linear in practice, never exponential.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::PROXY_AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn reads_basic_and_bearer() {
        let c = proxy_credentials(&headers("Basic c3RyaXBlLXByb2Q6dG9rMTIz")).unwrap();
        assert_eq!(c.user.as_deref(), Some("stripe-prod"));
        assert_eq!(c.token.expose(), "tok123");
        let c = proxy_credentials(&headers("bearer tok123")).unwrap();
        assert_eq!(c.user, None);
        assert_eq!(c.token.expose(), "tok123");
        assert_eq!(
            proxy_credentials(&HeaderMap::new()).err(),
            Some(CredentialsError::Missing)
        );
        for bad in ["Basic !!!", "Digest x", "Basic", "Basic bm9jb2xvbg=="] {
            assert_eq!(
                proxy_credentials(&headers(bad)).err(),
                Some(CredentialsError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn authenticates_by_hash() {
        let hash = sha256_hex("tok123");
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&hash, &mut bytes).unwrap();
        let clients = Clients::new(vec![Client {
            name: std::sync::Arc::from("billing"),
            token_sha256: bytes,
            connections: vec![Glob::parse("stripe-*").unwrap()],
        }]);
        let c = clients.authenticate(&Secret::new("tok123")).unwrap();
        assert_eq!(&*c.name, "billing");
        assert!(c.may_use("stripe-prod"));
        assert!(!c.may_use("github-ci"));
        assert!(clients.authenticate(&Secret::new("tok124")).is_none());
        let named = [(&bytes, "first"), (&[0u8; 32], "second")];
        assert_eq!(find_by_token("tok123", named), Some("first"));
        assert_eq!(find_by_token("tok124", named), None);
    }

    #[test]
    fn token_candidates_come_from_every_credential_place() {
        let places = TokenPlaces::new([HeaderName::from_static("x-api-key")], ["key".to_string()]);
        let mut h = HeaderMap::new();
        h.append("authorization", "Bearer tok-a".parse().unwrap());
        h.append("x-api-key", "tok-b".parse().unwrap());
        h.append("x-other", "tok-c".parse().unwrap());
        let found = places.candidates(&h, Some("a=1&KEY=tok%2Dd&b=2"));
        let got: Vec<(&str, Place)> = found.iter().map(|(t, p)| (t.expose(), p.clone())).collect();
        assert_eq!(
            got,
            vec![
                ("tok-a", Place::Header(http::header::AUTHORIZATION)),
                ("tok-b", Place::Header(HeaderName::from_static("x-api-key"))),
                ("tok-d", Place::Query("key".into())),
            ]
        );
        let mut h = HeaderMap::new();
        h.insert("authorization", "Basic dXNlcjp0b2stZQ==".parse().unwrap());
        assert_eq!(places.candidates(&h, None)[0].0.expose(), "tok-e");
        h.insert("authorization", "Token token=tok-f".parse().unwrap());
        let found = places.candidates(&h, None);
        assert!(found.iter().any(|(t, _)| t.expose() == "tok-f"));
    }

    #[test]
    fn a_query_parameter_is_removed_in_any_case() {
        assert_eq!(without_query_param("/p?a=1&Key=x&b=2", "key"), "/p?a=1&b=2");
        assert_eq!(without_query_param("/p?key=x", "key"), "/p");
        assert_eq!(without_query_param("/p?key=x&a", "key"), "/p?a");
        assert_eq!(without_query_param("/p", "key"), "/p");
    }

    #[test]
    fn globs() {
        let g = Glob::parse("stripe-*").unwrap();
        assert!(g.matches("stripe-prod"));
        assert!(g.matches("stripe-"));
        assert!(!g.matches("stripe"));
        assert!(!g.matches("xstripe-prod"));
        assert!(Glob::parse("*").unwrap().matches("anything"));
        assert!(Glob::parse("a?c").unwrap().matches("abc"));
        assert!(!Glob::parse("a?c").unwrap().matches("abbc"));
        assert!(Glob::parse("*-prod-*").unwrap().matches("x-prod-y"));
        assert!(Glob::parse("a*b*c").unwrap().matches("aXXbYYc"));
        assert!(!Glob::parse("a*b*c").unwrap().matches("aXXbYY"));
        for bad in ["", "stripe-[", "a/b", "a b"] {
            assert!(Glob::parse(bad).is_err(), "{bad:?}");
        }
    }
}
