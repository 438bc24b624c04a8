//! The connection lifecycle: create, read (secrets masked), change, rotate, verify and delete,
//! and what the request path learns about a connection (upstream 401s and 403s).
//!
//! Every save goes through [`Draft::prepare`] (trim, refuse, check patterns and environments)
//! and, for a new key, through the verification call before anything is written. Writes use
//! KV v2 check-and-set, so a create never overwrites and a rotation never loses a concurrent
//! change. What latchkey learns (`status`, `verified_at`, `last_error`, `scope_warning`) goes
//! into the secret's `custom_metadata`, which never creates a version. Each admin action writes
//! one audit line: who, what, which connection, which version; never a value.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::cache::{Cache, Load};
use crate::catalog::{Catalog, CatalogSlot};
use crate::connection::Connection;
use crate::connection_id::ConnectionId;
use crate::destination::Scheme;
use crate::draft::{Draft, FieldError, Prepared};
use crate::record::{StoredConnection, RESERVED_FIELDS};
use crate::secret::Secret;
use crate::telemetry;
use crate::upstream::Pool;
use crate::vault::{Vault, VaultError};
use crate::verify::{self, Verification};

/// How often the request path may record an upstream 403 on one connection.
/// The custom-metadata key holding the version whose key an upstream refused (`failed`).
const FAILED_VERSION: &str = "failed_version";

const FORBIDDEN_NOTE_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("{0}")]
    BadId(String),
    #[error("{0}")]
    Invalid(FieldError),
    #[error("connection {0:?} does not exist")]
    NotFound(String),
    #[error("connection {0:?} already exists; rotate its key with PUT /v1/connections/{0}/secret")]
    Exists(String),
    #[error("connection {0:?} changed meanwhile; read it again and retry")]
    Conflict(String),
    #[error("verification failed: {}", .0.message)]
    VerificationFailed(Box<Verification>, String),
    #[error("the secret store failed: {0}")]
    Vault(VaultError),
}

impl LifecycleError {
    /// The outcome an audit line records.
    pub fn outcome(&self) -> &'static str {
        match self {
            LifecycleError::BadId(_) => "bad_id",
            LifecycleError::Invalid(_) => "invalid",
            LifecycleError::NotFound(_) => "not_found",
            LifecycleError::Exists(_) => "exists",
            LifecycleError::Conflict(_) => "conflict",
            LifecycleError::VerificationFailed(..) => "verification_failed",
            LifecycleError::Vault(_) => "store_error",
        }
    }
}

impl From<FieldError> for LifecycleError {
    fn from(e: FieldError) -> Self {
        LifecycleError::Invalid(e)
    }
}

impl From<VaultError> for LifecycleError {
    fn from(e: VaultError) -> Self {
        LifecycleError::Vault(e)
    }
}

/// `POST /v1/connections`. `Debug` shows field names; secret values print `<redacted>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub id: String,
    pub connector: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub environment: Option<String>,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default, deserialize_with = "unique")]
    pub fields: BTreeMap<String, Secret>,
    #[serde(default = "yes")]
    pub verify: bool,
}

/// `PATCH /v1/connections/{id}`: absent keys stay as they are, `null` removes.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PatchRequest {
    #[serde(default, deserialize_with = "present")]
    pub name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub environment: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub base_url: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub allowed_hosts: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<String>>,
    /// Non-secret connector fields.
    #[serde(default, deserialize_with = "unique")]
    pub fields: BTreeMap<String, Option<Secret>>,
    #[serde(default)]
    pub verify: bool,
}

/// `PUT /v1/connections/{id}/secret`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    #[serde(deserialize_with = "unique")]
    pub fields: BTreeMap<String, Secret>,
}

fn yes() -> bool {
    true
}

/// A JSON object whose keys are each given once: `{"api_key": "a", "api_key": "b"}` is refused
/// (which of the two was meant cannot be told), not read as its last value.
fn unique<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Unique<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Unique<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.contains_key(&key) {
                    // A field's name, never a value.
                    return Err(serde::de::Error::custom(format_args!(
                        "duplicate field `{key}`"
                    )));
                }
                let value = map.next_value()?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique(std::marker::PhantomData))
}

fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// What a save writes: a checked connection, whether to verify it first, the version it
/// replaces (`None`: it must not exist yet), and the metadata it keeps.
struct Save {
    action: &'static str,
    id: ConnectionId,
    prepared: Prepared,
    verify: bool,
    replaces: Option<u64>,
    /// The save writes secret fields: a key that the status recorded before says nothing of.
    new_key: bool,
    metadata: BTreeMap<String, String>,
}

/// The answer to a save.
pub struct Saved {
    pub connection: Value,
    pub notices: Vec<String>,
    pub verification: Option<Verification>,
}

pub struct Lifecycle {
    vault: Arc<Vault>,
    catalog: CatalogSlot,
    cache: Cache,
    upstream: Arc<Pool>,
    verify_timeout: Duration,
    expiry_warning: Duration,
    forbidden_noted: DashMap<ConnectionId, Instant>,
    /// When a failed connection's success was last acted on, per connection.
    accepted_noted: DashMap<ConnectionId, Instant>,
}

impl Lifecycle {
    pub fn new(
        vault: Arc<Vault>,
        catalog: CatalogSlot,
        cache: Cache,
        upstream: Arc<Pool>,
        verify_timeout: Duration,
        expiry_warning: Duration,
    ) -> Lifecycle {
        Lifecycle {
            vault,
            catalog,
            cache,
            upstream,
            verify_timeout,
            expiry_warning,
            forbidden_noted: DashMap::new(),
            accepted_noted: DashMap::new(),
        }
    }

    /// The catalog in force (a reload may replace it; this one stays whole for its holder).
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    fn id(s: &str) -> Result<ConnectionId, LifecycleError> {
        ConnectionId::parse(s).map_err(|e| LifecycleError::BadId(e.to_string()))
    }

    async fn stored(&self, id: &ConnectionId) -> Result<StoredConnection, LifecycleError> {
        self.vault
            .read(id)
            .await?
            .ok_or_else(|| LifecycleError::NotFound(id.to_string()))
    }

    /// Creates a connection: checked, verified (unless asked not to), then written only if no
    /// connection of that ID exists.
    pub async fn create(&self, admin: &str, req: CreateRequest) -> Result<Saved, LifecycleError> {
        let id = req.id.clone();
        let r = self.create_inner(admin, req).await;
        audit_failure(admin, "create", &id, &r);
        r
    }

    /// Changes non-secret fields (a new version); verifies first when asked.
    pub async fn patch(
        &self,
        admin: &str,
        id: &str,
        req: PatchRequest,
    ) -> Result<Saved, LifecycleError> {
        let r = self.patch_inner(admin, id, req).await;
        audit_failure(admin, "patch", id, &r);
        r
    }

    /// Rotates secret fields in place: the new key is verified first, and a key that fails
    /// leaves the old one in force. The next request on this instance uses the new key.
    pub async fn rotate(
        &self,
        admin: &str,
        id: &str,
        req: RotateRequest,
    ) -> Result<Saved, LifecycleError> {
        let r = self.rotate_inner(admin, id, req).await;
        audit_failure(admin, "rotate", id, &r);
        r
    }

    /// Runs the verification call with the stored key and records the result.
    pub async fn verify(
        &self,
        admin: &str,
        id: &str,
    ) -> Result<(Value, Verification), LifecycleError> {
        let r = self.verify_inner(admin, id).await;
        audit_failure(admin, "verify", id, &r);
        r
    }

    /// Removes the connection and all its versions from Vault, and from the cache at once.
    pub async fn delete(&self, admin: &str, id: &str) -> Result<(), LifecycleError> {
        let r = self.delete_inner(admin, id).await;
        audit_failure(admin, "delete", id, &r);
        r
    }

    async fn create_inner(&self, admin: &str, req: CreateRequest) -> Result<Saved, LifecycleError> {
        let id = Self::id(&req.id)?;
        if self.vault.read(&id).await?.is_some() {
            return Err(LifecycleError::Exists(id.to_string()));
        }
        let draft = Draft {
            connector: req.connector,
            name: req.name,
            environment: req.environment,
            base_url: req.base_url,
            allowed_hosts: req.allowed_hosts,
            expires_at: req.expires_at,
            fields: req.fields,
        };
        let prepared = draft.prepare(&id, &self.catalog())?;
        self.save(
            admin,
            Save {
                action: "create",
                id,
                prepared,
                verify: req.verify,
                replaces: None,
                new_key: true,
                metadata: BTreeMap::new(),
            },
        )
        .await
    }

    /// One connection, secrets masked.
    pub async fn get(&self, id: &str) -> Result<Value, LifecycleError> {
        let id = Self::id(id)?;
        let stored = self.stored(&id).await?;
        Ok(self.view(&id, stored))
    }

    /// Every connection under the prefix, secrets masked.
    pub async fn list(&self) -> Result<Vec<Value>, LifecycleError> {
        let ids = self.vault.list().await?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(8) {
            let reads = chunk
                .iter()
                .map(|id| async move { (id, self.vault.read(id).await) });
            for (id, read) in futures_util::future::join_all(reads).await {
                if let Some(stored) = read? {
                    out.push(self.view(id, stored));
                }
            }
        }
        Ok(out)
    }

    /// Changes non-secret fields (a new version); verifies first when asked.
    async fn patch_inner(
        &self,
        admin: &str,
        id: &str,
        req: PatchRequest,
    ) -> Result<Saved, LifecycleError> {
        let id = Self::id(id)?;
        let nothing = req.name.is_none()
            && req.environment.is_none()
            && req.base_url.is_none()
            && req.allowed_hosts.is_none()
            && req.expires_at.is_none()
            && req.fields.is_empty();
        if nothing {
            // It would write a new version identical to the last.
            return Err(FieldError::new(
                "fields",
                "the PATCH changes nothing: give at least one key to change (name, environment, base_url, allowed_hosts, expires_at, fields)",
            )
            .into());
        }
        let stored = self.stored(&id).await?;
        let mut draft = draft_of(&stored);
        let connector = self.catalog().get(&draft.connector).cloned();
        if let Some(v) = req.name {
            draft.name = v;
        }
        if let Some(v) = req.environment {
            draft.environment = v;
        }
        if let Some(v) = req.base_url {
            draft.base_url = v;
        }
        if let Some(v) = req.allowed_hosts {
            draft.allowed_hosts = v.unwrap_or_default();
        }
        if let Some(v) = req.expires_at {
            draft.expires_at = v;
        }
        // Secret fields are given here only with a change that sends the key somewhere new
        // (checked below); otherwise they are rotated with their own call.
        let mut secrets_given = Vec::new();
        for (name, value) in req.fields {
            let secret = connector
                .as_ref()
                .and_then(|c| c.field(&name))
                .is_some_and(|f| f.secret);
            if secret {
                secrets_given.push(name.clone());
            }
            match value {
                Some(v) => {
                    draft.fields.insert(name, v);
                }
                // Removing what is not there would write a new version that changes nothing,
                // and say `ok` to a name mistyped.
                None if draft.fields.remove(&name).is_none() => {
                    return Err(FieldError::new(
                        &name,
                        "is not set on this connection: there is nothing to remove",
                    )
                    .into())
                }
                None => {}
            }
        }
        let before = draft_of(&stored).prepare(&id, &self.catalog()).ok();
        let prepared = draft.prepare(&id, &self.catalog())?;
        // Where the key could go after the change and could not before. An admin token must
        // not be enough to send a saved key to a host of one's own (and so read it back): such
        // a change takes every secret field again, as a new connection would.
        let mut beyond: Vec<String> = match &before {
            Some(before) => prepared.connection.hosts.beyond(&before.connection.hosts),
            None => prepared.connection.hosts.iter().collect(),
        }
        .into_iter()
        .map(str::to_string)
        .collect();
        // From HTTPS to plain HTTP on the same hosts: the key would cross the network in
        // clear, for anyone on the path to read.
        if before.as_ref().is_some_and(|b| {
            b.connection.base.scheme == Scheme::Https
                && prepared.connection.base.scheme == Scheme::Http
        }) {
            beyond.push(format!(
                "http://{} (plain HTTP, where it went over TLS)",
                prepared.connection.base.authority
            ));
        }
        let secret_fields: Vec<&str> = prepared
            .stored
            .keys()
            .filter(|k| {
                connector
                    .as_ref()
                    .and_then(|c| c.field(k))
                    .is_some_and(|f| f.secret)
            })
            .map(String::as_str)
            .collect();
        if beyond.is_empty() {
            if let Some(name) = secrets_given.first() {
                return Err(FieldError::new(
                    name,
                    format!("is secret; rotate it with PUT /v1/connections/{id}/secret"),
                )
                .into());
            }
        } else if let Some(missing) = secret_fields
            .iter()
            .find(|f| !secrets_given.iter().any(|g| g == *f))
        {
            return Err(FieldError::new(
                missing.to_string(),
                format!(
                    "must be given again: this change lets the key go to {}, where it could \
                     not go before, and a saved key is sent to a new host only by whoever \
                     has it (give every secret field, {}, in fields)",
                    beyond.join(", "),
                    secret_fields.join(", ")
                ),
            )
            .into());
        }
        self.save(
            admin,
            Save {
                action: "patch",
                id,
                prepared,
                verify: req.verify,
                replaces: Some(stored.version),
                new_key: !secrets_given.is_empty(),
                metadata: stored.custom_metadata,
            },
        )
        .await
    }

    /// Rotates secret fields in place: the new key is verified first, and a key that fails
    /// leaves the old one in force. The next request on this instance uses the new key.
    async fn rotate_inner(
        &self,
        admin: &str,
        id: &str,
        req: RotateRequest,
    ) -> Result<Saved, LifecycleError> {
        let id = Self::id(id)?;
        let stored = self.stored(&id).await?;
        let mut draft = draft_of(&stored);
        let connector = self.catalog().get(&draft.connector).cloned();
        if req.fields.is_empty() {
            return Err(FieldError::new(
                "fields",
                "give the new value of at least one secret field",
            )
            .into());
        }
        let mut secret_given = false;
        for (name, value) in req.fields {
            let field = connector.as_ref().and_then(|c| c.field(&name));
            let secret = field.is_some_and(|f| f.secret);
            // A field the credential is made with goes with its secret, in one write: a
            // Twilio account SID beside its auth token, a Basic user name beside its password
            // (in two writes, every request between them would carry a mismatched pair).
            let in_credential =
                field.is_some() && connector.as_ref().is_some_and(|c| c.inject.uses(&name));
            if !secret && !in_credential {
                return Err(FieldError::new(
                    name,
                    format!("is not a secret field of the connector; change it with PATCH /v1/connections/{id}"),
                )
                .into());
            }
            secret_given |= secret;
            draft.fields.insert(name, value);
        }
        if !secret_given {
            return Err(FieldError::new(
                "fields",
                "give the new value of at least one secret field (with it, the other fields its credential is made with)",
            )
            .into());
        }
        let prepared = draft.prepare(&id, &self.catalog())?;
        // A new key answers for itself: what the old one lacked is no longer known.
        let mut metadata = stored.custom_metadata;
        metadata.remove("scope_warning");
        metadata.remove("scope_warning_at");
        self.save(
            admin,
            Save {
                action: "rotate",
                id,
                prepared,
                verify: true,
                replaces: Some(stored.version),
                new_key: true,
                metadata,
            },
        )
        .await
    }

    /// The save of create, patch and rotate: verify first when asked (a key that fails is never
    /// written and leaves the old one in force), write with check-and-set on the version it
    /// replaces, record what the verification found, put the connection in the cache so that
    /// the next request on this instance uses it, and write the audit line.
    async fn save(&self, admin: &str, save: Save) -> Result<Saved, LifecycleError> {
        let Save {
            action,
            id,
            prepared,
            verify,
            replaces,
            new_key,
            mut metadata,
        } = save;
        let verification = if verify {
            let v = verify::verify(&prepared.connection, &self.upstream, self.verify_timeout).await;
            if !v.passed() {
                let field = primary_field(&prepared.connection);
                return Err(LifecycleError::VerificationFailed(Box::new(v), field));
            }
            Some(v)
        } else {
            None
        };
        let mut written = self
            .vault
            .write(&id, &prepared.stored, Some(replaces.unwrap_or(0)))
            .await;
        if replaces.is_none() && written == Err(VaultError::CasMismatch) {
            // Versions there, the latest deleted (`kv delete`, `delete_version_after`): no
            // connection to its clients or to this API, so a create takes its place.
            if let Some(current) = self.deleted_latest(&id).await? {
                written = self.vault.write(&id, &prepared.stored, Some(current)).await;
            }
        }
        let version = match written {
            Ok(v) => v,
            Err(VaultError::CasMismatch) if replaces.is_none() => {
                return Err(LifecycleError::Exists(id.to_string()))
            }
            Err(VaultError::CasMismatch) => return Err(LifecycleError::Conflict(id.to_string())),
            Err(e) => return Err(e.into()),
        };
        let mut notices = prepared.notices;
        // A new connection, or a new key, starts `unverified` unless verified; a change of
        // other fields without a verification keeps the status it had.
        if verification.is_some() || new_key {
            record_verification(&mut metadata, verification.as_ref());
            if let Err(e) = self.vault.set_custom_metadata(&id, &metadata).await {
                notices.push(format!(
                    "the connection was saved, but its status could not be recorded: {e}"
                ));
            }
        }
        let mut conn = prepared.connection;
        conn.version = version;
        conn.custom_metadata = metadata;
        let view = self.view_of(&conn, None);
        self.cache.insert(conn);
        audit(admin, action, id.as_str(), Some(version), "ok");
        Ok(Saved {
            connection: view,
            notices,
            verification,
        })
    }

    /// Runs the verification call with the stored key and records the result.
    async fn verify_inner(
        &self,
        admin: &str,
        id: &str,
    ) -> Result<(Value, Verification), LifecycleError> {
        let id = Self::id(id)?;
        let stored = self.stored(&id).await?;
        let mut metadata = stored.custom_metadata.clone();
        let version = stored.version;
        let conn = Connection::from_stored(id.clone(), stored, &self.catalog())
            .map_err(|e| LifecycleError::Invalid(e.into()))?;
        let v = verify::verify(&conn, &self.upstream, self.verify_timeout).await;
        record_verification(&mut metadata, Some(&v));
        self.vault.set_custom_metadata(&id, &metadata).await?;
        audit(
            admin,
            "verify",
            id.as_str(),
            Some(version),
            v.outcome.as_str(),
        );
        let view = self.view_of(&conn, Some(&metadata));
        Ok((view, v))
    }

    /// Removes the connection and all its versions from Vault, and from the cache at once.
    async fn delete_inner(&self, admin: &str, id: &str) -> Result<(), LifecycleError> {
        let id = Self::id(id)?;
        // A connection whose latest version was deleted in Vault is removed too (its metadata
        // and older versions), or nothing could ever clean it up from here.
        let version = match self.vault.read(&id).await? {
            Some(stored) => stored.version,
            None => self
                .deleted_latest(&id)
                .await?
                .ok_or_else(|| LifecycleError::NotFound(id.to_string()))?,
        };
        self.vault.delete(&id).await?;
        self.cache.invalidate(&id);
        telemetry::connection_expiry(id.as_str(), None);
        audit(admin, "delete", id.as_str(), Some(version), "ok");
        Ok(())
    }

    /// The current version of `id` when Vault holds versions of it but the latest is deleted
    /// (a read finds nothing); `None` when there is no such secret at all, or one that reads.
    async fn deleted_latest(&self, id: &ConnectionId) -> Result<Option<u64>, LifecycleError> {
        if self.vault.read(id).await?.is_some() {
            return Ok(None);
        }
        Ok(self.vault.custom_metadata(id).await?.map(|(_, v)| v))
    }

    /// An upstream answered 401 to a request made with `used`. If the re-read the cache started
    /// finds the same version, the service no longer accepts the key: the connection's status
    /// becomes `failed`, so a revoked or aged-out key shows without anyone running a verify.
    pub fn upstream_unauthorized(
        self: &Arc<Self>,
        used: Arc<Connection>,
        reread: Load,
        what: String,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            match reread.await {
                Ok(now) if now.version != used.version => return,
                Ok(_) => {}
                Err(_) => return,
            }
            let message = format!(
                "the service answered 401 to {what} with the current key (version {}): it was revoked, has expired, or is wrong",
                used.version
            );
            let result = me
                .update_metadata(&used.id, Some(used.version), |m| {
                    m.insert("status".into(), "failed".into());
                    m.insert(FAILED_VERSION.into(), used.version.to_string());
                    m.insert("last_error".into(), message);
                    m.remove("last_error_hint");
                    m.insert("last_error_at".into(), now_rfc3339());
                })
                .await;
            match result {
                Ok(true) => {
                    // The copy the 401's re-read cached was read before this write: it is
                    // told, so that the next success here can see the failure and clear it.
                    me.mark_cached(&used, true);
                    tracing::warn!(connection = %used.id, "the service refuses the current key; status set to failed")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(connection = %used.id, error = %e, "could not record a failed key")
                }
            }
        });
    }

    /// An upstream accepted a request made with `used`, a connection whose status says
    /// `failed`: the key works after all (the 401 was that call's, or the service took the key
    /// back), so the failure is cleared, if it is still this version's. At most once a minute
    /// per connection: the cached copy says `failed` until it is read again.
    pub fn upstream_accepted(self: &Arc<Self>, used: Arc<Connection>) {
        if !first_in_a_while(&self.accepted_noted, &used.id) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let version = used.version.to_string();
            let result = me
                .update_metadata(&used.id, Some(used.version), |m| {
                    let failed_here = m.get("status").is_some_and(|s| s == "failed")
                        && m.get(FAILED_VERSION).is_none_or(|v| *v == version);
                    if failed_here {
                        m.insert("status".into(), "active".into());
                        m.remove(FAILED_VERSION);
                        m.remove("last_error");
                        m.remove("last_error_hint");
                        m.remove("last_error_at");
                    }
                })
                .await;
            match result {
                Ok(true) => {
                    me.mark_cached(&used, false);
                    tracing::info!(connection = %used.id, "the service accepts the current key again; status set to active")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(connection = %used.id, error = %e, "could not clear a failed key")
                }
            }
        });
    }

    /// Marks the cached copy of `used`'s version failed or not (a copy of another version
    /// is left as it is).
    fn mark_cached(&self, used: &Connection, failed: bool) {
        if let Some(cached) = self
            .cache
            .get_fresh(&used.id)
            .filter(|c| c.version == used.version)
        {
            cached
                .failed
                .store(failed, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// An upstream answered 403: the key works but lacks a permission for that call. Recorded
    /// (at most once a minute per connection) as a scope warning with the connector's hint.
    pub fn upstream_forbidden(self: &Arc<Self>, used: Arc<Connection>, what: String) {
        if !first_in_a_while(&self.forbidden_noted, &used.id) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let scopes = used
                .connector
                .scopes
                .clone()
                .unwrap_or_else(|| "Check the key's scopes or permissions.".into());
            let warning = format!(
                "the service answered 403 to {what}: the key lacks a scope or permission for that call. {scopes}"
            );
            let result = me
                .update_metadata(&used.id, Some(used.version), |m| {
                    m.insert("scope_warning".into(), warning);
                    m.insert("scope_warning_at".into(), now_rfc3339());
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(connection = %used.id, error = %e, "could not record a scope warning");
            }
        });
    }

    /// Changes some keys of the connection's current `custom_metadata`, read just before, so
    /// that nothing recorded meanwhile is undone. With `version`, only if the connection is
    /// still at that version (a rotated key is not blamed for the old one's failures).
    /// Returns whether it wrote.
    async fn update_metadata(
        &self,
        id: &ConnectionId,
        version: Option<u64>,
        change: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> Result<bool, VaultError> {
        let Some((mut metadata, current)) = self.vault.custom_metadata(id).await? else {
            return Ok(false);
        };
        if version.is_some_and(|v| v != current) {
            return Ok(false);
        }
        change(&mut metadata);
        self.vault.set_custom_metadata(id, &metadata).await?;
        Ok(true)
    }

    /// The API's view of a stored connection, whether or not it is valid.
    fn view(&self, id: &ConnectionId, stored: StoredConnection) -> Value {
        let metadata = stored.custom_metadata.clone();
        let raw_view = raw_fields(&stored, &self.catalog());
        match Connection::from_stored(id.clone(), stored, &self.catalog()) {
            Ok(conn) => self.view_of(&conn, Some(&metadata)),
            Err(e) => {
                let mut v = raw_view;
                v["id"] = json!(id.as_str());
                v["status"] = json!("invalid");
                v["problem"] = json!({"field": e.field(), "message": e.to_string()});
                v["metadata"] = json!(metadata);
                v
            }
        }
    }

    /// The API's view of a valid connection.
    pub fn view_of(&self, conn: &Connection, metadata: Option<&BTreeMap<String, String>>) -> Value {
        let metadata = metadata.unwrap_or(&conn.custom_metadata);
        let mut fields = serde_json::Map::new();
        for (k, v) in &conn.fields {
            fields.insert(k.clone(), json!(v));
        }
        for k in &conn.secret_fields {
            fields.insert(k.clone(), json!({"set": true}));
        }
        let mut stored_status = metadata.get("status").map_or("unverified", String::as_str);
        // A failure recorded for another version (the key was rotated in Vault directly) says
        // nothing of this one.
        let failed_before = metadata
            .get(FAILED_VERSION)
            .filter(|v| stored_status == "failed" && **v != conn.version.to_string());
        if failed_before.is_some() {
            stored_status = "unverified";
        }
        let now = OffsetDateTime::now_utc();
        let mut warnings = Vec::new();
        let mut status = stored_status.to_string();
        let mut expires_in = None;
        telemetry::connection_expiry(conn.id.as_str(), conn.expires_at);
        if let Some(at) = conn.expires_at {
            let left = (at - now).whole_seconds();
            expires_in = Some(left);
            let when = format_time(at);
            if left <= 0 {
                warnings.push(format!("the key expired at {when}; rotate it"));
                if stored_status != "failed" {
                    status = "expired".into();
                }
            } else if left as u64 <= self.expiry_warning.as_secs() {
                warnings.push(format!(
                    "the key expires at {when}, in {}; rotate it before then",
                    in_words(left as u64)
                ));
                if stored_status != "failed" {
                    status = "expiring".into();
                }
            }
        }
        if let Some(w) = metadata.get("scope_warning") {
            warnings.push(w.clone());
        }
        let hosts: Vec<&str> = conn.hosts.iter().collect();
        json!({
            "id": conn.id.as_str(),
            "connector": conn.connector.id,
            "name": conn.name,
            "environment": conn.environment,
            "base_url": conn.base.to_string(),
            "allowed_hosts": hosts,
            "fields": fields,
            "status": status,
            "verified_at": metadata.get("verified_at"),
            "last_error": metadata.get("last_error"),
            "last_error_hint": metadata.get("last_error_hint"),
            "last_error_at": metadata.get("last_error_at"),
            "expires_at": conn.expires_at.map(format_time),
            "expires_in_seconds": expires_in,
            "warnings": warnings,
            "version": conn.version,
        })
    }
}

/// A draft holding what a stored connection holds, to change and check again.
fn draft_of(stored: &StoredConnection) -> Draft {
    let get = |k: &str| stored.fields.get(k).map(|s| s.expose().to_string());
    Draft {
        connector: get("connector").unwrap_or_default(),
        name: get("name"),
        environment: get("environment"),
        base_url: get("base_url"),
        allowed_hosts: get("allowed_hosts")
            .map(|h| {
                h.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        expires_at: get("expires_at"),
        fields: stored
            .fields
            .iter()
            .filter(|(k, _)| !RESERVED_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The fields of a stored connection that cannot be loaded: values of fields the connector
/// says are not secret, `{"set": true}` for everything else.
fn raw_fields(stored: &StoredConnection, catalog: &Catalog) -> Value {
    let get = |k: &str| stored.fields.get(k).map(|s| s.expose().to_string());
    let connector = get("connector").and_then(|c| catalog.get(&c).cloned());
    let mut fields = serde_json::Map::new();
    for (k, v) in &stored.fields {
        if RESERVED_FIELDS.contains(&k.as_str()) {
            continue;
        }
        let plain = connector
            .as_ref()
            .and_then(|c| c.field(k))
            .is_some_and(|f| !f.secret);
        // A value with control characters is shown as set, never echoed.
        if plain && !v.expose().chars().any(char::is_control) {
            fields.insert(k.clone(), json!(v.expose()));
        } else {
            fields.insert(k.clone(), json!({"set": true}));
        }
    }
    json!({
        "connector": get("connector"),
        "name": get("name"),
        "environment": get("environment"),
        // Shown only as latchkey would use it: a URL carrying user information or a query (a
        // key pasted in the wrong place) is shown as set, never echoed.
        "base_url": get("base_url").map(|u| {
            crate::destination::BaseUrl::parse(&u).map_or(json!({"set": true}), |b| json!(b.to_string()))
        }),
        "fields": fields,
        "version": stored.version,
    })
}

fn primary_field(conn: &Connection) -> String {
    conn.connector
        .primary_secret()
        .map_or_else(|| "fields".to_string(), |f| f.name.clone())
}

/// Whether `id` was not noted in `noted` within [`FORBIDDEN_NOTE_INTERVAL`]; notes it if so.
fn first_in_a_while(noted: &DashMap<ConnectionId, Instant>, id: &ConnectionId) -> bool {
    let now = Instant::now();
    let recent = noted
        .get(id)
        .is_some_and(|t| now.saturating_duration_since(*t) < FORBIDDEN_NOTE_INTERVAL);
    if !recent {
        noted.insert(id.clone(), now);
    }
    !recent
}

fn record_verification(metadata: &mut BTreeMap<String, String>, v: Option<&Verification>) {
    match v {
        None => {
            metadata.insert("status".into(), "unverified".into());
            // When a key was verified is no longer this key's.
            metadata.remove("verified_at");
        }
        Some(v) => {
            metadata.insert("status".into(), v.status().into());
            if v.passed() {
                metadata.remove("last_error");
                metadata.remove("last_error_hint");
                metadata.remove("last_error_at");
                if v.status() == "active" {
                    metadata.insert("verified_at".into(), now_rfc3339());
                }
            } else {
                metadata.insert("last_error".into(), v.message.clone());
                match &v.hint {
                    Some(hint) => metadata.insert("last_error_hint".into(), hint.clone()),
                    None => metadata.remove("last_error_hint"),
                };
                metadata.insert("last_error_at".into(), now_rfc3339());
            }
        }
    }
}

fn now_rfc3339() -> String {
    format_time(OffsetDateTime::now_utc())
}

/// `secs` said as a person would: whole days from two days on, else hours, else minutes.
fn in_words(secs: u64) -> String {
    let (n, unit) = match secs {
        s if s >= 2 * 86_400 => (s / 86_400, "day"),
        s if s >= 2 * 3_600 => (s / 3_600, "hour"),
        s => ((s / 60).max(1), "minute"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

fn format_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The audit line of an action that failed, with what went wrong as its outcome. An ID that is
/// not a valid connection ID is not repeated (it could be anything pasted).
fn audit_failure<T>(
    admin: &str,
    action: &'static str,
    id: &str,
    result: &Result<T, LifecycleError>,
) {
    if let Err(e) = result {
        let connection = if ConnectionId::is_valid(id) { id } else { "-" };
        audit(admin, action, connection, None, e.outcome());
    }
}

/// One audit line per admin action. Never a value.
fn audit(admin: &str, action: &'static str, connection: &str, version: Option<u64>, outcome: &str) {
    let version = version.map_or_else(|| "-".to_string(), |v| v.to_string());
    tracing::info!(
        target: "latchkey::audit",
        admin,
        action,
        connection,
        version = %version,
        outcome,
        "admin action"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_given_twice_is_refused_naming_it() {
        let e = serde_json::from_str::<CreateRequest>(
            r#"{"id":"c","connector":"generic-bearer","fields":{"api_key":"sk-one-1234567","api_key":"sk-two-1234567"}}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("duplicate field `api_key`"),
            "{e}"
        );
        assert!(!e.to_string().contains("sk-"), "{e}");
        let e =
            serde_json::from_str::<RotateRequest>(r#"{"fields":{"k":"a","k":"b"}}"#).unwrap_err();
        assert!(e.to_string().starts_with("duplicate field `k`"), "{e}");
        let ok = serde_json::from_str::<RotateRequest>(r#"{"fields":{"k":"a","l":"b"}}"#).unwrap();
        assert_eq!(ok.fields.len(), 2);
    }

    #[test]
    fn the_time_left_is_said_in_words() {
        assert_eq!(in_words(172_799), "47 hours");
        assert_eq!(in_words(172_800), "2 days");
        assert_eq!(in_words(30 * 86_400), "30 days");
        assert_eq!(in_words(7_200), "2 hours");
        assert_eq!(in_words(3_660), "61 minutes");
        assert_eq!(in_words(60), "1 minute");
        assert_eq!(in_words(5), "1 minute");
    }

    /// What the admin API receives holding a new key: parsed into `Secret`s, and `Debug` (of
    /// the requests and of the draft made from them) never shows the key.
    #[test]
    fn the_requests_that_carry_a_key_hold_it_as_a_secret() {
        let create: CreateRequest = serde_json::from_str(
            r#"{"id":"c","connector":"generic-bearer","fields":{"api_key":"sk-create-\u0041bc123"}}"#,
        )
        .unwrap();
        assert_eq!(create.fields["api_key"].expose(), "sk-create-Abc123");
        let rotate: RotateRequest =
            serde_json::from_str(r#"{"fields":{"api_key":"sk-rotate-xyz789"}}"#).unwrap();
        let patch: PatchRequest =
            serde_json::from_str(r#"{"fields":{"region":"sk-patch-qrs456"}}"#).unwrap();
        let draft = Draft {
            fields: rotate.fields.clone(),
            ..Draft::default()
        };
        for (debug, secret) in [
            (format!("{create:?}"), "sk-create"),
            (format!("{rotate:?}"), "sk-rotate"),
            (format!("{patch:?}"), "sk-patch"),
            (format!("{draft:?}"), "sk-rotate"),
        ] {
            assert!(!debug.contains(secret), "{debug}");
            assert!(debug.contains("<redacted>"), "{debug}");
        }
    }
}
