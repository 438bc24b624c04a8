//! A connection as latchkey uses it: a stored record checked against its connector, with its
//! base URL, the hosts its credential may reach, and the credential rendered once, so that the
//! request path only clones it.
//!
//! [`Connection::from_stored`] refuses a record that could not be used safely (control
//! characters, a sandbox key on a production connection, a templated base URL that a field value
//! would move to another host), naming the field and never its value.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use time::OffsetDateTime;

use crate::catalog::{Catalog, Connector};
use crate::connection_id::ConnectionId;
use crate::destination::{BaseUrl, HostAllowList, Scheme};
use crate::inject::{Credential, RenderError};
use crate::record::{StoredConnection, RESERVED_FIELDS};
use crate::scrub::Scrubber;
use crate::secret::Secret;

/// A usable connection.
pub struct Connection {
    pub id: ConnectionId,
    pub connector: Arc<Connector>,
    pub name: Option<String>,
    pub environment: Option<String>,
    pub base: BaseUrl,
    pub hosts: HostAllowList,
    pub expires_at: Option<OffsetDateTime>,
    pub version: u64,
    /// Non-secret connector fields, by name.
    pub fields: BTreeMap<String, String>,
    /// Names of the secret fields that are set.
    pub secret_fields: Vec<String>,
    pub credential: Credential,
    /// The forms of the credential that must not come back to the client (None when the
    /// connection has no secret).
    pub scrubber: Option<Arc<Scrubber>>,
    pub custom_metadata: BTreeMap<String, String>,
    /// Its status says an upstream refused its key (`failed`): as read, and as latchkey
    /// recorded since (the failure is written after the re-read that follows a 401).
    pub failed: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("connector", &self.connector.id)
            .field("base", &self.base.to_string())
            .field("version", &self.version)
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

/// Why a stored connection cannot be used. Messages name fields, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    #[error("the connection has no `connector` field")]
    MissingConnector,
    #[error("connector {0:?} is not in the catalog")]
    UnknownConnector(String),
    #[error("field {field:?} is not a field of connector {connector:?} (its fields: {known})")]
    UnknownField {
        field: String,
        connector: String,
        known: String,
    },
    #[error("required field {0:?} is missing")]
    MissingField(String),
    #[error(
        "field {0:?} contains control characters (CR, LF, NUL ...); save it again without them"
    )]
    ControlCharacters(String),
    #[error("field {0:?} contains whitespace inside the value; save it again without it")]
    InnerWhitespace(String),
    #[error("field {0:?} holds characters outside ASCII; API keys are ASCII, and one that is not is sent as bytes that an upstream reads in its own encoding (and may echo in a form not scrubbed)")]
    NotAscii(String),
    #[error("field {0:?} does not match the connector's pattern for it")]
    Pattern(String),
    #[error("field {field:?} looks like a {key_env} key, but the connection's environment is {connection_env}")]
    EnvironmentMismatch {
        field: String,
        key_env: String,
        connection_env: String,
    },
    #[error("base_url is a {url_env} URL, but the connection's environment is {connection_env}")]
    BaseUrlEnvironment {
        url_env: String,
        connection_env: String,
    },
    #[error("field {field:?} looks like a {key_env} key, but base_url is a {url_env} URL")]
    KeyUrlMismatch {
        field: String,
        key_env: String,
        url_env: String,
    },
    #[error("base_url: {0}")]
    BaseUrl(String),
    #[error("field {0:?} is used in the base URL and may only hold letters, digits, '.', '-', '_' and '~'")]
    UnsafeUrlValue(String),
    #[error("allowed_hosts: {0}")]
    AllowedHosts(String),
    #[error("expires_at is not an RFC 3339 time (e.g. 2026-12-31T00:00:00Z)")]
    ExpiresAt,
    #[error("{0}")]
    Credential(RenderError),
    #[error("field {0:?} is stored as a list or an object, not as text; save it again as text")]
    NotText(String),
}

impl ConnectionError {
    /// The field the error is about, for answers that name it.
    pub fn field(&self) -> &str {
        match self {
            ConnectionError::MissingConnector | ConnectionError::UnknownConnector(_) => "connector",
            ConnectionError::UnknownField { field, .. }
            | ConnectionError::EnvironmentMismatch { field, .. }
            | ConnectionError::KeyUrlMismatch { field, .. } => field,
            ConnectionError::MissingField(f)
            | ConnectionError::ControlCharacters(f)
            | ConnectionError::InnerWhitespace(f)
            | ConnectionError::NotAscii(f)
            | ConnectionError::Pattern(f)
            | ConnectionError::UnsafeUrlValue(f)
            | ConnectionError::NotText(f) => f,
            ConnectionError::BaseUrlEnvironment { .. } | ConnectionError::BaseUrl(_) => "base_url",
            ConnectionError::AllowedHosts(_) => "allowed_hosts",
            ConnectionError::ExpiresAt => "expires_at",
            ConnectionError::Credential(_) => "fields",
        }
    }
}

/// Checks the environment a connection claims against what its key and base URL look like:
/// a sandbox key on a production connection, or a production key with a sandbox URL, is
/// refused rather than left to fail with a confusing 401.
pub fn check_environment(
    connector: &Connector,
    environment: Option<&str>,
    key: Option<(&str, &str)>,
    base_url: &str,
) -> Result<(), ConnectionError> {
    let key_env = key.and_then(|(field, value)| Some((field, connector.environment_of(value)?)));
    let url_env = connector.environment_of_url(base_url);
    if let Some(env) = environment.filter(|e| connector.knows_environment(e)) {
        if let Some((field, key_env)) = key_env.filter(|(_, k)| !k.eq_ignore_ascii_case(env)) {
            return Err(ConnectionError::EnvironmentMismatch {
                field: field.to_string(),
                key_env: key_env.to_string(),
                connection_env: env.to_string(),
            });
        }
        if let Some(url_env) = url_env.filter(|u| !u.eq_ignore_ascii_case(env)) {
            return Err(ConnectionError::BaseUrlEnvironment {
                url_env: url_env.to_string(),
                connection_env: env.to_string(),
            });
        }
    }
    if let (Some((field, k)), Some(u)) = (key_env, url_env) {
        if k != u {
            return Err(ConnectionError::KeyUrlMismatch {
                field: field.to_string(),
                key_env: k.to_string(),
                url_env: u.to_string(),
            });
        }
    }
    Ok(())
}

/// Trims what a paste leaves around a value and refuses what must never reach a header.
/// Returns the clean value and whether anything was trimmed.
pub fn clean_value<'a>(
    field: &str,
    value: &'a str,
    secret: bool,
) -> Result<(&'a str, bool), ConnectionError> {
    let trimmed = value.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\r' || c == '\n');
    if trimmed.chars().any(|c| c.is_control()) {
        return Err(ConnectionError::ControlCharacters(field.to_string()));
    }
    if secret && trimmed.chars().any(char::is_whitespace) {
        return Err(ConnectionError::InnerWhitespace(field.to_string()));
    }
    if secret && !trimmed.is_ascii() {
        return Err(ConnectionError::NotAscii(field.to_string()));
    }
    Ok((trimmed, trimmed.len() != value.len()))
}

impl Connection {
    /// Checks a stored connection against its connector and renders its credential.
    pub fn from_stored(
        id: ConnectionId,
        stored: StoredConnection,
        catalog: &Catalog,
    ) -> Result<Connection, ConnectionError> {
        let StoredConnection {
            fields: raw,
            version,
            custom_metadata,
            not_text,
        } = stored;
        if let Some(field) = not_text.into_iter().next() {
            return Err(ConnectionError::NotText(field));
        }
        let connector_id = raw
            .get("connector")
            .map(|s| s.expose().trim().to_string())
            .ok_or(ConnectionError::MissingConnector)?;
        let connector = catalog
            .get(&connector_id)
            .cloned()
            .ok_or(ConnectionError::UnknownConnector(connector_id))?;

        let Fields {
            mut plain,
            secrets,
            reserved,
        } = Fields::split(&connector, raw)?;
        fill_defaults(&connector, &mut plain, &secrets)?;
        let environment = reserved
            .get("environment")
            .filter(|s| !s.is_empty())
            .cloned();
        let base = base_url(&connector, &reserved, &plain)?;
        let primary = connector
            .primary_secret()
            .and_then(|f| Some((f.name.as_str(), secrets.get(&f.name)?.expose())));
        check_environment(
            &connector,
            environment.as_deref(),
            primary,
            &base.to_string(),
        )?;
        let hosts = allowed_hosts(&connector, &base, &reserved)?;
        let expires_at = match reserved.get("expires_at").filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(
                OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| ConnectionError::ExpiresAt)?,
            ),
        };
        let lookup = |f: &str| {
            secrets
                .get(f)
                .map(Secret::expose)
                .or_else(|| plain.get(f).map(String::as_str))
        };
        let credential = Credential::render(&connector, lookup)?;
        let scrubber = Scrubber::new(
            secrets.values().map(|s| s.expose().as_bytes()),
            credential.sent_form(),
            id.as_str(),
        );

        Ok(Connection {
            id,
            name: reserved.get("name").cloned(),
            environment,
            base,
            hosts,
            expires_at,
            version,
            secret_fields: secrets.keys().cloned().collect(),
            fields: plain,
            credential,
            scrubber,
            failed: custom_metadata
                .get("status")
                .is_some_and(|s| s == "failed")
                .into(),
            custom_metadata,
            connector,
        })
    }
}

impl Connection {
    /// Remembers the key of `previous`, the version of this connection that this one replaces
    /// in the cache, so that an upstream echoing the replaced key (still valid at the service
    /// for a while, often) does not hand it to the client: the scrubber finds both. Nothing
    /// changes when `previous` is another connection or this very version.
    pub fn remember_previous(&mut self, previous: &Connection) {
        if previous.id != self.id || previous.version == self.version {
            return;
        }
        let Some(before) = previous.scrubber.as_deref() else {
            return;
        };
        if let Some(now) = &self.scrubber {
            self.scrubber = now.and_previous(before).or_else(|| self.scrubber.clone());
        }
    }

    /// Whether the credential may go to `host` on `port`: the base URL's own port on its host,
    /// an allowed host's own port or else the base URL scheme's. Never another port.
    pub fn allows_port(&self, host: &str, port: u16) -> bool {
        self.hosts.allows_at(host, port)
    }

    /// Where the credential may go, without the credential: for an index of which connection
    /// covers which host and port.
    pub fn reach(&self) -> Reach {
        Reach {
            id: self.id.clone(),
            hosts: self.hosts.clone(),
            https: self.base.scheme == Scheme::Https,
        }
    }
}

/// A connection's hosts and ports, and nothing secret.
#[derive(Debug, Clone)]
pub struct Reach {
    pub id: ConnectionId,
    hosts: HostAllowList,
    /// The base URL is https: a request goes over TLS whatever scheme it named.
    https: bool,
}

impl Reach {
    /// Whether the connection's credential may go to `host` on the port a request that named
    /// `scheme` and `port` is sent to ([`crate::destination::sent_to`], the proxy's own rule).
    pub fn covers(&self, host: &str, port: Option<u16>, scheme: Scheme) -> bool {
        let (_, port) = crate::destination::sent_to(self.https, scheme, port);
        self.hosts.allows_at(host, port)
    }
}

/// A stored record's fields, cleaned and sorted by kind.
struct Fields {
    /// Non-secret connector fields.
    plain: BTreeMap<String, String>,
    secrets: BTreeMap<String, Secret>,
    /// The reserved fields (`name`, `base_url`, ...).
    reserved: BTreeMap<&'static str, String>,
}

impl Fields {
    /// Cleans every field and sorts it; a field the connector does not have, a value with
    /// control characters, or a non-secret value off its pattern is refused.
    fn split(
        connector: &Connector,
        raw: BTreeMap<String, Secret>,
    ) -> Result<Fields, ConnectionError> {
        let mut fields = Fields {
            plain: BTreeMap::new(),
            secrets: BTreeMap::new(),
            reserved: BTreeMap::new(),
        };
        for (name, value) in &raw {
            if let Some(r) = RESERVED_FIELDS.iter().find(|r| **r == name) {
                let (v, _) = clean_value(name, value.expose(), false)?;
                fields.reserved.insert(r, v.to_string());
                continue;
            }
            let Some(field) = connector.field(name) else {
                return Err(ConnectionError::unknown_field(connector, name));
            };
            let (v, _) = clean_value(name, value.expose(), field.secret)?;
            if field.secret {
                fields.secrets.insert(name.clone(), Secret::new(v));
            } else {
                if let Some(p) = &field.pattern {
                    if !v.is_empty() && !p.is_match(v) {
                        return Err(ConnectionError::Pattern(name.clone()));
                    }
                }
                fields.plain.insert(name.clone(), v.to_string());
            }
        }
        Ok(fields)
    }
}

/// Gives absent non-secret fields their defaults; refuses a missing required field.
fn fill_defaults(
    connector: &Connector,
    plain: &mut BTreeMap<String, String>,
    secrets: &BTreeMap<String, Secret>,
) -> Result<(), ConnectionError> {
    for f in &connector.fields {
        let present = if f.secret {
            secrets.get(&f.name).is_some_and(|s| !s.is_empty())
        } else {
            plain.get(&f.name).is_some_and(|s| !s.is_empty())
        };
        if !present {
            if let (false, Some(d)) = (f.secret, &f.default) {
                plain.insert(f.name.clone(), d.clone());
            } else if f.required {
                return Err(ConnectionError::MissingField(f.name.clone()));
            }
        }
    }
    Ok(())
}

/// The connection's own `base_url`, or the connector's template filled with field values that
/// cannot move it to another host.
fn base_url(
    connector: &Connector,
    reserved: &BTreeMap<&str, String>,
    plain: &BTreeMap<String, String>,
) -> Result<BaseUrl, ConnectionError> {
    if let Some(url) = reserved.get("base_url").filter(|s| !s.is_empty()) {
        return BaseUrl::parse(url).map_err(ConnectionError::BaseUrl);
    }
    let template = connector.base_url.as_ref().ok_or_else(|| {
        ConnectionError::BaseUrl(format!(
            "connector {:?} has no base URL of its own; the connection must set base_url",
            connector.id
        ))
    })?;
    for f in template.fields() {
        let v = plain.get(f).map(String::as_str).unwrap_or("");
        if !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            return Err(ConnectionError::UnsafeUrlValue(f.to_string()));
        }
    }
    let mut url = String::new();
    template
        .render(&mut url, |f| plain.get(f).map(String::as_str))
        .map_err(ConnectionError::MissingField)?;
    BaseUrl::parse(&url).map_err(ConnectionError::BaseUrl)
}

/// The base URL's host, the connector's allowed hosts and the connection's own.
fn allowed_hosts(
    connector: &Connector,
    base: &BaseUrl,
    reserved: &BTreeMap<&str, String>,
) -> Result<HostAllowList, ConnectionError> {
    let mut hosts = HostAllowList::new(&base.host, base.port, base.scheme.default_port());
    for h in &connector.allowed_hosts {
        hosts.push(h).map_err(ConnectionError::AllowedHosts)?;
    }
    if let Some(extra) = reserved.get("allowed_hosts") {
        for h in extra.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            hosts.push(h).map_err(ConnectionError::AllowedHosts)?;
        }
    }
    Ok(hosts)
}

impl ConnectionError {
    /// A field the connector does not have, with the ones it does.
    pub fn unknown_field(connector: &Connector, name: &str) -> ConnectionError {
        ConnectionError::UnknownField {
            field: name.to_string(),
            connector: connector.id.clone(),
            known: connector
                .fields
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

impl From<RenderError> for ConnectionError {
    fn from(e: RenderError) -> Self {
        match e {
            RenderError::MissingField(f) => ConnectionError::MissingField(f),
            other => ConnectionError::Credential(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn stored(fields: &[(&str, &str)]) -> StoredConnection {
        StoredConnection {
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), Secret::new(*v)))
                .collect(),
            version: 1,
            custom_metadata: BTreeMap::new(),
            not_text: Vec::new(),
        }
    }

    fn load(fields: &[(&str, &str)]) -> Result<Connection, ConnectionError> {
        let catalog = Catalog::builtin().unwrap();
        Connection::from_stored(ConnectionId::parse("c1").unwrap(), stored(fields), &catalog)
    }

    fn header_of(c: &Connection) -> (String, String) {
        match &c.credential {
            Credential::Header { name, value } => {
                assert!(value.is_sensitive());
                (name.to_string(), value.to_str().unwrap().to_string())
            }
            Credential::Query { .. } => panic!("expected a header"),
        }
    }

    #[test]
    fn each_scheme_renders() {
        let c = load(&[("connector", "stripe"), ("api_key", "sk_test_abc")]).unwrap();
        assert_eq!(
            header_of(&c),
            ("authorization".into(), "Bearer sk_test_abc".into())
        );
        assert_eq!(c.base.to_string(), "https://api.stripe.com");
        assert!(c.hosts.allows("files.stripe.com"));

        let c = load(&[("connector", "anthropic"), ("api_key", "sk-ant-x")]).unwrap();
        assert_eq!(header_of(&c), ("x-api-key".into(), "sk-ant-x".into()));

        let c = load(&[
            ("connector", "twilio"),
            ("account_sid", "AC0123456789abcdef0123456789abcdef"),
            ("auth_token", "0123456789abcdef0123456789abcdef"),
        ])
        .unwrap();
        let (_, v) = header_of(&c);
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(v.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "AC0123456789abcdef0123456789abcdef:0123456789abcdef0123456789abcdef"
        );

        let c = load(&[("connector", "google-maps"), ("api_key", "AIza+/=&")]).unwrap();
        match &c.credential {
            Credential::Query { name, pair } => {
                assert_eq!(name, "key");
                assert_eq!(pair.expose(), "key=AIza%2B%2F%3D%26");
            }
            Credential::Header { .. } => panic!("expected a query credential"),
        }

        let c = load(&[
            ("connector", "shopify"),
            ("store", "acme"),
            ("api_key", "shpat_00ff"),
        ])
        .unwrap();
        assert_eq!(
            c.base.to_string(),
            "https://acme.myshopify.com/admin/api/2024-10"
        );
        assert_eq!(c.fields.get("store").map(String::as_str), Some("acme"));
        assert_eq!(c.secret_fields, vec!["api_key".to_string()]);
    }

    #[test]
    fn stored_values_are_checked() {
        let e = load(&[
            ("connector", "stripe"),
            ("api_key", "sk_test_a\r\nX-Evil: 1"),
        ])
        .unwrap_err();
        assert_eq!(e, ConnectionError::ControlCharacters("api_key".into()));
        let e = load(&[("connector", "stripe"), ("api_key", "sk_test_a\0b")]).unwrap_err();
        assert_eq!(e, ConnectionError::ControlCharacters("api_key".into()));
        let e = load(&[("connector", "stripe"), ("api_key", "sk_test a")]).unwrap_err();
        assert_eq!(e, ConnectionError::InnerWhitespace("api_key".into()));
        // What a paste leaves around a value is trimmed.
        let c = load(&[("connector", "stripe"), ("api_key", "  sk_test_abc\n")]).unwrap();
        assert_eq!(header_of(&c).1, "Bearer sk_test_abc");

        assert_eq!(
            load(&[("api_key", "x")]).unwrap_err(),
            ConnectionError::MissingConnector
        );
        assert!(matches!(
            load(&[("connector", "nope"), ("api_key", "x")]).unwrap_err(),
            ConnectionError::UnknownConnector(_)
        ));
        assert!(matches!(
            load(&[("connector", "stripe"), ("api-key", "x")]).unwrap_err(),
            ConnectionError::UnknownField { .. }
        ));
        assert_eq!(
            load(&[("connector", "stripe")]).unwrap_err(),
            ConnectionError::MissingField("api_key".into())
        );
        // A value that would change the host of a templated base URL.
        let e = load(&[
            ("connector", "shopify"),
            ("store", "evil.com/x"),
            ("api_key", "shpat_00"),
        ])
        .unwrap_err();
        assert_eq!(e, ConnectionError::Pattern("store".into()));
        let e = load(&[("connector", "generic-bearer"), ("api_key", "k")]).unwrap_err();
        assert!(matches!(e, ConnectionError::BaseUrl(_)));
        let e = load(&[
            ("connector", "stripe"),
            ("api_key", "sk_test_abc"),
            ("environment", "production"),
        ])
        .unwrap_err();
        assert!(
            matches!(e, ConnectionError::EnvironmentMismatch { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("sandbox"));
        let e = load(&[
            ("connector", "stripe"),
            ("api_key", "sk_test_abc"),
            ("expires_at", "tomorrow"),
        ])
        .unwrap_err();
        assert_eq!(e, ConnectionError::ExpiresAt);
    }

    #[test]
    fn reserved_fields() {
        let c = load(&[
            ("connector", "generic-header"),
            ("api_key", "k1"),
            ("name", "Internal"),
            ("base_url", "http://127.0.0.1:9999/api"),
            ("allowed_hosts", "a.example.com, *.b.example.com"),
            ("expires_at", "2030-01-01T00:00:00+02:00"),
        ])
        .unwrap();
        assert_eq!(c.name.as_deref(), Some("Internal"));
        assert_eq!(c.base.port, 9999);
        assert!(c.hosts.allows("127.0.0.1"));
        assert!(c.hosts.allows("a.example.com"));
        assert!(c.hosts.allows("x.b.example.com"));
        assert!(!c.hosts.allows("b.example.com"));
        assert!(!c.hosts.allows("c.example.com"));
        assert!(c.expires_at.is_some());
        assert!(!format!("{c:?}").contains("k1"));
    }
}
