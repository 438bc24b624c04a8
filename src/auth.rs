//! Who may use which connection: the client token a request carries, and the `[[clients]]`
//! allow-lists.
//!
//! Tokens arrive in `Proxy-Authorization` (Basic or Bearer), are hashed with SHA-256 and compared
//! with every configured hash in constant time; the configuration holds only the hashes. With no
//! `[[clients]]`, latchkey is open (the configuration allows that only on loopback listeners).

use base64::Engine as _;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ClientConfig;
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

/// Hex SHA-256, as `token_sha256` values are written.
pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares a presented token with a stored hash in constant time.
pub fn token_matches(token: &Secret, hash: &[u8; 32]) -> bool {
    let digest = Sha256::digest(token.expose().as_bytes());
    bool::from(digest.as_slice().ct_eq(hash))
}

/// The configured clients.
#[derive(Debug, Clone, Default)]
pub struct Clients {
    clients: Vec<ClientConfig>,
}

impl Clients {
    pub fn new(clients: Vec<ClientConfig>) -> Self {
        Clients { clients }
    }

    /// No clients configured: every request is let through (loopback only).
    pub fn is_open(&self) -> bool {
        self.clients.is_empty()
    }

    /// The client whose token this is. Every hash is compared, matched or not.
    pub fn authenticate(&self, token: &Secret) -> Option<&ClientConfig> {
        let digest = Sha256::digest(token.expose().as_bytes());
        let mut found = None;
        for c in &self.clients {
            if bool::from(digest.as_slice().ct_eq(&c.token_sha256)) {
                found = Some(c);
            }
        }
        found
    }
}

impl ClientConfig {
    /// Whether this client may use the connection.
    pub fn may_use(&self, connection_id: &str) -> bool {
        self.connections.iter().any(|g| g.matches(connection_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::Glob;

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
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hash[2 * i..2 * i + 2], 16).unwrap();
        }
        let clients = Clients::new(vec![ClientConfig {
            name: std::sync::Arc::from("billing"),
            token_sha256: bytes,
            connections: vec![Glob::parse("stripe-*").unwrap()],
        }]);
        let c = clients.authenticate(&Secret::new("tok123")).unwrap();
        assert_eq!(&*c.name, "billing");
        assert!(c.may_use("stripe-prod"));
        assert!(!c.may_use("github-ci"));
        assert!(clients.authenticate(&Secret::new("tok124")).is_none());
        assert!(token_matches(&Secret::new("tok123"), &bytes));
    }
}
