//! A connection as a person submits it through the admin API, before any check, and the checks
//! a save makes: pasted whitespace trimmed (and reported back as a notice), control characters
//! and inner whitespace refused naming the field, required fields and patterns checked, then
//! everything a load from Vault checks.

use std::collections::BTreeMap;

use crate::catalog::{Catalog, Connector};
use crate::connection::{clean_value, Connection, ConnectionError};
use crate::connection_id::ConnectionId;
use crate::record::{StoredConnection, RESERVED_FIELDS};
use crate::secret::Secret;

/// A connection as a person submits it (through the admin API), before any check. `Debug`
/// prints secret values as `<redacted>`.
#[derive(Debug, Default)]
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
        // An environment the connector does not tell apart would turn its sandbox/production
        // check off without a word (`Production` misspelt, `prodution`).
        let known = connector.environment_names();
        if let Some(env) = self.environment.as_deref().map(str::trim) {
            if !env.is_empty() && !known.is_empty() && !connector.knows_environment(env) {
                return Err(FieldError::new(
                    "environment",
                    format!(
                        "is not an environment of connector {}: one of {}",
                        connector.id,
                        known.join(", ")
                    ),
                ));
            }
        }
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
            if let Some(clean) = connector_field(&connector, name, value, &mut notices)? {
                stored.insert(name.clone(), Secret::new(clean));
            }
        }
        let connection = Connection::from_stored(
            id.clone(),
            StoredConnection {
                fields: stored.clone(),
                version: 0,
                custom_metadata: BTreeMap::new(),
                not_text: Vec::new(),
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

/// One connector field of a draft, cleaned and checked against the connector; `None` when it is
/// empty (not stored).
fn connector_field<'a>(
    connector: &Connector,
    name: &str,
    value: &'a Secret,
    notices: &mut Vec<String>,
) -> Result<Option<&'a str>, FieldError> {
    if RESERVED_FIELDS.contains(&name) {
        return Err(FieldError::new(
            format!("fields.{name}"),
            format!("{name} is set at the top level of the request, not among the fields"),
        ));
    }
    let Some(field) = connector.field(name) else {
        return Err(ConnectionError::unknown_field(connector, name).into());
    };
    let (clean, trimmed) = clean_value(name, value.expose(), field.secret)?;
    if trimmed {
        notices.push(trim_notice(name, value.expose()));
    }
    if clean.is_empty() {
        return Ok(None);
    }
    // Every form of a secret is replaced in the upstream's answers: one this short would
    // replace ordinary text ("json", a digit) in every answer, and guards nothing.
    if field.secret && clean.len() < MIN_SECRET_LEN {
        return Err(FieldError::new(
            name,
            format!(
                "is {} characters; a secret is at least {MIN_SECRET_LEN} (latchkey replaces it wherever it appears in an answer, and one this short is ordinary text)",
                clean.len()
            ),
        ));
    }
    if let Some(p) = &field.pattern {
        if !p.is_match(clean) {
            return Err(FieldError::new(
                name,
                format!(
                    "does not look like a {} {} (expected the pattern {})",
                    connector.name,
                    field.label,
                    p.as_str()
                ),
            ));
        }
    }
    Ok(Some(clean))
}

/// The shortest secret field value saved.
pub const MIN_SECRET_LEN: usize = 8;

fn trim_notice(field: &str, raw: &str) -> String {
    let only_a_newline = raw.strip_suffix('\n').is_some_and(|r| {
        let r = r.strip_suffix('\r').unwrap_or(r);
        r.trim_matches(|c: char| c == ' ' || c == '\t') == r
    });
    let what = if only_a_newline {
        "a trailing newline"
    } else if raw.ends_with('\n') {
        "whitespace and a trailing newline"
    } else {
        "whitespace"
    };
    format!("{field}: removed {what} around the pasted value; it was saved without it")
}
