//! Connections: the strict connection ID, the record read from Vault, and what latchkey makes of
//! it (a base URL, the hosts the credential may reach, and the credential ready to inject).
//!
//! A connection lives in Vault's KV v2 engine as flat string fields, one secret per connection
//! at `{mount}/{prefix}/{connection_id}`. [`Connection::from_stored`] checks it against its
//! connector and renders the credential once, so the request path only clones it.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use http::{HeaderName, HeaderValue};
use time::OffsetDateTime;

use crate::catalog::{Catalog, Connector, Inject, RESERVED_FIELDS};
use crate::destination::HostAllowList;
use crate::secret::Secret;

/// A validated connection ID: 1 to 128 characters of `A-Z a-z 0-9 _ -`, starting with a letter
/// or digit. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(Arc<str>);

impl ConnectionId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(s: &str) -> Result<ConnectionId, BadConnectionId> {
        if Self::is_valid(s) {
            Ok(ConnectionId(Arc::from(s)))
        } else {
            Err(BadConnectionId)
        }
    }

    pub fn is_valid(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= Self::MAX_LEN
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The ID as a shared string (a reference count, no copy).
    pub fn shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl Borrow<str> for ConnectionId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "connection IDs are 1 to 128 characters of A-Z a-z 0-9 _ -, starting with a letter or digit"
)]
pub struct BadConnectionId;

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

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A connection's base URL: scheme, host, port and a path prefix without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub scheme: Scheme,
    /// Lower case; IPv6 literals keep their brackets. Shared, for the access log.
    pub host: Arc<str>,
    pub port: u16,
    pub explicit_port: bool,
    pub path: String,
    /// `host` or `host:port` when the port is not the scheme's default, parsed once.
    pub authority: http::uri::Authority,
}

impl BaseUrl {
    /// Parses a base URL. Errors never quote it: a key pasted into a URL (as user information
    /// or a query parameter) must not come back in an answer or a log line.
    pub fn parse(s: &str) -> Result<BaseUrl, String> {
        let uri: http::Uri = s.parse().map_err(|_| "is not a URL".to_string())?;
        let scheme = match uri.scheme_str() {
            Some("https") => Scheme::Https,
            Some("http") => Scheme::Http,
            _ => return Err("must start with https:// or http://".into()),
        };
        let authority = uri.authority().ok_or("has no host")?;
        if authority.as_str().contains('@') {
            return Err(
                "must not carry user information (a key belongs in the connection's secret field)"
                    .into(),
            );
        }
        let host = authority.host().to_ascii_lowercase();
        if host.is_empty() {
            return Err("has no host".into());
        }
        if uri.query().is_some() || s.contains('#') {
            return Err(
                "must not have a query or fragment (a key belongs in the connection's secret field)"
                    .into(),
            );
        }
        let path = uri.path().trim_end_matches('/').to_string();
        let port = authority.port_u16().unwrap_or(scheme.default_port());
        Ok(BaseUrl {
            scheme,
            authority: http::uri::Authority::from_maybe_shared(bytes::Bytes::from(
                self::authority(&host, port, scheme),
            ))
            .map_err(|_| "has no valid host".to_string())?,
            host: Arc::from(host),
            port,
            explicit_port: authority.port_u16().is_some(),
            path,
        })
    }
}

pub fn authority(host: &str, port: u16, scheme: Scheme) -> String {
    if port == scheme.default_port() {
        host.to_string()
    } else {
        format!("{host}:{port}")
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme.as_str(),
            self.authority,
            self.path
        )
    }
}

/// What Vault holds for a connection: the fields of the current version, its version number and
/// the KV metadata latchkey keeps there.
pub struct StoredConnection {
    pub fields: BTreeMap<String, Secret>,
    pub version: u64,
    pub custom_metadata: BTreeMap<String, String>,
}

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
    pub custom_metadata: BTreeMap<String, String>,
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
    #[error("the credential cannot be sent: {0}")]
    Credential(String),
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
            | ConnectionError::Pattern(f)
            | ConnectionError::UnsafeUrlValue(f) => f,
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
        if let Some((field, key_env)) = key_env.filter(|(_, k)| *k != env) {
            return Err(ConnectionError::EnvironmentMismatch {
                field: field.to_string(),
                key_env: key_env.to_string(),
                connection_env: env.to_string(),
            });
        }
        if let Some(url_env) = url_env.filter(|u| *u != env) {
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
        } = stored;
        let connector_id = raw
            .get("connector")
            .map(|s| s.expose().trim().to_string())
            .ok_or(ConnectionError::MissingConnector)?;
        let connector = catalog
            .get(&connector_id)
            .cloned()
            .ok_or(ConnectionError::UnknownConnector(connector_id))?;

        let mut plain: BTreeMap<String, String> = BTreeMap::new();
        let mut secrets: BTreeMap<String, Secret> = BTreeMap::new();
        let mut reserved: BTreeMap<&str, String> = BTreeMap::new();
        for (name, value) in &raw {
            if let Some(r) = RESERVED_FIELDS.iter().find(|r| **r == name) {
                let (v, _) = clean_value(name, value.expose(), false)?;
                reserved.insert(r, v.to_string());
                continue;
            }
            let Some(field) = connector.field(name) else {
                return Err(unknown_field(&connector, name));
            };
            let (v, _) = clean_value(name, value.expose(), field.secret)?;
            if field.secret {
                secrets.insert(name.clone(), Secret::new(v));
            } else {
                if let Some(p) = &field.pattern {
                    if !v.is_empty() && !p.is_match(v) {
                        return Err(ConnectionError::Pattern(name.clone()));
                    }
                }
                plain.insert(name.clone(), v.to_string());
            }
        }
        drop(raw);
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

        let environment = reserved
            .get("environment")
            .filter(|s| !s.is_empty())
            .cloned();

        let base = match reserved.get("base_url").filter(|s| !s.is_empty()) {
            Some(url) => BaseUrl::parse(url).map_err(ConnectionError::BaseUrl)?,
            None => {
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
                BaseUrl::parse(&url).map_err(ConnectionError::BaseUrl)?
            }
        };

        let primary = connector
            .primary_secret()
            .and_then(|f| Some((f.name.as_str(), secrets.get(&f.name)?.expose())));
        check_environment(
            &connector,
            environment.as_deref(),
            primary,
            &base.to_string(),
        )?;

        let mut hosts = HostAllowList::new(&base.host);
        for h in &connector.allowed_hosts {
            hosts.push_normalized(h.clone());
        }
        if let Some(extra) = reserved.get("allowed_hosts") {
            for h in extra.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                hosts.push(h).map_err(ConnectionError::AllowedHosts)?;
            }
        }

        let expires_at = match reserved.get("expires_at").filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(
                OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| ConnectionError::ExpiresAt)?,
            ),
        };

        let credential = render_credential(&connector, &plain, &secrets)?;

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
            custom_metadata,
            connector,
        })
    }
}

/// A connection as a person submits it (through the admin API), before any check.
#[derive(Default)]
pub struct Draft {
    pub connector: String,
    pub name: Option<String>,
    pub environment: Option<String>,
    pub base_url: Option<String>,
    pub allowed_hosts: Vec<String>,
    pub expires_at: Option<String>,
    /// Connector fields, secret or not, as given.
    pub fields: BTreeMap<String, Secret>,
}

/// A field that cannot be saved, and why. The message never quotes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<ConnectionError> for FieldError {
    fn from(e: ConnectionError) -> Self {
        FieldError::new(e.field().to_string(), e.to_string())
    }
}

/// A draft that passed every check: what to store, what to tell the person, and the connection
/// it makes.
pub struct Prepared {
    pub stored: BTreeMap<String, Secret>,
    pub notices: Vec<String>,
    pub connection: Connection,
}

impl Draft {
    /// Checks a draft against its connector the way a save must: pasted whitespace is trimmed
    /// (and reported), control characters and inner whitespace are refused, required fields and
    /// every field's pattern are checked, and then everything a load checks.
    pub fn prepare(self, id: &ConnectionId, catalog: &Catalog) -> Result<Prepared, FieldError> {
        let connector = catalog.get(self.connector.trim()).cloned().ok_or_else(|| {
            FieldError::new(
                "connector",
                format!(
                    "{:?} is not in the catalog (GET /v1/connectors lists them)",
                    self.connector
                ),
            )
        })?;
        let mut notices = Vec::new();
        let mut stored = BTreeMap::new();
        stored.insert("connector".to_string(), Secret::new(connector.id.as_str()));
        let allowed_hosts = self.allowed_hosts.join(",");
        for (name, value) in [
            ("name", self.name.as_deref()),
            ("environment", self.environment.as_deref()),
            ("base_url", self.base_url.as_deref()),
            (
                "allowed_hosts",
                Some(allowed_hosts.as_str()).filter(|s| !s.is_empty()),
            ),
            ("expires_at", self.expires_at.as_deref()),
        ] {
            if let Some(value) = value {
                let (clean, trimmed) = clean_value(name, value, false)?;
                if trimmed {
                    notices.push(trim_notice(name, value));
                }
                if !clean.is_empty() {
                    stored.insert(name.to_string(), Secret::new(clean));
                }
            }
        }
        for (name, value) in &self.fields {
            if RESERVED_FIELDS.contains(&name.as_str()) {
                return Err(FieldError::new(
                    format!("fields.{name}"),
                    format!("{name} is set at the top level of the request, not among the fields"),
                ));
            }
            let Some(field) = connector.field(name) else {
                return Err(unknown_field(&connector, name).into());
            };
            let (clean, trimmed) = clean_value(name, value.expose(), field.secret)?;
            if trimmed {
                notices.push(trim_notice(name, value.expose()));
            }
            if clean.is_empty() {
                continue;
            }
            if let Some(p) = &field.pattern {
                if !p.is_match(clean) {
                    return Err(FieldError::new(
                        name.as_str(),
                        format!(
                            "does not look like a {} {} (expected the pattern {})",
                            connector.name,
                            field.label,
                            p.as_str()
                        ),
                    ));
                }
            }
            stored.insert(name.clone(), Secret::new(clean));
        }
        let connection = Connection::from_stored(
            id.clone(),
            StoredConnection {
                fields: stored.clone(),
                version: 0,
                custom_metadata: BTreeMap::new(),
            },
            catalog,
        )?;
        Ok(Prepared {
            stored,
            notices,
            connection,
        })
    }
}

fn trim_notice(field: &str, raw: &str) -> String {
    let what = if raw.ends_with('\n') {
        "a trailing newline"
    } else {
        "whitespace"
    };
    format!("{field}: removed {what} around the pasted value; it was saved without it")
}

/// A field the connector does not have, with the ones it does.
fn unknown_field(connector: &Connector, name: &str) -> ConnectionError {
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

fn render_credential(
    connector: &Connector,
    plain: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, Secret>,
) -> Result<Credential, ConnectionError> {
    let lookup = |f: &str| {
        secrets
            .get(f)
            .map(Secret::expose)
            .or_else(|| plain.get(f).map(String::as_str))
    };
    let missing = |f: String| ConnectionError::MissingField(f);
    let header = |name: HeaderName, text: Secret| -> Result<Credential, ConnectionError> {
        let mut value = HeaderValue::from_maybe_shared(text.into_shared_bytes()).map_err(|_| {
            ConnectionError::Credential(
                "the rendered header value is not a valid header value".into(),
            )
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
                return Err(ConnectionError::Credential(
                    "a Basic user name cannot contain ':'".into(),
                ));
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
            crate::inject::percent_encode_into(raw.expose(), &mut pair);
            Ok(Credential::Query {
                name: param.clone(),
                pair: Secret::from(pair),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(fields: &[(&str, &str)]) -> StoredConnection {
        StoredConnection {
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), Secret::new(*v)))
                .collect(),
            version: 1,
            custom_metadata: BTreeMap::new(),
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
    fn connection_ids() {
        for ok in ["a", "stripe-prod", "A_1", "9lives", &"x".repeat(128)] {
            assert!(ConnectionId::parse(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            "a b",
            "a/b",
            "a.b",
            "a%2Fb",
            "ä",
            &"x".repeat(129),
            "../x",
            "a\n",
        ] {
            assert!(ConnectionId::parse(bad).is_err(), "{bad:?}");
        }
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

    #[test]
    fn base_urls() {
        let b = BaseUrl::parse("https://API.example.com:8443/v1/").unwrap();
        assert_eq!(&*b.host, "api.example.com");
        assert_eq!(b.port, 8443);
        assert_eq!(b.path, "/v1");
        assert_eq!(b.to_string(), "https://api.example.com:8443/v1");
        assert_eq!(&*BaseUrl::parse("http://[::1]/").unwrap().host, "[::1]");
        for bad in [
            "ftp://x",
            "https://",
            "https://u:p@x.com",
            "https://x.com/?a=1",
            "x.com",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad:?}");
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
