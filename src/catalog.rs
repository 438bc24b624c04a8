//! The connector catalog: what each service needs from a connection and how its credential is
//! presented.
//!
//! A connector names its fields (secret or not, required or not, with a pattern), a `base_url`
//! template, the hosts its credential may reach, the injection scheme, the verification call and
//! the key patterns per environment. The built-in catalog is `config/connectors.toml`, compiled
//! into the binary; the operator's `[connectors.*]` tables add connectors or replace built-in
//! ones whole.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use http::{HeaderName, HeaderValue, Method};
use regex::Regex;
use serde::Deserialize;

use crate::connection_id::ConnectionId;
use crate::destination::{BaseUrl, HostAllowList};
use crate::hop_by_hop::is_hop_by_hop;
use crate::record::RESERVED_FIELDS;

/// A connector that cannot be used: the key it concerns (`connectors.{id}.{key}`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct CatalogError {
    pub key: String,
    pub message: String,
}

impl CatalogError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        CatalogError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The built-in catalog, as shipped.
pub const BUILTIN: &str = include_str!("../config/connectors.toml");

/// The catalog in force, shared by everything that reads connectors (the cache's loads, the
/// lifecycle, the proxy): a reload swaps it whole, and a reader keeps the one it loaded.
pub type CatalogSlot = Arc<arc_swap::ArcSwap<Catalog>>;

/// All connectors, by ID.
#[derive(Clone, Default)]
pub struct Catalog {
    connectors: BTreeMap<String, Arc<Connector>>,
}

impl fmt::Debug for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.connectors.keys()).finish()
    }
}

/// One service.
#[derive(Debug)]
pub struct Connector {
    pub id: String,
    pub name: String,
    /// `None` for generic connectors: the connection supplies its own `base_url`.
    pub base_url: Option<Template>,
    pub allowed_hosts: Vec<String>,
    pub inject: Inject,
    pub verify: Option<Verify>,
    /// Environment name and the pattern its keys match, checked on the first secret field.
    pub environments: Vec<(String, Regex)>,
    /// Environment name and the pattern its base URLs match (a sandbox host, say).
    pub environment_urls: Vec<(String, Regex)>,
    pub fields: Vec<Field>,
    /// Headers sent when the client sends none of that name (API version pins and the like).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Client headers removed before the credential goes in: where an SDK sends its own key
    /// under another name than the service reads (the Anthropic SDK's `Authorization`).
    pub strip: Vec<HeaderName>,
    /// What scopes or permissions a key needs, in words, for error messages and the API.
    pub scopes: Option<String>,
    pub docs_url: Option<String>,
}

/// How the credential is presented to the service.
#[derive(Debug, Clone)]
pub enum Inject {
    /// `Authorization: Bearer {value}`.
    Bearer { value: Template },
    /// Any header: `X-API-Key: {api_key}`, `Authorization: token {api_key}`.
    Header { header: HeaderName, value: Template },
    /// `Authorization: Basic base64(username:password)`.
    Basic {
        username: Template,
        password: Template,
    },
    /// A query parameter: `key={api_key}`.
    Query { param: String, value: Template },
}

impl Inject {
    /// Whether the credential this injects is made with field `name` (Twilio's `account_sid`
    /// beside its `auth_token`, a Basic user name).
    pub fn uses(&self, name: &str) -> bool {
        let templates: &[&Template] = match self {
            Inject::Bearer { value }
            | Inject::Header { value, .. }
            | Inject::Query { value, .. } => &[value],
            Inject::Basic { username, password } => &[username, password],
        };
        templates.iter().any(|t| t.fields().any(|f| f == name))
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            Inject::Bearer { .. } => "bearer",
            Inject::Header { .. } => "header",
            Inject::Basic { .. } => "basic",
            Inject::Query { .. } => "query",
        }
    }
}

/// A connector field.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub label: String,
    pub secret: bool,
    pub required: bool,
    pub pattern: Option<Regex>,
    pub default: Option<String>,
    pub description: Option<String>,
}

/// The call that checks a key.
#[derive(Debug, Clone)]
pub struct Verify {
    pub method: Method,
    /// Path (and query) appended to the base URL.
    pub path: Template,
    /// For services that answer 200 with an error in the body (Slack): the JSON member that
    /// must be `true`.
    pub json_ok_field: Option<String>,
}

/// A string with `{field}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Field(String),
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some((literal, after)) = rest.split_once('{') {
            if literal.contains('}') {
                return Err(format!("{source:?} has a '}}' with no '{{'"));
            }
            if !literal.is_empty() {
                parts.push(Part::Lit(literal.to_string()));
            }
            let (name, tail) = after
                .split_once('}')
                .ok_or_else(|| format!("{source:?} has a '{{' with no '}}'"))?;
            if !is_field_name(name) {
                return Err(format!(
                    "{source:?} has placeholder {{{name}}}; field names are lower-case letters, digits and '_'"
                ));
            }
            parts.push(Part::Field(name.to_string()));
            rest = tail;
        }
        if rest.contains('}') {
            return Err(format!("{source:?} has a '}}' with no '{{'"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The fields the template refers to.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Lit(_) => None,
        })
    }

    /// Fills the placeholders. `value` returns `None` for a field the connection lacks, which
    /// makes the whole rendering fail with that field's name.
    pub fn render<'a>(
        &self,
        out: &mut String,
        value: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<(), String> {
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Field(f) => out.push_str(value(f).ok_or_else(|| f.clone())?),
            }
        }
        Ok(())
    }
}

pub fn is_field_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

// ---------------------------------------------------------------------------------------------
// The TOML form, shared by the built-in file and the operator's `[connectors.*]` tables.

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawConnector {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    inject: RawInject,
    #[serde(default)]
    verify: Option<RawVerify>,
    #[serde(default)]
    environments: BTreeMap<String, String>,
    #[serde(default)]
    environment_urls: BTreeMap<String, String>,
    #[serde(default)]
    fields: Vec<RawField>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    strip: Vec<String>,
    #[serde(default)]
    scopes: Option<String>,
    #[serde(default)]
    docs_url: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields, tag = "scheme", rename_all = "lowercase")]
enum RawInject {
    Bearer {
        #[serde(default = "api_key_template")]
        value: String,
    },
    Header {
        header: String,
        value: String,
    },
    Basic {
        username: String,
        password: String,
    },
    Query {
        param: String,
        #[serde(default = "api_key_template")]
        value: String,
    },
}

fn api_key_template() -> String {
    "{api_key}".into()
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    #[serde(default = "get")]
    method: String,
    path: String,
    #[serde(default)]
    json_ok_field: Option<String>,
}

fn get() -> String {
    "GET".into()
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    secret: bool,
    #[serde(default = "yes")]
    required: bool,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogFile {
    connectors: BTreeMap<String, RawConnector>,
}

/// The built-in connectors, built once per process: every configuration load (start, each
/// `SIGHUP`, `check-config`) shares them rather than parsing and checking 49 connectors again.
fn builtin_connectors() -> Result<&'static BTreeMap<String, Arc<Connector>>, CatalogError> {
    static BUILT: OnceLock<Result<BTreeMap<String, Arc<Connector>>, CatalogError>> =
        OnceLock::new();
    BUILT
        .get_or_init(|| {
            let file: RawCatalogFile = serde_path_to_error::deserialize(toml::Deserializer::new(
                BUILTIN,
            ))
            .map_err(|e| {
                CatalogError::new(
                    format!("built-in catalog: {}", e.path()),
                    e.into_inner().message().to_string(),
                )
            })?;
            let mut connectors = BTreeMap::new();
            for (id, rc) in file.connectors {
                let connector = Connector::from_raw(&id, rc)?;
                connectors.insert(id, Arc::new(connector));
            }
            Ok(connectors)
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Catalog {
    /// The built-in catalog alone.
    pub fn builtin() -> Result<Catalog, CatalogError> {
        Catalog::with_overrides(BTreeMap::new())
    }

    /// The built-in catalog with the operator's connectors added, replacing built-in ones of the
    /// same ID.
    pub fn with_overrides(
        overrides: BTreeMap<String, RawConnector>,
    ) -> Result<Catalog, CatalogError> {
        let mut connectors = builtin_connectors()?.clone();
        for (id, rc) in overrides {
            let connector = Connector::from_raw(&id, rc)?;
            connectors.insert(id, Arc::new(connector));
        }
        Ok(Catalog { connectors })
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Connector>> {
        self.connectors.get(id)
    }

    /// The IDs of the connectors added, removed or changed since `old` (a reload's catalog
    /// against the running one). Two connectors are the same when their `Debug` forms are:
    /// every part of a connector derives it, patterns as their source, and none is secret.
    pub fn changed_since(&self, old: &Catalog) -> Vec<String> {
        let same = |a: &Connector, b: &Connector| format!("{a:?}") == format!("{b:?}");
        let mut changed: Vec<String> = self
            .connectors
            .iter()
            .filter(|(id, c)| !old.get(id).is_some_and(|o| same(o, c)))
            .map(|(id, _)| id.clone())
            .collect();
        changed.extend(
            old.connectors
                .keys()
                .filter(|id| !self.connectors.contains_key(*id))
                .cloned(),
        );
        changed
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Connector>> {
        self.connectors.values()
    }

    pub fn len(&self) -> usize {
        self.connectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connectors.is_empty()
    }
}

impl Connector {
    fn from_raw(id: &str, raw: RawConnector) -> Result<Connector, CatalogError> {
        if !ConnectionId::is_valid(id) {
            return Err(CatalogError::new(
                format!("connectors.{id}"),
                "connector IDs are letters, digits, '-' and '_'",
            ));
        }
        let fields = connector_fields(id, raw.fields)?;
        let parts = Parts {
            id,
            fields: &fields,
        };
        let base_url = raw
            .base_url
            .as_deref()
            .map(|s| parts.base_url(s))
            .transpose()?;
        let inject = parts.inject(raw.inject)?;
        let verify = raw.verify.map(|v| parts.verify(v)).transpose()?;
        let environments = parts.patterns("environments", raw.environments)?;
        let environment_urls = parts.patterns("environment_urls", raw.environment_urls)?;
        let headers = parts.default_headers(raw.headers)?;
        let strip = parts.strip(raw.strip)?;
        let allowed_hosts = parts.allowed_hosts(raw.allowed_hosts)?;

        Ok(Connector {
            id: id.to_string(),
            name: raw.name.unwrap_or_else(|| id.to_string()),
            base_url,
            allowed_hosts,
            inject,
            verify,
            environments,
            environment_urls,
            fields,
            headers,
            strip,
            scopes: raw.scopes,
            docs_url: raw.docs_url,
        })
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The field that environment patterns are checked against: the first secret field.
    pub fn primary_secret(&self) -> Option<&Field> {
        self.fields.iter().find(|f| f.secret)
    }

    /// The environment whose key pattern a value matches, if the connector declares any.
    pub fn environment_of(&self, key: &str) -> Option<&str> {
        self.environments
            .iter()
            .find(|(_, re)| re.is_match(key))
            .map(|(env, _)| env.as_str())
    }

    /// The environment whose base URL pattern a URL matches, if the connector declares any.
    pub fn environment_of_url(&self, url: &str) -> Option<&str> {
        self.environment_urls
            .iter()
            .find(|(_, re)| re.is_match(url))
            .map(|(env, _)| env.as_str())
    }

    /// Whether `env` is one of the environments the connector knows by key or URL.
    pub fn knows_environment(&self, env: &str) -> bool {
        self.environments
            .iter()
            .chain(&self.environment_urls)
            .any(|(e, _)| e.eq_ignore_ascii_case(env))
    }

    /// The environments the connector tells apart by key or base URL (empty: none).
    pub fn environment_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .environments
            .iter()
            .chain(&self.environment_urls)
            .map(|(e, _)| e.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// The full key of a connector's setting, as errors name it: `connectors.{id}.{k}`.
fn connector_key(id: &str, k: &str) -> String {
    format!("connectors.{id}.{k}")
}

/// The connector's fields, or the single secret `api_key` when it declares none.
fn connector_fields(id: &str, raw: Vec<RawField>) -> Result<Vec<Field>, CatalogError> {
    let fields = if raw.is_empty() {
        vec![Field {
            name: "api_key".into(),
            label: "API key".into(),
            secret: true,
            required: true,
            pattern: None,
            default: None,
            description: None,
        }]
    } else {
        let mut fields: Vec<Field> = Vec::with_capacity(raw.len());
        for (i, f) in raw.into_iter().enumerate() {
            let field = connector_field(id, i, f, &fields)?;
            fields.push(field);
        }
        fields
    };
    if !fields.iter().any(|f| f.secret) {
        return Err(CatalogError::new(
            connector_key(id, "fields"),
            "no field is marked secret = true",
        ));
    }
    Ok(fields)
}

/// The `i`th declared field, checked against those declared before it.
fn connector_field(
    id: &str,
    i: usize,
    f: RawField,
    earlier: &[Field],
) -> Result<Field, CatalogError> {
    let fkey = |k: &str| connector_key(id, &format!("fields[{i}].{k}"));
    if !is_field_name(&f.name) {
        return Err(CatalogError::new(
            fkey("name"),
            format!(
                "{:?}: field names are lower-case letters, digits and '_'",
                f.name
            ),
        ));
    }
    if RESERVED_FIELDS.contains(&f.name.as_str()) {
        return Err(CatalogError::new(
            fkey("name"),
            format!("{:?} is reserved for the connection itself", f.name),
        ));
    }
    if earlier.iter().any(|g| g.name == f.name) {
        return Err(CatalogError::new(
            fkey("name"),
            format!("{:?} is declared twice", f.name),
        ));
    }
    let pattern = f
        .pattern
        .as_deref()
        .map(|p| {
            Regex::new(p).map_err(|e| CatalogError::new(fkey("pattern"), format!("bad regex: {e}")))
        })
        .transpose()?;
    if let (Some(d), Some(p)) = (&f.default, &pattern) {
        if !p.is_match(d) {
            return Err(CatalogError::new(
                fkey("default"),
                "does not match the field's pattern",
            ));
        }
    }
    Ok(Field {
        label: f.label.unwrap_or_else(|| f.name.clone()),
        name: f.name,
        secret: f.secret,
        required: f.required,
        pattern,
        default: f.default,
        description: f.description,
    })
}

/// What the rest of a connector is checked against once its fields are known: its ID, for
/// error keys, and the fields its templates may name.
struct Parts<'a> {
    id: &'a str,
    fields: &'a [Field],
}

impl Parts<'_> {
    fn key(&self, k: &str) -> String {
        connector_key(self.id, k)
    }

    /// Parses the template at key `k`, refusing placeholders that are not the connector's fields.
    fn template(&self, s: &str, k: &str) -> Result<Template, CatalogError> {
        let t = Template::parse(s).map_err(|e| CatalogError::new(self.key(k), e))?;
        for f in t.fields() {
            if !self.fields.iter().any(|g| g.name == f) {
                return Err(CatalogError::new(
                    self.key(k),
                    format!("uses {{{f}}}, which is not one of the connector's fields"),
                ));
            }
        }
        Ok(t)
    }

    /// A template of a URL (`base_url`, `verify.path`): no secret field in it. A URL is not a
    /// safe place for a secret (logs, `Location`), and the verification path is filled with
    /// non-secret fields only, so one naming a secret could never be used.
    fn url_template(&self, s: &str, k: &str) -> Result<Template, CatalogError> {
        let t = self.template(s, k)?;
        for f in t.fields() {
            if self.fields.iter().any(|g| g.name == f && g.secret) {
                return Err(CatalogError::new(
                    self.key(k),
                    format!(
                        "uses the secret field {{{f}}}; a URL is not a safe place for a secret"
                    ),
                ));
            }
        }
        Ok(t)
    }

    /// The `base_url` template: no secret in it, and a URL once its placeholders are filled.
    fn base_url(&self, s: &str) -> Result<Template, CatalogError> {
        let t = self.url_template(s, "base_url")?;
        // Check the shape with every placeholder filled by a harmless word.
        let mut sample = String::new();
        let _ = t.render(&mut sample, |_| Some("x"));
        BaseUrl::parse(&sample).map_err(|e| CatalogError::new(self.key("base_url"), e))?;
        Ok(t)
    }

    /// The injection scheme, with its header or query parameter name checked.
    fn inject(&self, raw: RawInject) -> Result<Inject, CatalogError> {
        Ok(match raw {
            RawInject::Bearer { value } => Inject::Bearer {
                value: self.template(&value, "inject.value")?,
            },
            RawInject::Header { header, value } => Inject::Header {
                header: self.inject_header(&header)?,
                value: self.template(&value, "inject.value")?,
            },
            RawInject::Basic { username, password } => Inject::Basic {
                username: self.template(&username, "inject.username")?,
                password: self.template(&password, "inject.password")?,
            },
            RawInject::Query { param, value } => {
                if param.is_empty()
                    || !param
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    return Err(CatalogError::new(
                        self.key("inject.param"),
                        format!("{param:?} is not a plain query parameter name"),
                    ));
                }
                Inject::Query {
                    param,
                    value: self.template(&value, "inject.value")?,
                }
            }
        })
    }

    /// The header a `header` scheme sets: a header name, and not a connection-level one.
    fn inject_header(&self, header: &str) -> Result<HeaderName, CatalogError> {
        let name = HeaderName::try_from(header).map_err(|_| {
            CatalogError::new(
                self.key("inject.header"),
                format!("{header:?} is not a header name"),
            )
        })?;
        if is_hop_by_hop(&name) || name == http::header::HOST {
            return Err(CatalogError::new(
                self.key("inject.header"),
                format!("{header:?} is a connection-level header and cannot carry a credential"),
            ));
        }
        Ok(name)
    }

    /// The verification call: a method and a path template starting with '/'.
    fn verify(&self, v: RawVerify) -> Result<Verify, CatalogError> {
        let method =
            Method::from_bytes(v.method.to_ascii_uppercase().as_bytes()).map_err(|_| {
                CatalogError::new(
                    self.key("verify.method"),
                    format!("{:?} is not a method", v.method),
                )
            })?;
        if !v.path.starts_with('/') {
            return Err(CatalogError::new(
                self.key("verify.path"),
                "must start with '/'",
            ));
        }
        Ok(Verify {
            method,
            path: self.url_template(&v.path, "verify.path")?,
            json_ok_field: v.json_ok_field,
        })
    }

    /// Patterns by environment name, each compiled or refused naming its key (`{table}.{env}`).
    fn patterns(
        &self,
        table: &str,
        raw: BTreeMap<String, String>,
    ) -> Result<Vec<(String, Regex)>, CatalogError> {
        raw.into_iter()
            .map(|(env, pattern)| {
                let re = Regex::new(&pattern).map_err(|e| {
                    CatalogError::new(
                        self.key(&format!("{table}.{env}")),
                        format!("bad regex: {e}"),
                    )
                })?;
                Ok((env, re))
            })
            .collect()
    }

    /// The default headers: valid names and values, none of them connection-level.
    fn default_headers(
        &self,
        raw: BTreeMap<String, String>,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, CatalogError> {
        let mut headers = Vec::with_capacity(raw.len());
        for (name, value) in raw {
            let hkey = self.key(&format!("headers.{name}"));
            let n = HeaderName::try_from(name.as_str())
                .map_err(|_| CatalogError::new(&hkey, "is not a header name"))?;
            if is_hop_by_hop(&n) || n == http::header::HOST {
                return Err(CatalogError::new(&hkey, "is a connection-level header"));
            }
            let v = HeaderValue::try_from(value.as_str())
                .map_err(|_| CatalogError::new(&hkey, "is not a valid header value"))?;
            headers.push((n, v));
        }
        Ok(headers)
    }

    /// The client headers to remove: valid header names.
    fn strip(&self, raw: Vec<String>) -> Result<Vec<HeaderName>, CatalogError> {
        raw.into_iter()
            .enumerate()
            .map(|(i, name)| {
                HeaderName::try_from(name.as_str()).map_err(|_| {
                    CatalogError::new(
                        self.key(&format!("strip[{i}]")),
                        format!("{name:?} is not a header name"),
                    )
                })
            })
            .collect()
    }

    /// The extra hosts the credential may reach (`host` or `host:port`), checked.
    fn allowed_hosts(&self, raw: Vec<String>) -> Result<Vec<String>, CatalogError> {
        raw.into_iter()
            .enumerate()
            .map(|(i, h)| {
                HostAllowList::default()
                    .push(&h)
                    .map(|()| h.trim().to_string())
                    .map_err(|e| CatalogError::new(self.key(&format!("allowed_hosts[{i}]")), e))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_loads_with_real_services() {
        let c = Catalog::builtin().unwrap();
        for id in [
            "stripe",
            "github",
            "openai",
            "anthropic",
            "sendgrid",
            "slack",
            "shopify",
            "mailchimp",
            "twilio",
            "airtable",
            "hubspot",
            "google-maps",
            "notion",
            "generic-bearer",
            "generic-header",
            "generic-basic",
            "generic-query",
        ] {
            assert!(c.get(id).is_some(), "missing connector {id}");
        }
        assert!(c.len() >= 17);
        let stripe = c.get("stripe").unwrap();
        assert!(matches!(stripe.inject, Inject::Bearer { .. }));
        assert_eq!(stripe.environment_of("sk_live_abc"), Some("production"));
        assert_eq!(stripe.environment_of("sk_test_abc"), Some("sandbox"));
        let shopify = c.get("shopify").unwrap();
        assert_eq!(
            shopify
                .base_url
                .as_ref()
                .unwrap()
                .fields()
                .collect::<Vec<_>>(),
            vec!["store"]
        );
        assert!(matches!(
            c.get("twilio").unwrap().inject,
            Inject::Basic { .. }
        ));
        assert!(matches!(
            c.get("google-maps").unwrap().inject,
            Inject::Query { .. }
        ));
        // Slack's Socket Mode: an app-level token, and its WebSocket hosts.
        let slack = c.get("slack").unwrap();
        let token = slack.field("api_key").unwrap().pattern.as_ref().unwrap();
        assert!(token.is_match("xapp-1-A0123-4567-abcdef"));
        assert!(token.is_match("xoxb-123-456-abc"));
        assert!(slack
            .allowed_hosts
            .iter()
            .any(|h| h == "wss-primary.slack.com"));
        let notion = c.get("notion").unwrap();
        assert!(notion.headers.iter().any(|(n, _)| n == "notion-version"));
        for generic in [
            "generic-bearer",
            "generic-header",
            "generic-basic",
            "generic-query",
        ] {
            assert!(c.get(generic).unwrap().base_url.is_none());
        }
    }

    #[test]
    fn templates() {
        let t = Template::parse("https://{store}.myshopify.com/admin").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), vec!["store"]);
        let mut out = String::new();
        t.render(&mut out, |f| (f == "store").then_some("acme"))
            .unwrap();
        assert_eq!(out, "https://acme.myshopify.com/admin");
        let mut out = String::new();
        assert_eq!(t.render(&mut out, |_| None), Err("store".to_string()));
        assert!(Template::parse("{api_key").is_err());
        assert!(Template::parse("api_key}").is_err());
        assert!(Template::parse("{Api-Key}").is_err());
    }

    fn with(toml_text: &str) -> Catalog {
        let raw: BTreeMap<String, RawConnector> = toml::from_str(toml_text).unwrap();
        Catalog::with_overrides(raw).unwrap()
    }

    #[test]
    fn a_reload_names_the_connectors_added_removed_or_changed() {
        let a = with(concat!(
            "[same]\ninject = { scheme = \"bearer\" }\n",
            "[changed]\ninject = { scheme = \"header\", header = \"X-Key\", value = \"{api_key}\" }\n",
            "[gone]\ninject = { scheme = \"bearer\" }\n",
        ));
        let b = with(concat!(
            "[same]\ninject = { scheme = \"bearer\" }\n",
            "[changed]\ninject = { scheme = \"header\", header = \"X-Key\", value = \"v2 {api_key}\" }\n",
            "[new]\ninject = { scheme = \"bearer\" }\n",
            // A built-in connector overridden counts as changed.
            "[stripe]\ninject = { scheme = \"bearer\" }\n",
        ));
        let mut changed = b.changed_since(&a);
        changed.sort();
        assert_eq!(changed, ["changed", "gone", "new", "stripe"]);
        assert!(b.changed_since(&b.clone()).is_empty());
        assert!(a.changed_since(&with(concat!(
            "[same]\ninject = { scheme = \"bearer\" }\n",
            "[changed]\ninject = { scheme = \"header\", header = \"X-Key\", value = \"{api_key}\" }\n",
            "[gone]\ninject = { scheme = \"bearer\" }\n",
        )))
        .is_empty());
    }

    fn override_err(toml_text: &str) -> CatalogError {
        let raw: BTreeMap<String, RawConnector> = toml::from_str(toml_text).unwrap();
        Catalog::with_overrides(raw).unwrap_err()
    }

    #[test]
    fn bad_connectors_are_named() {
        let e = override_err(
            "[x]\ninject = { scheme = \"header\", header = \"X-Key\", value = \"{token}\" }\n",
        );
        assert_eq!(e.key, "connectors.x.inject.value");
        let e = override_err("[x]\ninject = { scheme = \"header\", header = \"Connection\", value = \"{api_key}\" }\n");
        assert_eq!(e.key, "connectors.x.inject.header");
        let e = override_err(
            "[x]\nbase_url = \"https://{api_key}.example.com\"\ninject = { scheme = \"bearer\" }\n",
        );
        assert_eq!(e.key, "connectors.x.base_url");
        let e = override_err(
            "[x]\ninject = { scheme = \"bearer\" }\nverify = { path = \"/status/{api_key}\" }\n",
        );
        assert_eq!(e.key, "connectors.x.verify.path");
        assert!(e.to_string().contains("secret field"), "{e}");
        let e = override_err("[x]\ninject = { scheme = \"bearer\" }\n[[x.fields]]\nname = \"api_key\"\nsecret = true\npattern = \"(\"\n");
        assert_eq!(e.key, "connectors.x.fields[0].pattern");
        let e = override_err("[x]\ninject = { scheme = \"bearer\" }\n[[x.fields]]\nname = \"connector\"\nsecret = true\n");
        assert_eq!(e.key, "connectors.x.fields[0].name");
        let e = override_err("[x]\ninject = { scheme = \"bearer\" }\nstrip = [\"bad header\"]\n");
        assert_eq!(e.key, "connectors.x.strip[0]");
    }

    #[test]
    fn operator_connectors_extend_and_replace() {
        let raw: BTreeMap<String, RawConnector> = toml::from_str(
            "[my-internal-api]\nbase_url = \"https://internal.example.com\"\ninject = { scheme = \"header\", header = \"X-API-Key\", value = \"{api_key}\" }\n\
             [stripe]\nbase_url = \"https://stripe.internal\"\ninject = { scheme = \"bearer\" }\n",
        )
        .unwrap();
        let c = Catalog::with_overrides(raw).unwrap();
        let mine = c.get("my-internal-api").unwrap();
        assert_eq!(mine.name, "my-internal-api");
        assert_eq!(mine.fields[0].name, "api_key");
        assert!(mine.fields[0].secret);
        assert_eq!(
            c.get("stripe").unwrap().base_url.as_ref().unwrap().as_str(),
            "https://stripe.internal"
        );
    }
}
