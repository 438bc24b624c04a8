//! Configuration: the TOML file (plus `VAULT_*` and `LATCHKEY_*` variables) turned into a
//! validated [`Config`].
//!
//! Two stages, so that every error names its key: serde reads the file into `Raw*` structs that
//! refuse unknown keys and parse durations, CIDRs and addresses on the way in (with
//! `serde_path_to_error` supplying the key path), then [`Config::from_raw`] checks what spans
//! several keys. Nothing here holds a secret: tokens are stored as SHA-256 hashes, and the Vault
//! token is read from the environment or its file by the `vault` module when it is needed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::auth::{Client, Glob};
use crate::catalog::{Catalog, CatalogError, RawConnector};
use crate::destination::Passthrough;

/// A configuration error: the key it concerns and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl From<CatalogError> for ConfigError {
    fn from(e: CatalogError) -> Self {
        ConfigError {
            key: e.key,
            message: e.message,
        }
    }
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub vault: VaultConfig,
    pub cache: CacheConfig,
    pub tls: TlsConfig,
    pub clients: Vec<Client>,
    pub catalog: Catalog,
    /// `LATCHKEY_{SECTION}_{KEY}` variables whose section is none of the configuration's (a
    /// typo such as `LATCHKEY_PROXYY_LISTEN`, or a variable of another tool's): not applied,
    /// and named in a warning at start, since other readers share the prefix.
    pub ignored_variables: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: Vec<SocketAddr>,
    pub allow_private_destinations: Vec<IpNet>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// A client connection with no request in flight and no byte moving is closed after this.
    pub idle_timeout: Duration,
    /// A client has this long to send a whole request head, from its first byte.
    pub header_read_timeout: Duration,
    /// A request or response body with no byte moving either way for this long is cut.
    pub body_timeout: Duration,
    /// An idle pooled upstream connection is closed after this.
    pub pool_idle_timeout: Duration,
    /// Threads serving the proxy listeners, each with its own runtime and upstream pool.
    pub workers: usize,
    /// `proxy.resolve`: where a lower-case host and a port are dialled, instead of DNS.
    pub resolve: HashMap<(String, u16), SocketAddr>,
    /// `proxy.passthrough`: CONNECT targets spliced without TLS termination or credential.
    pub passthrough: Passthrough,
    /// `proxy.idle_release`: an idle HTTP/1.1 client connection holds no hyper connection and
    /// none of its buffers (served in turns); `false`: hyper's connection for its whole life.
    pub idle_release: bool,
    /// `proxy.http1_server`: which HTTP/1.1 server reads client connections.
    pub http1_server: Http1Server,
}

/// `proxy.http1_server`: the HTTP/1.1 server of client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Http1Server {
    /// hyper's, served in turns when `proxy.idle_release` is on ([`crate::release`]).
    Hyper,
    /// latchkey's own ([`crate::downstream`]), the default; requests it does not serve
    /// (upgrades, CONNECT, `Expect`) are handed to hyper's.
    #[default]
    Latchkey,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Admin tokens by name (`admin.token_sha256` is the one named "admin"); with none, the
    /// `/v1/` API answers 401 to everyone.
    pub tokens: Vec<AdminToken>,
    /// How long before a connection's `expires_at` its status turns to `expiring`.
    pub expiry_warning: Duration,
    /// `admin.tls_cert` and `admin.tls_key`: with them, the admin listener speaks only TLS.
    pub tls: Option<TlsFiles>,
    /// `admin.secure_cookie`: whether the web page's session cookie is `Secure` (by default,
    /// when the listener speaks TLS).
    pub secure_cookie: bool,
}

/// A named admin token, stored as its hash; the name is what audit lines show.
#[derive(Debug, Clone)]
pub struct AdminToken {
    pub name: String,
    pub token_sha256: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// Every node of the Vault (HA) cluster, in the order they are tried: never empty.
    pub addresses: Vec<String>,
    pub mount: String,
    pub prefix: String,
    pub timeout: Duration,
    pub ca_cert: Option<PathBuf>,
    /// Sent as `X-Vault-Namespace` with every request.
    pub namespace: Option<String>,
    pub auth: VaultAuth,
}

/// How latchkey gets its Vault token (`vault.auth`). No secret is part of the configuration:
/// the token, the secret ID and the JWT are read from the environment or their files by the
/// `vault` module when it needs them, and files are re-read at each login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// `VAULT_TOKEN`, read once at start.
    TokenEnv,
    /// A file holding the token, re-read whenever Vault refuses the current one.
    TokenFile(PathBuf),
    /// AppRole: the role ID, and a file holding the secret ID, or with `wrapped` a
    /// response-wrapping token that unwraps to one.
    AppRole {
        mount: String,
        role_id: String,
        secret_id_file: PathBuf,
        wrapped: bool,
    },
    /// JWT: a JWT from a file, for a role (the mount's `default_role` without one).
    Jwt {
        mount: String,
        role: Option<String>,
        jwt_file: PathBuf,
    },
    /// Kubernetes: the pod's service-account token, for a role.
    Kubernetes {
        mount: String,
        role: String,
        jwt_file: PathBuf,
    },
}

impl VaultAuth {
    /// The method's name, as `vault.auth.method` spells it.
    pub fn method(&self) -> &'static str {
        match self {
            VaultAuth::TokenEnv | VaultAuth::TokenFile(_) => "token",
            VaultAuth::AppRole { .. } => "approle",
            VaultAuth::Jwt { .. } => "jwt",
            VaultAuth::Kubernetes { .. } => "kubernetes",
        }
    }

    /// Whether latchkey logs in to get its token (every method but `token`).
    pub fn logs_in(&self) -> bool {
        !matches!(self, VaultAuth::TokenEnv | VaultAuth::TokenFile(_))
    }
}

/// Where a pod's service-account token is, for `method = "kubernetes"` without `jwt_file`.
pub const KUBERNETES_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub max_stale: Duration,
    pub negative_ttl: Duration,
    pub max_entries: usize,
    /// Per client: Vault reads that find no connection, per second on average.
    pub miss_rate: f64,
    /// Per client: how many such reads may come at once.
    pub miss_burst: u32,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub extra_roots: Vec<PathBuf>,
    /// The tunnel form's CA: the certificate and key PEM files (`latchkey ca init` makes them).
    pub ca: Option<CaFiles>,
}

/// Where latchkey's CA is kept.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the admin listener's certificate chain and its private key are kept (PEM). Only the
/// paths: the key is read when the listener starts, never kept in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// Stage one: the file as serde sees it.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    vault: RawVault,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    clients: Vec<RawClient>,
    #[serde(default)]
    connectors: BTreeMap<String, RawConnector>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    #[serde(default = "default_proxy_listen")]
    listen: OneOrMany<SocketAddr>,
    #[serde(default)]
    allow_private_destinations: OneOrMany<Cidr>,
    #[serde(default = "secs::<5>")]
    connect_timeout: Dur,
    #[serde(default = "secs::<60>")]
    request_timeout: Dur,
    #[serde(default = "secs::<60>")]
    idle_timeout: Dur,
    #[serde(default = "secs::<10>")]
    header_read_timeout: Dur,
    #[serde(default = "secs::<60>")]
    body_timeout: Dur,
    #[serde(default = "secs::<90>")]
    pool_idle_timeout: Dur,
    #[serde(default)]
    workers: Option<usize>,
    #[serde(default)]
    resolve: BTreeMap<String, String>,
    #[serde(default)]
    passthrough: Vec<String>,
    #[serde(default = "default_idle_release")]
    idle_release: bool,
    #[serde(default)]
    http1_server: Http1Server,
}

fn default_idle_release() -> bool {
    true
}

impl Default for RawProxy {
    fn default() -> Self {
        RawProxy {
            listen: default_proxy_listen(),
            allow_private_destinations: OneOrMany(Vec::new()),
            connect_timeout: secs::<5>(),
            request_timeout: secs::<60>(),
            idle_timeout: secs::<60>(),
            header_read_timeout: secs::<10>(),
            body_timeout: secs::<60>(),
            pool_idle_timeout: secs::<90>(),
            workers: None,
            resolve: BTreeMap::new(),
            passthrough: Vec::new(),
            idle_release: default_idle_release(),
            http1_server: Http1Server::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    listen: SocketAddr,
    #[serde(default)]
    token_sha256: Option<Sha256Hex>,
    #[serde(default)]
    tokens: Vec<RawAdminToken>,
    #[serde(default = "secs::<1_209_600>")]
    expiry_warning: Dur,
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
    #[serde(default)]
    secure_cookie: Option<bool>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin_listen(),
            token_sha256: None,
            tokens: Vec::new(),
            expiry_warning: secs::<1_209_600>(),
            tls_cert: None,
            tls_key: None,
            secure_cookie: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminToken {
    name: String,
    token_sha256: Sha256Hex,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVault {
    #[serde(default)]
    address: Option<OneOrMany<String>>,
    #[serde(default = "default_mount")]
    mount: String,
    #[serde(default = "default_prefix")]
    prefix: String,
    #[serde(default = "secs::<5>")]
    timeout: Dur,
    #[serde(default)]
    ca_cert: Option<PathBuf>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    auth: RawVaultAuth,
}

impl Default for RawVault {
    fn default() -> Self {
        RawVault {
            address: None,
            mount: default_mount(),
            prefix: default_prefix(),
            timeout: secs::<5>(),
            ca_cert: None,
            namespace: None,
            auth: RawVaultAuth::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVaultAuth {
    method: String,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    mount: Option<String>,
    #[serde(default)]
    role_id: Option<String>,
    #[serde(default)]
    secret_id_file: Option<PathBuf>,
    #[serde(default)]
    secret_id_wrapped: Option<bool>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    jwt_file: Option<PathBuf>,
}

impl Default for RawVaultAuth {
    fn default() -> Self {
        RawVaultAuth {
            method: "token".into(),
            token_file: None,
            mount: None,
            role_id: None,
            secret_id_file: None,
            secret_id_wrapped: None,
            role: None,
            jwt_file: None,
        }
    }
}

impl RawVaultAuth {
    /// The keys set besides `method`, by name.
    fn keys_set(&self) -> Vec<&'static str> {
        [
            ("token_file", self.token_file.is_some()),
            ("mount", self.mount.is_some()),
            ("role_id", self.role_id.is_some()),
            ("secret_id_file", self.secret_id_file.is_some()),
            ("secret_id_wrapped", self.secret_id_wrapped.is_some()),
            ("role", self.role.is_some()),
            ("jwt_file", self.jwt_file.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default = "secs::<300>")]
    ttl: Dur,
    #[serde(default = "secs::<3600>")]
    max_stale: Dur,
    #[serde(default = "secs::<10>")]
    negative_ttl: Dur,
    #[serde(default = "default_max_entries")]
    max_entries: usize,
    #[serde(default = "default_miss_rate")]
    miss_rate: f64,
    #[serde(default = "default_miss_burst")]
    miss_burst: u32,
}

fn default_miss_rate() -> f64 {
    10.0
}

fn default_miss_burst() -> u32 {
    20
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            ttl: secs::<300>(),
            max_stale: secs::<3600>(),
            negative_ttl: secs::<10>(),
            max_entries: default_max_entries(),
            miss_rate: default_miss_rate(),
            miss_burst: default_miss_burst(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default)]
    extra_roots: OneOrMany<PathBuf>,
    #[serde(default)]
    ca_cert: Option<PathBuf>,
    #[serde(default)]
    ca_key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: String,
    token_sha256: Sha256Hex,
    connections: OneOrMany<Glob>,
}

fn default_proxy_listen() -> OneOrMany<SocketAddr> {
    OneOrMany(vec![SocketAddr::from(([127, 0, 0, 1], 8080))])
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_mount() -> String {
    "secret".into()
}
fn default_prefix() -> String {
    "latchkey/connections".into()
}
fn default_max_entries() -> usize {
    100_000
}
fn secs<const N: u64>() -> Dur {
    Dur(Duration::from_secs(N))
}

/// A duration written as a string: `"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"1d"`, or several of
/// those run together (`"1m30s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(de::Error::custom)
    }
}

/// Parses the duration strings of the configuration file: `"500ms"`, `"30s"`, `"5m"`, `"1h"`,
/// `"1d"`, or several run together (`"1m30s"`), as the `humantime` crate reads them.
/// Ten years at most: no timeout, TTL or interval means more, and a clock or timer far past
/// that overflows.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|_| {
        format!("{text:?} is not a duration (write e.g. \"500ms\", \"30s\", \"5m\", \"1h\")")
    })?;
    if d > MAX_DURATION {
        return Err(format!(
            "{text:?} is longer than the longest duration latchkey takes, 10 years (\"3650d\")"
        ));
    }
    Ok(d)
}

const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// A CIDR such as `127.0.0.0/8`; a bare address means just that address.
#[derive(Debug, Clone, Copy)]
struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(net) = s.parse::<IpNet>() {
            if net.trunc() != net {
                return Err(de::Error::custom(format!(
                    "{s:?} has host bits set; did you mean {}?",
                    net.trunc()
                )));
            }
            return Ok(Cidr(net));
        }
        match s.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(Cidr(IpNet::from(ip))),
            Err(_) => Err(de::Error::custom(format!(
                "{s:?} is not a CIDR (write e.g. \"127.0.0.0/8\" or \"fd00::/8\")"
            ))),
        }
    }
}

/// A hex SHA-256 digest.
#[derive(Debug, Clone, Copy)]
struct Sha256Hex([u8; 32]);

impl<'de> Deserialize<'de> for Sha256Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_sha256_hex(&s)
            .map(Sha256Hex)
            .map_err(de::Error::custom)
    }
}

fn parse_sha256_hex(s: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).map_err(|_| {
        "must be the SHA-256 of the token as 64 hex digits (e.g. `printf %s \"$TOKEN\" | sha256sum`), not the token itself".to_string()
    })?;
    // An unset variable hashed (`printf %s "$TOKEN" | sha256sum`) would let in anyone who
    // sends no token at all: an empty Basic password, an empty form field.
    if out == EMPTY_SHA256 {
        return Err(
            "is the SHA-256 of an empty token (was the token's variable unset when it was hashed?)"
                .to_string(),
        );
    }
    Ok(out)
}

/// The SHA-256 of nothing.
const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Glob::parse(&s).map_err(de::Error::custom)
    }
}

/// A key that takes one value or a list of them.
#[derive(Debug, Clone)]
struct OneOrMany<T>(Vec<T>);

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Read the value whole, then deserialize the items, so that an item's own error (say,
        // "not a CIDR") reaches the user instead of serde's "did not match any variant".
        let value = toml::Value::deserialize(d)?;
        match value {
            toml::Value::Array(items) => items
                .into_iter()
                .map(|v| T::deserialize(v).map_err(de::Error::custom))
                .collect::<Result<Vec<_>, D::Error>>()
                .map(OneOrMany),
            other => T::deserialize(other)
                .map(|v| OneOrMany(vec![v]))
                .map_err(de::Error::custom),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// The process environment, as far as configuration is concerned. A seam so that tests need not
/// change the real environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
    fn vars(&self) -> Vec<(String, String)>;

    /// Whether a variable is set and not empty, for a secret one (`VAULT_TOKEN`) without
    /// keeping a copy of its value.
    fn is_set(&self, name: &str) -> bool {
        self.var(name).is_some()
    }
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    /// Only `LATCHKEY_*` variables: the others (`VAULT_TOKEN` among them) are copied out of the
    /// environment by the standard library's iterator, so each copy is zeroized at once.
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(name, value)| {
                let name = name.into_string().ok()?;
                let value = zeroize::Zeroizing::new(value.into_encoded_bytes());
                if !name.starts_with("LATCHKEY_") {
                    return None;
                }
                Some((name, String::from_utf8(value.to_vec()).ok()?))
            })
            .collect()
    }

    fn is_set(&self, name: &str) -> bool {
        std::env::var_os(name).is_some_and(|v| {
            let v = zeroize::Zeroizing::new(v.into_encoded_bytes());
            !v.is_empty()
        })
    }
}

/// The sections that `LATCHKEY_{SECTION}_{KEY}` variables may set.
const ENV_SECTIONS: [&str; 5] = ["proxy", "admin", "vault", "cache", "tls"];

impl Config {
    /// Reads and validates a configuration file, applying the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("(file)", format!("cannot read the file: {e}")))?;
        Config::parse(&text, &ProcessEnv)
    }

    /// Parses and validates configuration text against an environment.
    pub fn parse(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::new("(file)", format!("not valid TOML: {}", e.message().trim()))
                .with_span(text, e.span())
        })?;
        let (from_env, ignored) = apply_env(&mut table, env)?;
        // An error at a key a variable set names the variable: the file is not to blame.
        let blame = |mut e: ConfigError| {
            // The key itself, or an entry of the list or table it is (`proxy.passthrough[0]`).
            let under = |key: &str| {
                e.key == key
                    || e.key
                        .strip_prefix(key)
                        .is_some_and(|rest| rest.starts_with('[') || rest.starts_with('.'))
            };
            if let Some((_, var)) = from_env.iter().find(|(key, _)| under(key)) {
                e.key = format!("{var} ({})", e.key);
            }
            e
        };
        let raw: RawConfig = loop {
            match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
                Ok(raw) => break raw,
                Err(e) => {
                    let key = e.path().to_string();
                    // A variable's value read as a number or a boolean where the key takes a
                    // string (`LATCHKEY_VAULT_NAMESPACE=2024`): taken as the string it was.
                    if let Some((_, var)) = from_env.iter().find(|(k, _)| *k == key) {
                        if as_string(&mut table, &key, env.var(var).unwrap_or_default()) {
                            continue;
                        }
                    }
                    let key = if key == "." {
                        "(file)".to_string()
                    } else {
                        key
                    };
                    return Err(blame(ConfigError::new(
                        key,
                        e.into_inner().message().trim().to_string(),
                    )));
                }
            }
        };
        let mut config = Config::from_raw(raw, env).map_err(blame)?;
        config.ignored_variables = ignored;
        Ok(config)
    }

    /// Checks each section in turn; the first error found is the one reported.
    fn from_raw(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigError> {
        let proxy = ProxyConfig::from_raw(raw.proxy)?;
        let clients = clients(raw.clients, &proxy)?;
        let admin = AdminConfig::from_raw(raw.admin)?;
        distinct_listeners(&proxy, &admin)?;
        let vault = VaultConfig::from_raw(raw.vault, env)?;
        let cache = CacheConfig::from_raw(raw.cache)?;
        let tls = TlsConfig::from_raw(raw.tls)?;
        let catalog = Catalog::with_overrides(raw.connectors)?;
        Ok(Config {
            proxy,
            admin,
            vault,
            cache,
            tls,
            clients,
            catalog,
            ignored_variables: Vec::new(),
        })
    }
}

impl ProxyConfig {
    /// The `[proxy]` table: positive timeouts, a sane worker count, at least one listener.
    fn from_raw(raw: RawProxy) -> Result<ProxyConfig, ConfigError> {
        let proxy = ProxyConfig {
            listen: raw.listen.0,
            allow_private_destinations: raw
                .allow_private_destinations
                .0
                .into_iter()
                .map(|c| c.0)
                .collect(),
            connect_timeout: positive("proxy.connect_timeout", raw.connect_timeout)?,
            request_timeout: positive("proxy.request_timeout", raw.request_timeout)?,
            idle_timeout: positive("proxy.idle_timeout", raw.idle_timeout)?,
            header_read_timeout: positive("proxy.header_read_timeout", raw.header_read_timeout)?,
            body_timeout: positive("proxy.body_timeout", raw.body_timeout)?,
            pool_idle_timeout: positive("proxy.pool_idle_timeout", raw.pool_idle_timeout)?,
            workers: match raw.workers {
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
                Some(n) if (1..=1024).contains(&n) => n,
                Some(_) => {
                    return Err(ConfigError::new(
                        "proxy.workers",
                        "must be between 1 and 1024 (default: one per CPU)",
                    ))
                }
            },
            resolve: resolve_pins(raw.resolve)?,
            passthrough: passthrough(raw.passthrough)?,
            idle_release: raw.idle_release,
            http1_server: raw.http1_server,
        };
        if proxy.listen.is_empty() {
            return Err(ConfigError::new(
                "proxy.listen",
                "needs at least one address",
            ));
        }
        Ok(proxy)
    }
}

/// The `[[clients]]`; with none, the proxy may listen only on loopback.
fn clients(raw: Vec<RawClient>, proxy: &ProxyConfig) -> Result<Vec<Client>, ConfigError> {
    let mut clients = Vec::with_capacity(raw.len());
    let mut names = HashSet::new();
    let mut hashes = HashSet::new();
    for (i, c) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("clients[{i}].{k}");
        if c.name.trim().is_empty() {
            return Err(ConfigError::new(key("name"), "must not be empty"));
        }
        if !names.insert(c.name.clone()) {
            return Err(ConfigError::new(
                key("name"),
                format!("{:?} names two clients", c.name),
            ));
        }
        if !hashes.insert(c.token_sha256.0) {
            return Err(ConfigError::new(
                key("token_sha256"),
                "the same token hash is given to two clients",
            ));
        }
        if c.connections.0.is_empty() {
            return Err(ConfigError::new(
                key("connections"),
                "lists no connections; give IDs or patterns such as \"stripe-*\"",
            ));
        }
        clients.push(Client {
            name: std::sync::Arc::from(c.name),
            token_sha256: c.token_sha256.0,
            connections: c.connections.0,
        });
    }
    if clients.is_empty() {
        if let Some(addr) = proxy.listen.iter().find(|a| !a.ip().is_loopback()) {
            return Err(ConfigError::new(
                "proxy.listen",
                format!(
                    "{addr} is not a loopback address and no [[clients]] are configured: \
                     latchkey runs without client tokens only on loopback (the sidecar case); \
                     add [[clients]] entries or listen on 127.0.0.1"
                ),
            ));
        }
    }
    Ok(clients)
}

impl AdminConfig {
    /// The `[admin]` table. The TLS files are checked as `tls.ca_cert` is: both or neither,
    /// each readable now; their contents are parsed when the listener starts.
    fn from_raw(raw: RawAdmin) -> Result<AdminConfig, ConfigError> {
        let tls = file_pair(
            ("admin.tls_cert", raw.tls_cert),
            ("admin.tls_key", raw.tls_key),
        )?
        .map(|(cert, key)| TlsFiles { cert, key });
        // Without TLS here, `true` is for a listener behind a proxy that terminates TLS.
        let secure_cookie = raw.secure_cookie.unwrap_or(tls.is_some());
        Ok(AdminConfig {
            listen: raw.listen,
            tokens: admin_tokens(raw.token_sha256, raw.tokens)?,
            expiry_warning: raw.expiry_warning.0,
            tls,
            secure_cookie,
        })
    }
}

/// `admin.token_sha256` as the token named "admin", then `admin.tokens`, each name and hash once.
fn admin_tokens(
    token_sha256: Option<Sha256Hex>,
    raw: Vec<RawAdminToken>,
) -> Result<Vec<AdminToken>, ConfigError> {
    let mut tokens = Vec::new();
    if let Some(h) = token_sha256 {
        tokens.push(AdminToken {
            name: "admin".into(),
            token_sha256: h.0,
        });
    }
    for (i, t) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("admin.tokens[{i}].{k}");
        if t.name.trim().is_empty() {
            return Err(ConfigError::new(key("name"), "must not be empty"));
        }
        if tokens.iter().any(|o| o.name == t.name) {
            return Err(ConfigError::new(
                key("name"),
                format!("{:?} names two admin tokens", t.name),
            ));
        }
        if tokens.iter().any(|o| o.token_sha256 == t.token_sha256.0) {
            return Err(ConfigError::new(
                key("token_sha256"),
                "the same token hash is given twice",
            ));
        }
        tokens.push(AdminToken {
            name: t.name,
            token_sha256: t.token_sha256.0,
        });
    }
    Ok(tokens)
}

impl VaultConfig {
    /// The `[vault]` table, with `VAULT_ADDR`, `VAULT_CACERT`, `VAULT_NAMESPACE` and
    /// `VAULT_TOKEN` taking precedence. `VAULT_ADDR` may name several nodes, comma-separated.
    fn from_raw(raw: RawVault, env: &dyn Env) -> Result<VaultConfig, ConfigError> {
        let addresses = match (env.var("VAULT_ADDR"), raw.address) {
            (Some(var), _) => var.split(',').map(|a| a.trim().to_string()).collect(),
            (None, Some(list)) => list.0,
            (None, None) => vec!["http://127.0.0.1:8200".to_string()],
        };
        if addresses.is_empty() {
            return Err(ConfigError::new(
                "vault.address",
                "names no address; give one, or a list of every node of the cluster",
            ));
        }
        // A value from the environment is blamed on its variable, not on the file's key.
        let named = |e: ConfigError, var: &str| match env.var(var) {
            Some(_) => ConfigError {
                key: format!("{var} ({})", e.key),
                ..e
            },
            None => e,
        };
        for address in &addresses {
            check_vault_address(address).map_err(|e| named(e, "VAULT_ADDR"))?;
        }
        let namespace = match env.var("VAULT_NAMESPACE").or(raw.namespace) {
            Some(ns) => Some(check_vault_namespace(&ns).map_err(|e| named(e, "VAULT_NAMESPACE"))?),
            None => None,
        };
        let mount = raw.mount.trim_matches('/').to_string();
        if mount.is_empty() || !is_vault_path(&mount) {
            return Err(ConfigError::new(
                "vault.mount",
                format!(
                    "{:?} is not a mount path (letters, digits, '-', '_', '.', '/'; no empty, '.' or '..' segment)",
                    raw.mount
                ),
            ));
        }
        let prefix = raw.prefix.trim_matches('/').to_string();
        if !prefix.is_empty() && !is_vault_path(&prefix) {
            return Err(ConfigError::new(
                "vault.prefix",
                format!(
                    "{:?} is not a path prefix (letters, digits, '-', '_', '.', '/'; no empty, '.' or '..' segment)",
                    raw.prefix
                ),
            ));
        }
        let auth = vault_auth(raw.auth, env)?;
        let ca_cert = env.var("VAULT_CACERT").map(PathBuf::from).or(raw.ca_cert);
        if let Some(path) = &ca_cert {
            pem_certificates("vault.ca_cert", path).map_err(|e| named(e, "VAULT_CACERT"))?;
        }
        Ok(VaultConfig {
            addresses,
            mount,
            prefix,
            timeout: positive("vault.timeout", raw.timeout)?,
            ca_cert,
            namespace,
            auth,
        })
    }
}

/// The `vault.auth` table: the method and the keys it takes. With `method = "token"`,
/// `VAULT_TOKEN` wins over `vault.auth.token_file`; the other methods do not read `VAULT_TOKEN`.
/// Whether there is a token at all is `serve`'s question ([`VaultConfig::check_credentials`]):
/// a file is checked, and reloaded, without one.
fn vault_auth(raw: RawVaultAuth, env: &dyn Env) -> Result<VaultAuth, ConfigError> {
    let method = raw.method.clone();
    let keys: &[&str] = match method.as_str() {
        "token" => &["token_file"],
        "approle" => &["mount", "role_id", "secret_id_file", "secret_id_wrapped"],
        "jwt" | "kubernetes" => &["mount", "role", "jwt_file"],
        other => {
            return Err(ConfigError::new(
                "vault.auth.method",
                format!(
                    "{other:?} is not supported; the methods are \"token\", \"approle\", \"jwt\" and \"kubernetes\""
                ),
            ))
        }
    };
    if let Some(key) = raw.keys_set().into_iter().find(|k| !keys.contains(k)) {
        return Err(ConfigError::new(
            format!("vault.auth.{key}"),
            format!(
                "is not a key of method {method:?} (its keys: {})",
                keys.join(", ")
            ),
        ));
    }
    let mount = |default: &str| auth_mount(raw.mount.as_deref().unwrap_or(default));
    match method.as_str() {
        "approle" => Ok(VaultAuth::AppRole {
            mount: mount("approle")?,
            role_id: required("role_id", raw.role_id, "the AppRole's role ID")?,
            secret_id_file: required_file(
                "secret_id_file",
                raw.secret_id_file,
                "a file holding the secret ID (or, with secret_id_wrapped = true, a wrapping token for it)",
            )?,
            wrapped: raw.secret_id_wrapped.unwrap_or(false),
        }),
        "jwt" => Ok(VaultAuth::Jwt {
            mount: mount("jwt")?,
            role: match raw.role {
                Some(role) => Some(required("role", Some(role), "a role name")?),
                None => None,
            },
            jwt_file: required_file("jwt_file", raw.jwt_file, "a file holding the JWT")?,
        }),
        "kubernetes" => Ok(VaultAuth::Kubernetes {
            mount: mount("kubernetes")?,
            role: required("role", raw.role, "the role bound to the pod's service account")?,
            jwt_file: required_file(
                "jwt_file",
                Some(
                    raw.jwt_file
                        .unwrap_or_else(|| PathBuf::from(KUBERNETES_TOKEN_FILE)),
                ),
                "the service-account token file",
            )?,
        }),
        _ => match raw.token_file {
            Some(path) if !env.is_set("VAULT_TOKEN") => Ok(VaultAuth::TokenFile(path)),
            _ => Ok(VaultAuth::TokenEnv),
        },
    }
}

/// A `vault.auth` string that the method needs: present and not blank.
fn required(key: &str, value: Option<String>, what: &str) -> Result<String, ConfigError> {
    match value.map(|v| v.trim().to_string()) {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err(ConfigError::new(
            format!("vault.auth.{key}"),
            format!("is empty; it must name {what}"),
        )),
        None => Err(ConfigError::new(
            format!("vault.auth.{key}"),
            format!("is missing; this method needs {what}"),
        )),
    }
}

/// A `vault.auth` file path that the method needs. The file itself is read at each login, not
/// here: it may be written (or rotated) after latchkey starts, and `check-config` reads no
/// secret.
fn required_file(key: &str, value: Option<PathBuf>, what: &str) -> Result<PathBuf, ConfigError> {
    match value {
        Some(p) if !p.as_os_str().is_empty() => Ok(p),
        Some(_) => Err(ConfigError::new(
            format!("vault.auth.{key}"),
            format!("is empty; it must name {what}"),
        )),
        None => Err(ConfigError::new(
            format!("vault.auth.{key}"),
            format!("is missing; this method needs {what}"),
        )),
    }
}

/// `vault.auth.mount`: where the auth method is mounted (`auth/{mount}/login`).
fn auth_mount(raw: &str) -> Result<String, ConfigError> {
    let mount = raw.trim_matches('/').to_string();
    let dots = mount.split('/').any(|s| s == "." || s == "..");
    if mount.is_empty() || !mount.chars().all(is_path_char) || mount.contains("//") || dots {
        return Err(ConfigError::new(
            "vault.auth.mount",
            format!("{raw:?} is not a mount path (letters, digits, '-', '_', '.', '/'; no '..')"),
        ));
    }
    Ok(mount)
}

impl VaultConfig {
    /// What `serve` needs besides a file that checks: the means to log in to Vault (for token
    /// auth, `VAULT_TOKEN` set or `vault.auth.token_file` readable and not empty).
    /// `check-config` and a reload do not ask.
    pub fn check_credentials(&self, env: &dyn Env) -> Result<(), ConfigError> {
        match &self.auth {
            VaultAuth::TokenEnv if !env.is_set("VAULT_TOKEN") => Err(ConfigError::new(
                "vault.auth",
                "token auth needs a token: set VAULT_TOKEN or vault.auth.token_file",
            )),
            // The token is read at start, and without it there is nothing to start with. A
            // login's file may come later (written by an agent): latchkey starts not ready
            // and logs in once it can.
            VaultAuth::TokenFile(path) => readable("vault.auth.token_file", path),
            _ => Ok(()),
        }
    }
}

/// Whether the file at `path`, which holds a credential (never put in a message), can be read
/// and is not empty.
fn readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::read(path) {
        Err(e) => Err(ConfigError::new(
            key,
            format!("cannot read {}: {e}", path.display()),
        )),
        Ok(bytes) if bytes.trim_ascii().is_empty() => Err(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        )),
        Ok(mut bytes) => {
            zeroize::Zeroize::zeroize(&mut bytes);
            Ok(())
        }
    }
}

impl CacheConfig {
    /// The `[cache]` table: a positive TTL and room for at least one entry.
    fn from_raw(raw: RawCache) -> Result<CacheConfig, ConfigError> {
        let cache = CacheConfig {
            ttl: positive("cache.ttl", raw.ttl)?,
            max_stale: raw.max_stale.0,
            negative_ttl: raw.negative_ttl.0,
            max_entries: raw.max_entries,
            miss_rate: raw.miss_rate,
            miss_burst: raw.miss_burst,
        };
        if cache.max_entries == 0 {
            return Err(ConfigError::new("cache.max_entries", "must be at least 1"));
        }
        if !(cache.miss_rate.is_finite() && cache.miss_rate > 0.0) {
            return Err(ConfigError::new(
                "cache.miss_rate",
                "must be a number of reads per second greater than zero",
            ));
        }
        if cache.miss_burst == 0 {
            return Err(ConfigError::new("cache.miss_burst", "must be at least 1"));
        }
        Ok(cache)
    }
}

/// `proxy.passthrough`: hosts, `*.suffix` patterns, either with `:port` (443 without).
fn passthrough(raw: Vec<String>) -> Result<Passthrough, ConfigError> {
    let mut hosts = Passthrough::default();
    for (i, entry) in raw.iter().enumerate() {
        hosts
            .push(entry)
            .map_err(|why| ConfigError::new(format!("proxy.passthrough[{i}]"), why))?;
    }
    Ok(hosts)
}

/// `proxy.resolve`: `"host:port" = "ip:port"` pairs, like curl's `--resolve`.
fn resolve_pins(
    raw: BTreeMap<String, String>,
) -> Result<HashMap<(String, u16), SocketAddr>, ConfigError> {
    let mut pins = HashMap::with_capacity(raw.len());
    for (from, to) in raw {
        let key = format!("proxy.resolve.{from:?}");
        let authority: http::uri::Authority = from
            .parse()
            .map_err(|_| ConfigError::new(&key, "the key must be \"host:port\""))?;
        let port = authority.port_u16().ok_or_else(|| {
            ConfigError::new(&key, "the key must be \"host:port\" (with the port)")
        })?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let addr: SocketAddr = to
            .parse()
            .map_err(|_| ConfigError::new(&key, format!("{to:?} is not an address \"ip:port\"")))?;
        pins.insert((host, port), addr);
    }
    Ok(pins)
}

impl TlsConfig {
    /// The `[tls]` table: every extra root readable now, not at the first request.
    fn from_raw(raw: RawTls) -> Result<TlsConfig, ConfigError> {
        for (i, path) in raw.extra_roots.0.iter().enumerate() {
            pem_certificates(&format!("tls.extra_roots[{i}]"), path)?;
        }
        let ca = file_pair(("tls.ca_cert", raw.ca_cert), ("tls.ca_key", raw.ca_key))?
            .map(|(cert, key)| CaFiles { cert, key });
        Ok(TlsConfig {
            extra_roots: raw.extra_roots.0,
            ca,
        })
    }
}

impl ConfigError {
    fn with_span(mut self, text: &str, span: Option<std::ops::Range<usize>>) -> Self {
        if let Some(span) = span {
            let line = text
                .bytes()
                .take(span.start)
                .filter(|b| *b == b'\n')
                .count()
                + 1;
            self.key = format!("line {line}");
        }
        self
    }
}

/// A path inside Vault as latchkey writes it: segments of path characters, none empty, `.` or
/// `..` (which an HTTP client would fold away, reading somewhere else than the file says).
fn is_vault_path(path: &str) -> bool {
    path.split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && seg.chars().all(is_path_char))
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '.')
}

fn positive(key: &str, d: Dur) -> Result<Duration, ConfigError> {
    if d.0.is_zero() {
        Err(ConfigError::new(key, "must be greater than zero"))
    } else {
        Ok(d.0)
    }
}

/// A certificate file and its key file (`tls.ca_cert`/`tls.ca_key`, `admin.tls_cert`/
/// `admin.tls_key`): both or neither, each readable now.
fn file_pair(
    (cert_key, cert): (&str, Option<PathBuf>),
    (key_key, key): (&str, Option<PathBuf>),
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => {
            pem_certificates(cert_key, &cert)?;
            pem_private_key(key_key, &key)?;
            Ok(Some((cert, key)))
        }
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::new(
            key_key,
            format!("is needed when {cert_key} is set"),
        )),
        (None, Some(_)) => Err(ConfigError::new(
            cert_key,
            format!("is needed when {key_key} is set"),
        )),
    }
}

/// Each listener address once: a second bind of one would fail at start, after the file
/// checked. (Port 0, a port the system picks, may repeat.)
fn distinct_listeners(proxy: &ProxyConfig, admin: &AdminConfig) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for addr in &proxy.listen {
        if addr.port() != 0 && !seen.insert(*addr) {
            return Err(ConfigError::new(
                "proxy.listen",
                format!("{addr} is listed twice"),
            ));
        }
    }
    if admin.listen.port() != 0 && seen.contains(&admin.listen) {
        return Err(ConfigError::new(
            "admin.listen",
            format!("{} is also a proxy.listen address", admin.listen),
        ));
    }
    Ok(())
}

/// A PEM file holding at least one certificate, each of which parses.
fn pem_certificates(key: &str, path: &Path) -> Result<(), ConfigError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|_| ConfigError::new(key, format!("{} is not PEM", path.display())))?;
        found += 1;
    }
    if found == 0 {
        return Err(ConfigError::new(
            key,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// A PEM file holding a private key. (What it holds is never part of the message.)
fn pem_private_key(key: &str, path: &Path) -> Result<(), ConfigError> {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    let pem = std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map(|_| ())
        .map_err(|_| ConfigError::new(key, format!("{} holds no PEM private key", path.display())))
}

fn check_vault_address(address: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = address
        .parse()
        .map_err(|_| ConfigError::new("vault.address", format!("{address:?} is not a URL")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => Err(ConfigError::new(
            "vault.address",
            format!("{address:?} must be an http:// or https:// URL with a host"),
        )),
    }
}

/// A namespace path (`team-a`, `org/team-a`): it goes into a header, so only path characters.
fn check_vault_namespace(namespace: &str) -> Result<String, ConfigError> {
    let trimmed = namespace.trim_matches('/');
    if trimmed.is_empty() || !trimmed.chars().all(is_path_char) || trimmed.contains("//") {
        return Err(ConfigError::new(
            "vault.namespace",
            format!("{namespace:?} is not a namespace path (letters, digits, '-', '_', '.', '/')"),
        ));
    }
    Ok(trimmed.to_string())
}

/// Applies `LATCHKEY_{SECTION}_{KEY}` variables: `LATCHKEY_CACHE_TTL=30s` sets `cache.ttl`.
/// A value that parses as a TOML value (a number, a list) is taken as one, anything else as a
/// string. Variables whose section is not a configuration section are left to other readers
/// (the CLI's `LATCHKEY_API_URL`, say).
/// Returns the keys set, each with its variable's name (`cache.ttl`, `LATCHKEY_CACHE_TTL`), and
/// the variables that look like settings of a section there is not ([`Config::ignored_variables`]).
fn apply_env(table: &mut toml::Table, env: &dyn Env) -> Result<Applied, ConfigError> {
    let mut set = Vec::new();
    let mut ignored = Vec::new();
    let mut vars = env.vars();
    vars.sort();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("LATCHKEY_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let Some((section, key)) = rest.split_once('_') else {
            continue;
        };
        if !ENV_SECTIONS.contains(&section) {
            if !OTHER_VARIABLES.contains(&name.as_str()) {
                ignored.push(name);
            }
            continue;
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let section_table = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match section_table {
            toml::Value::Table(t) => {
                t.insert(key.to_string(), parsed);
                set.push((format!("{section}.{key}"), name.clone()));
            }
            _ => {
                return Err(ConfigError::new(
                    section,
                    format!("must be a table (while applying {name})"),
                ))
            }
        }
    }
    Ok((set, ignored))
}

/// What [`apply_env`] did: the keys set with their variables, and the variables ignored.
type Applied = (Vec<(String, String)>, Vec<String>);

/// `LATCHKEY_*` variables of latchkey's own that are not settings (the CLI's, the tests' and
/// the scripts').
const OTHER_VARIABLES: [&str; 7] = [
    "LATCHKEY_API_URL",
    "LATCHKEY_API_TOKEN",
    "LATCHKEY_E2E_HTTP1_SERVER",
    "LATCHKEY_FUZZ_JOBS",
    "LATCHKEY_FUZZ_OUT",
    "LATCHKEY_AUDIT_INSTALL",
    "LATCHKEY_ADVISORY_DB",
];

/// Sets `section.key` in `table` to `value` as a string, unless it is one already (then there
/// is nothing to retry).
fn as_string(table: &mut toml::Table, key: &str, value: String) -> bool {
    let Some((section, key)) = key.split_once('.') else {
        return false;
    };
    match table.get_mut(section).and_then(|t| t.get_mut(key)) {
        // A number, a boolean or a date: a list or a table was meant as one.
        Some(v) if !v.is_str() && !v.is_array() && !v.is_table() => {
            *v = toml::Value::String(value);
            true
        }
        _ => false,
    }
}

impl fmt::Display for Config {
    /// A summary for `check-config`: what will listen where, and how much is configured.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let listen: Vec<String> = self.proxy.listen.iter().map(|a| a.to_string()).collect();
        writeln!(f, "proxy listeners: {}", listen.join(", "))?;
        let admin_tls = if self.admin.tls.is_some() {
            " (TLS)"
        } else {
            ""
        };
        writeln!(f, "admin listener:  {}{admin_tls}", self.admin.listen)?;
        writeln!(
            f,
            "vault:           {} (mount {:?}, prefix {:?})",
            self.vault.addresses.join(", "),
            self.vault.mount,
            self.vault.prefix
        )?;
        writeln!(f, "clients:         {}", self.clients.len())?;
        write!(f, "connectors:      {}", self.catalog.len())?;
        for name in &self.ignored_variables {
            write!(
                f,
                "\nignored:         {name} (not a configuration variable: no such section)"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeEnv(Vec<(&'static str, &'static str)>);
    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
        fn vars(&self) -> Vec<(String, String)> {
            self.0
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }
    }

    fn with_token() -> FakeEnv {
        FakeEnv(vec![("VAULT_TOKEN", "t")])
    }

    fn err(text: &str) -> ConfigError {
        match Config::parse(text, &with_token()) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e,
        }
    }

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::parse("", &with_token()).unwrap();
        assert_eq!(c.proxy.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.vault.mount, "secret");
        assert_eq!(c.vault.prefix, "latchkey/connections");
        assert_eq!(c.vault.addresses, ["http://127.0.0.1:8200"]);
        assert_eq!(c.cache.ttl, Duration::from_secs(300));
        assert_eq!(c.cache.max_stale, Duration::from_secs(3600));
        assert_eq!(c.cache.negative_ttl, Duration::from_secs(10));
        assert_eq!(c.cache.max_entries, 100_000);
        assert_eq!(c.cache.miss_rate, 10.0);
        assert_eq!(c.cache.miss_burst, 20);
        assert_eq!(c.proxy.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.proxy.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.proxy.body_timeout, Duration::from_secs(60));
        assert_eq!(c.proxy.pool_idle_timeout, Duration::from_secs(90));
        assert!(c.proxy.idle_release);
        assert_eq!(c.vault.auth, VaultAuth::TokenEnv);
        assert!(c.admin.tokens.is_empty());
        assert_eq!(c.admin.expiry_warning, Duration::from_secs(14 * 86_400));
    }

    #[test]
    fn admin_tokens_are_named() {
        let c = Config::parse(
            &format!("[admin]\ntoken_sha256 = \"{HASH}\"\n[[admin.tokens]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\n", "a".repeat(64)),
            &with_token(),
        )
        .unwrap();
        let names: Vec<_> = c.admin.tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, vec!["admin", "ops"]);
        let e = err(&format!("[admin]\ntoken_sha256 = \"{HASH}\"\n[[admin.tokens]]\nname = \"x\"\ntoken_sha256 = \"{HASH}\"\n"));
        assert_eq!(e.key, "admin.tokens[0].token_sha256");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        // humantime's words and spacing are taken too.
        assert_eq!(parse_duration("5 minutes"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3650d"), Ok(MAX_DURATION));
        assert!(parse_duration("3651d").unwrap_err().contains("10 years"));
        assert!(parse_duration("18446744073709551615s").is_err());
        for bad in ["", "5", "s", "5x", "-5s", "5 parsecs", "5m and more"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err("[proxy]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n");
        assert_eq!(e.key, "proxy.listne", "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
        let e = err("[cache]\nttl = \"5m\"\n[wat]\n");
        assert!(e.message.contains("wat"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = err("[cache]\nttl = \"5 parsecs\"\n");
        assert_eq!(e.key, "cache.ttl");
        assert!(e.message.contains("not a duration"), "{e}");
        let e = err("[proxy]\nallow_private_destinations = [\"10.0.0.0/33\"]\n");
        assert_eq!(e.key, "proxy.allow_private_destinations", "{e}");
        assert!(e.message.contains("not a CIDR"), "{e}");
        let e = err("[proxy]\nlisten = \"localhost:80\"\n");
        assert_eq!(e.key, "proxy.listen", "{e}");
        let e = err("[cache]\nttl = \"0s\"\n");
        assert_eq!(e.key, "cache.ttl");
        let e = err("[proxy]\nbody_timeout = \"0s\"\n");
        assert_eq!(e.key, "proxy.body_timeout");
        let e = err("[proxy]\npool_idle_timeout = \"soon\"\n");
        assert_eq!(e.key, "proxy.pool_idle_timeout");
        let e = err("[[clients]]\nname = \"a\"\ntoken_sha256 = \"abc\"\nconnections = [\"x\"]\n");
        assert_eq!(e.key, "clients[0].token_sha256", "{e}");
        let e = err(&format!(
            "[[clients]]\nname = \"a\"\ntoken_sha256 = \"{HASH}\"\nconnections = [\"stripe-[\"]\n"
        ));
        assert_eq!(e.key, "clients[0].connections", "{e}");
        let e = err("[vault]\naddress = \"ftp://x\"\n");
        assert_eq!(e.key, "vault.address");
        let e = err("[vault]\nauth = { method = \"kerberos\" }\n");
        assert_eq!(e.key, "vault.auth.method");
        let e = err("[proxy\n");
        assert_eq!(e.key, "line 1", "{e}");
    }

    #[test]
    fn resolve_pins_and_the_ca_files_are_checked() {
        let c = Config::parse(
            "[proxy]\nresolve = { \"API.Stripe.com:443\" = \"127.0.0.1:9443\" }\n",
            &with_token(),
        )
        .unwrap();
        assert_eq!(
            c.proxy.resolve.get(&("api.stripe.com".to_string(), 443)),
            Some(&"127.0.0.1:9443".parse().unwrap())
        );
        let e = err("[proxy]\nresolve = { \"api.stripe.com\" = \"127.0.0.1:9443\" }\n");
        assert!(e.key.starts_with("proxy.resolve"), "{e}");
        assert!(e.message.contains("port"), "{e}");
        let e = err("[proxy]\nresolve = { \"api.stripe.com:443\" = \"localhost:9443\" }\n");
        assert!(e.message.contains("not an address"), "{e}");
        let e = err("[tls]\nca_cert = \"/nonexistent/ca.pem\"\n");
        assert_eq!(e.key, "tls.ca_key", "{e}");
        let e = err("[tls]\nca_cert = \"/nonexistent/ca.pem\"\nca_key = \"/nonexistent/ca.key\"\n");
        assert_eq!(e.key, "tls.ca_cert", "{e}");
    }

    #[test]
    fn admin_tls_takes_both_files_or_neither_and_sets_the_cookie_default() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pem_pair(dir.path());

        let c = Config::parse("", &with_token()).unwrap();
        assert!(c.admin.tls.is_none());
        assert!(!c.admin.secure_cookie);

        let c = Config::parse(
            &format!("[admin]\ntls_cert = {cert:?}\ntls_key = {key:?}\n"),
            &with_token(),
        )
        .unwrap();
        let files = c.admin.tls.as_ref().unwrap();
        assert_eq!(
            (files.cert.to_str(), files.key.to_str()),
            (Some(&*cert), Some(&*key))
        );
        assert!(c.admin.secure_cookie);
        assert!(c.to_string().contains("(TLS)"), "{c}");

        // TLS terminated in front of the listener: `Secure` without TLS here.
        let c = Config::parse("[admin]\nsecure_cookie = true\n", &with_token()).unwrap();
        assert!(c.admin.tls.is_none());
        assert!(c.admin.secure_cookie);
        let c = Config::parse(
            &format!("[admin]\ntls_cert = {cert:?}\ntls_key = {key:?}\nsecure_cookie = false\n"),
            &with_token(),
        )
        .unwrap();
        assert!(!c.admin.secure_cookie);

        let e = err(&format!("[admin]\ntls_cert = {cert:?}\n"));
        assert_eq!(e.key, "admin.tls_key", "{e}");
        assert!(e.message.contains("admin.tls_cert"), "{e}");
        let e = err(&format!("[admin]\ntls_key = {key:?}\n"));
        assert_eq!(e.key, "admin.tls_cert", "{e}");
        assert!(e.message.contains("admin.tls_key"), "{e}");
        let e = err("[admin]\nsecure_cookie = \"yes\"\n");
        assert_eq!(e.key, "admin.secure_cookie", "{e}");
    }

    #[test]
    fn vault_paths_have_no_dot_or_empty_segments() {
        for (toml, key) in [
            ("[vault]\nprefix = \"../metadata/x\"\n", "vault.prefix"),
            ("[vault]\nprefix = \"a/./b\"\n", "vault.prefix"),
            ("[vault]\nprefix = \"a//b\"\n", "vault.prefix"),
            ("[vault]\nmount = \"..\"\n", "vault.mount"),
            ("[vault]\nmount = \"kv/../secret\"\n", "vault.mount"),
            ("[vault]\nmount = \"kv v2\"\n", "vault.mount"),
        ] {
            let e = err(toml);
            assert_eq!(e.key, key, "{toml}: {e}");
        }
        let c = Config::parse(
            "[vault]\nmount = \"team-a/kv\"\nprefix = \"/apps/v1.2/conns/\"\n",
            &with_token(),
        )
        .unwrap();
        assert_eq!(
            (c.vault.mount.as_str(), c.vault.prefix.as_str()),
            ("team-a/kv", "apps/v1.2/conns")
        );
    }

    /// A self-signed certificate and its key, PEM, in `dir`: their paths.
    fn pem_pair(dir: &std::path::Path) -> (String, String) {
        let made = rcgen::generate_simple_self_signed(vec!["admin.test".to_string()]).unwrap();
        let cert = dir.join("admin.pem");
        let key = dir.join("admin.key");
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
        (cert.display().to_string(), key.display().to_string())
    }

    #[test]
    fn an_admin_tls_file_that_cannot_be_read_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pem_pair(dir.path());
        let e = err(&format!(
            "[admin]\ntls_cert = \"/nonexistent/admin.pem\"\ntls_key = {key:?}\n"
        ));
        assert_eq!(e.key, "admin.tls_cert", "{e}");
        assert!(e.message.contains("/nonexistent/admin.pem"), "{e}");
        let e = err(&format!(
            "[admin]\ntls_cert = {cert:?}\ntls_key = \"/nonexistent/admin.key\"\n"
        ));
        assert_eq!(e.key, "admin.tls_key", "{e}");
        assert!(e.message.contains("/nonexistent/admin.key"), "{e}");
    }

    /// What `serve` would fail on at start is refused by the check itself (exit 64 from both):
    /// files that are not PEM, a listener address given twice.
    #[test]
    fn certificate_files_must_be_pem_and_listeners_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pem_pair(dir.path());
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let junk = junk.display().to_string();
        for (toml, key_named) in [
            (
                format!("[tls]\nextra_roots = [{junk:?}]\n"),
                "tls.extra_roots[0]",
            ),
            (
                format!("[tls]\nextra_roots = [{key:?}]\n"),
                "tls.extra_roots[0]",
            ),
            (
                format!("[tls]\nca_cert = {junk:?}\nca_key = {key:?}\n"),
                "tls.ca_cert",
            ),
            (
                format!("[tls]\nca_cert = {cert:?}\nca_key = {junk:?}\n"),
                "tls.ca_key",
            ),
            (
                format!("[tls]\nca_cert = {cert:?}\nca_key = {cert:?}\n"),
                "tls.ca_key",
            ),
            (
                format!("[admin]\ntls_cert = {key:?}\ntls_key = {key:?}\n"),
                "admin.tls_cert",
            ),
            (format!("[vault]\nca_cert = {junk:?}\n"), "vault.ca_cert"),
        ] {
            let e = err(&toml);
            assert_eq!(e.key, key_named, "{toml}: {e}");
            assert!(e.message.contains("PEM"), "{toml}: {e}");
        }
        let c = Config::parse(
            &format!("[tls]\nextra_roots = [{cert:?}]\nca_cert = {cert:?}\nca_key = {key:?}\n"),
            &with_token(),
        );
        assert!(c.is_ok(), "{:?}", c.err());

        let e = err("[proxy]\nlisten = [\"127.0.0.1:8080\", \"127.0.0.1:8080\"]\n");
        assert_eq!(e.key, "proxy.listen", "{e}");
        let e = err("[proxy]\nlisten = \"127.0.0.1:8080\"\n[admin]\nlisten = \"127.0.0.1:8080\"\n");
        assert_eq!(e.key, "admin.listen", "{e}");
        // Port 0 (the system picks) may repeat.
        let c = Config::parse(
            "[proxy]\nlisten = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            &with_token(),
        );
        assert!(c.is_ok(), "{:?}", c.err());
    }

    #[test]
    fn passthrough_hosts_are_checked() {
        let c = Config::parse(
            "[proxy]\npassthrough = [\"PyPI.org\", \"*.pythonhosted.org\", \"git.example.com:8443\"]\n",
            &with_token(),
        )
        .unwrap();
        let p = &c.proxy.passthrough;
        assert!(p.covers("pypi.org", 443));
        assert!(!p.covers("pypi.org", 80));
        assert!(p.covers("files.pythonhosted.org", 443));
        assert!(!p.covers("pythonhosted.org", 443));
        assert!(p.covers("git.example.com", 8443));
        assert!(!p.covers("git.example.com", 443));
        let e = err("[proxy]\npassthrough = [\"pypi.org\", \"bad host\"]\n");
        assert_eq!(e.key, "proxy.passthrough[1]", "{e}");
        let e = err("[proxy]\npassthrough = [\"pypi.org:0\"]\n");
        assert_eq!(e.key, "proxy.passthrough[0]", "{e}");
        assert!(e.message.contains("port"), "{e}");
    }

    /// Issue 10: a 64-byte value that is not ASCII made the check panic.
    #[test]
    fn a_token_hash_of_64_non_ascii_bytes_is_an_error_not_a_panic() {
        let value = "\u{e9}".repeat(32);
        assert_eq!(value.len(), 64);
        assert!(parse_sha256_hex(&value).is_err());
        let e = err(&format!(
            "[[clients]]\nname = \"x\"\ntoken_sha256 = \"{value}\"\nconnections = [\"*\"]\n"
        ));
        assert!(e.key.contains("token_sha256"), "{e}");
    }

    #[test]
    fn public_listener_needs_clients() {
        let e = err("[proxy]\nlisten = \"0.0.0.0:8080\"\n");
        assert_eq!(e.key, "proxy.listen");
        assert!(e.message.contains("[[clients]]"), "{e}");
        let e = err("[proxy]\nlisten = [\"127.0.0.1:8080\", \"10.1.2.3:8080\"]\n");
        assert!(e.message.contains("10.1.2.3"), "{e}");
        let ok = format!(
            "[proxy]\nlisten = \"0.0.0.0:8080\"\n[[clients]]\nname = \"a\"\ntoken_sha256 = \"{HASH}\"\nconnections = \"stripe-*\"\n"
        );
        let c = Config::parse(&ok, &with_token()).unwrap();
        assert_eq!(&*c.clients[0].name, "a");
        assert!(c.clients[0].connections[0].matches("stripe-prod"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = FakeEnv(vec![
            ("VAULT_TOKEN", "t"),
            ("VAULT_ADDR", "http://127.0.0.1:1234"),
            ("LATCHKEY_CACHE_TTL", "42s"),
            ("LATCHKEY_CACHE_MAX_ENTRIES", "7"),
            ("LATCHKEY_PROXY_ALLOW_PRIVATE_DESTINATIONS", "127.0.0.0/8"),
            ("LATCHKEY_API_URL", "http://ignored"),
            ("LATCHKEY_PROXYY_LISTEN", "127.0.0.1:1"),
            ("LATCHKEY_TOKEN", "a client's"),
        ]);
        let c = Config::parse(
            "[vault]\naddress = \"http://10.0.0.1:8200\"\n[cache]\nttl = \"1m\"\n",
            &env,
        )
        .unwrap();
        // One bad entry of a list a variable gives is named as the entry.
        let env = FakeEnv(vec![
            ("VAULT_TOKEN", "t"),
            (
                "LATCHKEY_PROXY_ALLOW_PRIVATE_DESTINATIONS",
                "[\"127.0.0.0/8\", \"10.0.0.0/99\"]",
            ),
        ]);
        let e = Config::parse("", &env).unwrap_err();
        assert!(
            e.to_string().contains("\"10.0.0.0/99\" is not a CIDR"),
            "{e}"
        );

        // A section there is not: left alone and named, unless it is latchkey's own variable.
        assert_eq!(c.ignored_variables, ["LATCHKEY_PROXYY_LISTEN"]);
        assert_eq!(c.vault.addresses, ["http://127.0.0.1:1234"]);
        assert_eq!(c.cache.ttl, Duration::from_secs(42));
        assert_eq!(c.cache.max_entries, 7);
        assert_eq!(c.proxy.allow_private_destinations.len(), 1);

        // An error at a key a variable set names the variable, not the file's key alone.
        let env = FakeEnv(vec![("VAULT_TOKEN", "t"), ("LATCHKEY_CACHE_TTLL", "42s")]);
        let e = Config::parse("", &env).unwrap_err();
        assert!(e.message.contains("ttll"), "{e}");
        assert_eq!(e.key, "LATCHKEY_CACHE_TTLL (cache.ttll)", "{e}");
        let env = FakeEnv(vec![
            ("VAULT_TOKEN", "t"),
            ("LATCHKEY_CACHE_TTL", "5 parsecs"),
        ]);
        let e = Config::parse("", &env).unwrap_err();
        assert_eq!(e.key, "LATCHKEY_CACHE_TTL (cache.ttl)", "{e}");
        // A value that reads as a number where a string goes is the string it was.
        let env = FakeEnv(vec![
            ("VAULT_TOKEN", "t"),
            ("LATCHKEY_VAULT_NAMESPACE", "2024"),
            ("LATCHKEY_VAULT_PREFIX", "12"),
        ]);
        let c = Config::parse("", &env).unwrap();
        assert_eq!(c.vault.namespace.as_deref(), Some("2024"));
        assert_eq!(c.vault.prefix, "12");
        // A number where a number goes stays one; a string where a number goes is refused.
        let env = FakeEnv(vec![
            ("VAULT_TOKEN", "t"),
            ("LATCHKEY_CACHE_MAX_ENTRIES", "many"),
        ]);
        let e = Config::parse("", &env).unwrap_err();
        assert_eq!(
            e.key, "LATCHKEY_CACHE_MAX_ENTRIES (cache.max_entries)",
            "{e}"
        );
        // An entry of a list a variable set, and the Vault variables, name the variable too.
        let env = FakeEnv(vec![
            ("VAULT_TOKEN", "t"),
            ("LATCHKEY_PROXY_PASSTHROUGH", "[\"*.com\"]"),
        ]);
        let e = Config::parse("", &env).unwrap_err();
        assert_eq!(
            e.key, "LATCHKEY_PROXY_PASSTHROUGH (proxy.passthrough[0])",
            "{e}"
        );
        for (var, value, key) in [
            ("VAULT_ADDR", "notaurl", "VAULT_ADDR (vault.address)"),
            (
                "VAULT_CACERT",
                "/nonexistent.pem",
                "VAULT_CACERT (vault.ca_cert)",
            ),
        ] {
            let env = FakeEnv(vec![("VAULT_TOKEN", "t"), (var, value)]);
            let e = Config::parse("", &env).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn vault_address_is_one_node_or_every_node_of_a_cluster() {
        let c = Config::parse(
            "[vault]\naddress = [\"https://v1:8200\", \"https://v2:8200\"]\n",
            &with_token(),
        )
        .unwrap();
        assert_eq!(c.vault.addresses, ["https://v1:8200", "https://v2:8200"]);
        let env = FakeEnv(vec![
            ("VAULT_TOKEN", "t"),
            ("VAULT_ADDR", "https://v1:8200, https://v2:8200"),
        ]);
        let c = Config::parse("", &env).unwrap();
        assert_eq!(c.vault.addresses, ["https://v1:8200", "https://v2:8200"]);

        let e = err("[vault]\naddress = []\n");
        assert_eq!(e.key, "vault.address", "{e}");
        let e = err("[vault]\naddress = [\"https://v1:8200\", \"v2:8200\"]\n");
        assert_eq!(e.key, "vault.address", "{e}");
        let env = FakeEnv(vec![("VAULT_TOKEN", "t"), ("VAULT_ADDR", "https://v1,")]);
        assert_eq!(
            Config::parse("", &env).unwrap_err().key,
            "VAULT_ADDR (vault.address)"
        );
    }

    #[test]
    fn vault_namespace_is_a_path_that_fits_in_a_header() {
        let c = Config::parse("[vault]\nnamespace = \"/org/team-a/\"\n", &with_token()).unwrap();
        assert_eq!(c.vault.namespace.as_deref(), Some("org/team-a"));
        let env = FakeEnv(vec![("VAULT_TOKEN", "t"), ("VAULT_NAMESPACE", "team-b")]);
        let c = Config::parse("[vault]\nnamespace = \"team-a\"\n", &env).unwrap();
        assert_eq!(c.vault.namespace.as_deref(), Some("team-b"));
        assert_eq!(
            Config::parse("", &with_token()).unwrap().vault.namespace,
            None
        );
        for bad in [
            "",
            "/",
            "team a",
            "team\r\nX-Injected: 1",
            "a//b",
            "t\u{e9}am",
        ] {
            let text = format!("[vault]\nnamespace = {bad:?}\n");
            let e = err(&text);
            assert_eq!(e.key, "vault.namespace", "{bad:?}: {e}");
        }
    }

    #[test]
    fn token_source() {
        // A file checks without a token; serving needs one.
        let c = Config::parse("", &FakeEnv(vec![])).unwrap();
        let e = c.vault.check_credentials(&FakeEnv(vec![])).unwrap_err();
        assert_eq!(e.key, "vault.auth");
        assert!(c.vault.check_credentials(&with_token()).is_ok());
        let c = Config::parse(
            "[vault]\nauth = { method = \"token\", token_file = \"/tmp/t\" }\n",
            &FakeEnv(vec![]),
        )
        .unwrap();
        assert_eq!(c.vault.auth, VaultAuth::TokenFile("/tmp/t".into()));
    }

    fn auth(table: &str) -> Result<VaultAuth, ConfigError> {
        Config::parse(&format!("[vault]\nauth = {table}\n"), &FakeEnv(vec![])).map(|c| c.vault.auth)
    }

    #[test]
    fn login_methods_take_their_keys_with_default_mounts() {
        assert_eq!(
            auth(r#"{ method = "approle", role_id = "r-1", secret_id_file = "/run/s" }"#).unwrap(),
            VaultAuth::AppRole {
                mount: "approle".into(),
                role_id: "r-1".into(),
                secret_id_file: "/run/s".into(),
                wrapped: false,
            }
        );
        assert_eq!(
            auth(r#"{ method = "approle", mount = "/ar/", role_id = "r", secret_id_file = "/w", secret_id_wrapped = true }"#)
                .unwrap(),
            VaultAuth::AppRole {
                mount: "ar".into(),
                role_id: "r".into(),
                secret_id_file: "/w".into(),
                wrapped: true,
            }
        );
        assert_eq!(
            auth(r#"{ method = "jwt", role = "lk", jwt_file = "/run/jwt" }"#).unwrap(),
            VaultAuth::Jwt {
                mount: "jwt".into(),
                role: Some("lk".into()),
                jwt_file: "/run/jwt".into(),
            }
        );
        // Without a role, the mount's default_role applies.
        assert_eq!(
            auth(r#"{ method = "jwt", jwt_file = "/j", mount = "ci" }"#).unwrap(),
            VaultAuth::Jwt {
                mount: "ci".into(),
                role: None,
                jwt_file: "/j".into(),
            }
        );
        assert_eq!(
            auth(r#"{ method = "kubernetes", role = "lk" }"#).unwrap(),
            VaultAuth::Kubernetes {
                mount: "kubernetes".into(),
                role: "lk".into(),
                jwt_file: KUBERNETES_TOKEN_FILE.into(),
            }
        );
        let k =
            auth(r#"{ method = "kubernetes", role = "lk", jwt_file = "/t", mount = "k8s-east" }"#)
                .unwrap();
        assert_eq!(k.method(), "kubernetes");
        assert!(k.logs_in());
    }

    #[test]
    fn login_methods_do_not_need_vault_token_and_ignore_it() {
        let with_token = Config::parse(
            "[vault]\nauth = { method = \"kubernetes\", role = \"lk\" }\n",
            &with_token(),
        )
        .unwrap();
        assert_eq!(with_token.vault.auth.method(), "kubernetes");
        assert!(!VaultAuth::TokenEnv.logs_in());
    }

    #[test]
    fn login_method_errors_name_the_key_and_why() {
        let cases = [
            (
                r#"{ method = "approle", secret_id_file = "/s" }"#,
                "vault.auth.role_id",
                "missing",
            ),
            (
                r#"{ method = "approle", role_id = " ", secret_id_file = "/s" }"#,
                "vault.auth.role_id",
                "empty",
            ),
            (
                r#"{ method = "approle", role_id = "r" }"#,
                "vault.auth.secret_id_file",
                "secret ID",
            ),
            (
                r#"{ method = "approle", role_id = "r", secret_id_file = "" }"#,
                "vault.auth.secret_id_file",
                "empty",
            ),
            (
                r#"{ method = "approle", role_id = "r", secret_id_file = "/s", role = "x" }"#,
                "vault.auth.role",
                "not a key of method \"approle\"",
            ),
            (
                r#"{ method = "approle", role_id = "r", secret_id_file = "/s", secret_id_wrapped = "yes" }"#,
                "vault.auth.secret_id_wrapped",
                "invalid type",
            ),
            (
                r#"{ method = "jwt", role = "lk" }"#,
                "vault.auth.jwt_file",
                "missing",
            ),
            (
                r#"{ method = "jwt", role = "", jwt_file = "/j" }"#,
                "vault.auth.role",
                "empty",
            ),
            (
                r#"{ method = "jwt", jwt_file = "/j", mount = "../sys" }"#,
                "vault.auth.mount",
                "not a mount path",
            ),
            (
                r#"{ method = "jwt", jwt_file = "/j", mount = "" }"#,
                "vault.auth.mount",
                "not a mount path",
            ),
            (
                r#"{ method = "jwt", jwt_file = "/j", token_file = "/t" }"#,
                "vault.auth.token_file",
                "not a key of method \"jwt\"",
            ),
            (r#"{ method = "kubernetes" }"#, "vault.auth.role", "missing"),
            (
                r#"{ method = "kubernetes", role = "lk", role_id = "r" }"#,
                "vault.auth.role_id",
                "not a key",
            ),
            (
                r#"{ method = "token", role = "lk" }"#,
                "vault.auth.role",
                "not a key of method \"token\"",
            ),
            (
                r#"{ method = "approle", role_id = "r", secret_id_file = "/s", secret_id = "s" }"#,
                "vault.auth.secret_id",
                "unknown field",
            ),
            (r#"{ method = "ldap" }"#, "vault.auth.method", "\"approle\""),
        ];
        for (table, key, why) in cases {
            let e = auth(table).expect_err(table);
            assert_eq!(e.key, key, "{table}: {e}");
            assert!(e.message.contains(why), "{table}: {e}");
        }
    }
}
