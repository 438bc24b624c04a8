//! Reloading the configuration (SIGHUP): the file is read and checked again, and what can change
//! while latchkey serves changes without closing a client connection or failing a request in
//! flight.
//!
//! Live: `[[clients]]`, the connectors (`[connectors.*]`), `[cache]`, `tls.extra_roots`, and the
//! `[proxy]` keys that shape one request or one dial (`allow_private_destinations`, `resolve`,
//! `connect_timeout`, `request_timeout`, `passthrough`).
//!
//! - Each proxy worker's [`Proxy`] is rebuilt from them and stored in the worker's
//!   [`ProxySlot`]; a request loads the proxy in force when it starts and keeps it to its end,
//!   and each request inside an open tunnel loads it again.
//! - The catalog is swapped in its [`CatalogSlot`], which the cache's loads, the lifecycle
//!   (admin API, verification) and the proxy all read. Cache entries whose connector changed,
//!   was added or removed are dropped, with every negative answer: read again at next use and
//!   checked against the new catalog. Entries of unchanged connectors stay, so a reload while
//!   Vault is down costs only the connections whose connector changed.
//! - Every upstream pool gets a dialer built anew (the extra roots are read again, so a PEM file
//!   replaced in place is picked up too); idle upstream connections made with the old one are
//!   closed, and none is pooled again.
//!
//! Only with a restart: the listener addresses, `proxy.workers`, the client connections' and the
//! pool's timeouts (`idle_timeout`, `header_read_timeout`, `body_timeout`, `pool_idle_timeout`),
//! `proxy.idle_release`, `proxy.http1_server`, `[admin]`, `[vault]`, and `tls.ca_cert` / `tls.ca_key`. A file that changes them is applied
//! for the rest, with a warning naming those keys; latchkey keeps the values it started with.
//!
//! A file that does not check is refused whole: the running configuration stays, the log names
//! the key and the reason, and `latchkey_config_reloads_total{outcome="failed"}` counts it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::auth::Clients;
use crate::cache::Cache;
use crate::catalog::CatalogSlot;
use crate::config::{Config, ConfigError};
use crate::coverage::Coverage;
use crate::destination::AddressPolicy;
use crate::lifecycle::Lifecycle;
use crate::misses::MissLimit;
use crate::proxy::{Proxy, ProxySlot};
use crate::telemetry;
use crate::upstream::{self, Dialer, Pool};

/// Applies reloaded configurations to a running latchkey. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<Inner>,
}

/// The parts a reload changes, and the configuration in force.
pub struct Parts {
    pub catalog: CatalogSlot,
    pub cache: Cache,
    pub coverage: Arc<Coverage>,
    pub lifecycle: Arc<Lifecycle>,
    /// The lifecycle's pool (verification calls).
    pub lifecycle_pool: Arc<Pool>,
    /// Each proxy worker's pool.
    pub pools: Vec<Arc<Pool>>,
    /// The proxy listeners' bound addresses: latchkey runs open only if all are loopback.
    pub listening: Vec<SocketAddr>,
}

struct Inner {
    parts: Parts,
    /// Each worker's proxy, beside its pool in `parts.pools`.
    slots: Vec<ProxySlot>,
    /// The configuration latchkey started with: the values that change only with a restart.
    started: Config,
    /// The configuration in force, for the live values; one reload at a time holds it.
    current: Mutex<Current>,
}

struct Current {
    config: Config,
    misses: Arc<MissLimit>,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Connectors added, removed or changed.
    pub connectors: Vec<String>,
    /// Keys whose new values wait for a restart.
    pub need_restart: Vec<&'static str>,
}

/// The dialer a configuration asks for: its trusted roots, address policy, pins and timeout.
pub fn dialer(config: &Config) -> Result<Dialer, ConfigError> {
    let tls = upstream::tls_config(&config.tls.extra_roots)
        .map_err(|e| ConfigError::new("tls.extra_roots", e))?;
    Ok(Dialer::new(
        AddressPolicy::new(config.proxy.allow_private_destinations.clone()),
        config.proxy.resolve.clone(),
        Arc::new(tls),
        config.proxy.connect_timeout,
    ))
}

impl Reloader {
    /// Builds each worker's proxy from `config`; [`Reloader::slots`] hands them to the workers.
    pub fn new(config: Config, parts: Parts) -> Reloader {
        let misses = Arc::new(MissLimit::new(
            config.cache.miss_rate,
            config.cache.miss_burst,
        ));
        let slots = parts
            .pools
            .iter()
            .map(|pool| {
                Arc::new(arc_swap::ArcSwap::from_pointee(proxy(
                    &parts, pool, &config, &misses,
                )))
            })
            .collect();
        Reloader {
            inner: Arc::new(Inner {
                parts,
                slots,
                started: config.clone(),
                current: Mutex::new(Current { config, misses }),
            }),
        }
    }

    /// Each worker's proxy slot, in worker order.
    pub fn slots(&self) -> &[ProxySlot] {
        &self.inner.slots
    }

    /// Reads `path` again and applies it; logs and counts the outcome. A file that does not
    /// check changes nothing.
    pub fn reload_file(&self, path: &Path) -> Result<Reloaded, ConfigError> {
        let result = Config::load(path).and_then(|config| self.apply(config));
        match &result {
            Ok(reloaded) => {
                telemetry::config_reload("ok");
                if !reloaded.need_restart.is_empty() {
                    tracing::warn!(
                        keys = %reloaded.need_restart.join(", "),
                        "these keys changed in the file but change only with a restart; latchkey keeps the values it started with"
                    );
                }
                tracing::info!(
                    file = %path.display(),
                    connectors_changed = %reloaded.connectors.join(","),
                    "configuration reloaded"
                );
            }
            Err(e) => {
                telemetry::config_reload("failed");
                tracing::error!(
                    file = %path.display(),
                    key = %e.key,
                    reason = %e.message,
                    "configuration reload refused; the running configuration stays"
                );
            }
        }
        result
    }

    /// Applies a checked configuration: the live values now, the others at the next restart.
    /// Refused, with nothing changed, when it cannot run as latchkey is listening.
    pub fn apply(&self, config: Config) -> Result<Reloaded, ConfigError> {
        let inner = &*self.inner;
        let parts = &inner.parts;
        let mut current = match inner.current.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        // The file was checked against its own listeners; latchkey listens where it started.
        if config.clients.is_empty() {
            if let Some(addr) = parts.listening.iter().find(|a| !a.ip().is_loopback()) {
                return Err(ConfigError::new(
                    "clients",
                    format!(
                        "latchkey listens on {addr}, not a loopback address, and the file has no \
                         [[clients]]: it runs without client tokens only on loopback"
                    ),
                ));
            }
        }
        // Everything that can fail comes before anything changes.
        let dialer = dialer(&config)?;

        let connectors = config.catalog.changed_since(&current.config.catalog);
        parts.catalog.store(Arc::new(config.catalog.clone()));
        parts.cache.reconfigure(&config.cache);
        parts.cache.forget_connectors(&connectors);
        parts.coverage.reconfigure(config.cache.ttl);
        for pool in parts.pools.iter().chain([&parts.lifecycle_pool]) {
            pool.redial(dialer.clone());
        }
        let old = &current.config.cache;
        if (old.miss_rate, old.miss_burst) != (config.cache.miss_rate, config.cache.miss_burst) {
            current.misses = Arc::new(MissLimit::new(
                config.cache.miss_rate,
                config.cache.miss_burst,
            ));
        }
        for (slot, pool) in inner.slots.iter().zip(&parts.pools) {
            slot.store(Arc::new(proxy(parts, pool, &config, &current.misses)));
        }
        let need_restart = need_restart(&inner.started, &config);
        current.config = config;
        Ok(Reloaded {
            connectors,
            need_restart,
        })
    }
}

/// A worker's proxy as `config` asks for it, on the worker's own pool.
fn proxy(parts: &Parts, pool: &Arc<Pool>, config: &Config, misses: &Arc<MissLimit>) -> Proxy {
    Proxy::new(
        parts.cache.clone(),
        parts.lifecycle.clone(),
        Clients::new(config.clients.clone()),
        (
            parts.coverage.clone(),
            Arc::new(config.proxy.passthrough.clone()),
        ),
        pool.clone(),
        (config.proxy.request_timeout, misses.clone()),
    )
}

/// The keys whose values in `new` differ from those latchkey started with and that change only
/// with a restart.
fn need_restart(started: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (started, new);
    // Neither holds a secret: the Vault token is never part of the configuration, and the
    // admin tokens are hashes compared here, not printed.
    let debug =
        |x: &dyn std::fmt::Debug, y: &dyn std::fmt::Debug| format!("{x:?}") != format!("{y:?}");
    let admin_tokens = |c: &Config| -> Vec<(String, [u8; 32])> {
        c.admin
            .tokens
            .iter()
            .map(|t| (t.name.clone(), t.token_sha256))
            .collect()
    };
    // Every field of `[vault]` is compared below, each by its key: one added there does not
    // compile here until it is.
    let crate::config::VaultConfig {
        addresses: _,
        mount: _,
        prefix: _,
        timeout: _,
        ca_cert: _,
        namespace: _,
        auth: _,
    } = &a.vault;
    [
        ("proxy.listen", a.proxy.listen != b.proxy.listen),
        ("proxy.workers", a.proxy.workers != b.proxy.workers),
        (
            "proxy.idle_timeout",
            a.proxy.idle_timeout != b.proxy.idle_timeout,
        ),
        (
            "proxy.header_read_timeout",
            a.proxy.header_read_timeout != b.proxy.header_read_timeout,
        ),
        (
            "proxy.body_timeout",
            a.proxy.body_timeout != b.proxy.body_timeout,
        ),
        (
            "proxy.idle_release",
            a.proxy.idle_release != b.proxy.idle_release,
        ),
        (
            "proxy.http1_server",
            a.proxy.http1_server != b.proxy.http1_server,
        ),
        (
            "proxy.pool_idle_timeout",
            a.proxy.pool_idle_timeout != b.proxy.pool_idle_timeout,
        ),
        ("admin.listen", a.admin.listen != b.admin.listen),
        (
            "admin.token_sha256 / [[admin.tokens]]",
            admin_tokens(a) != admin_tokens(b),
        ),
        (
            "admin.expiry_warning",
            a.admin.expiry_warning != b.admin.expiry_warning,
        ),
        ("admin.tls_cert", a.admin.tls != b.admin.tls),
        (
            "admin.secure_cookie",
            a.admin.secure_cookie != b.admin.secure_cookie,
        ),
        ("vault.address", a.vault.addresses != b.vault.addresses),
        ("vault.mount", a.vault.mount != b.vault.mount),
        ("vault.prefix", a.vault.prefix != b.vault.prefix),
        ("vault.timeout", a.vault.timeout != b.vault.timeout),
        ("vault.ca_cert", a.vault.ca_cert != b.vault.ca_cert),
        ("vault.namespace", a.vault.namespace != b.vault.namespace),
        ("vault.auth", debug(&a.vault.auth, &b.vault.auth)),
        ("tls.ca_cert", debug(&a.tls.ca, &b.tls.ca)),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Env(Vec<(&'static str, &'static str)>);
    impl crate::config::Env for Env {
        fn var(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
        fn vars(&self) -> Vec<(String, String)> {
            Vec::new()
        }
    }

    fn config(text: &str) -> Config {
        Config::parse(text, &Env(vec![("VAULT_TOKEN", "t")])).unwrap()
    }

    #[test]
    fn what_needs_a_restart_is_named() {
        let a = config("[proxy]\nlisten = \"127.0.0.1:8080\"\n");
        let b = config(
            "[proxy]\nlisten = \"127.0.0.1:8081\"\nrequest_timeout = \"1s\"\n[vault]\naddress = \"http://127.0.0.1:1\"\n[cache]\nttl = \"1s\"\n",
        );
        assert_eq!(need_restart(&a, &b), vec!["proxy.listen", "vault.address"]);
        let c = config(
            "[proxy]\nlisten = \"127.0.0.1:8080\"\n[vault]\ntimeout = \"9s\"\n[admin]\ntoken_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
        );
        assert_eq!(
            need_restart(&a, &c),
            vec!["admin.token_sha256 / [[admin.tokens]]", "vault.timeout"]
        );
        assert!(need_restart(&a, &a.clone()).is_empty());
    }
}
