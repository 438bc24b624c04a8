//! The Vault (or OpenBao) client: token auth, KV v2 reads and writes in latchkey's layout.
//!
//! Beside the connections, under the same mount, lives latchkey's CA: one KV v2 secret at
//! [`CA_PATH`] with the certificate and the key, both PEM, written once by `latchkey ca init`
//! with check-and-set 0 so that of two writers racing only one wins. A connection whose path
//! would be the CA's (a prefix of `latchkey` and the ID `ca`) is never read, listed or written.
//!
//! One `vaultrs` client is shared by everything. Its HTTP client is replaced by one built here,
//! with a timeout and with proxies switched off: in a sidecar `HTTPS_PROXY` points at latchkey
//! itself, and Vault traffic must go direct. No vaultrs value or error is ever formatted with
//! `{:?}` (several print tokens or response bodies); errors are classified into [`VaultError`],
//! whose messages hold no data from Vault.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use vaultrs::api::kv2::requests::{ReadSecretRequest, SetSecretMetadataRequest};
use vaultrs::api::kv2::responses::ReadSecretResponse;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use crate::ca::{Ca, CaError};
use crate::config::{VaultAuth, VaultConfig};
use crate::connection_id::ConnectionId;
use crate::record::StoredConnection;
use crate::secret::Secret;
use crate::telemetry;

/// What can go wrong talking to Vault. Messages never carry anything Vault sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    #[error("Vault did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to Vault at {0}")]
    Unreachable(String),
    #[error("Vault refused latchkey's token (permission denied); check VAULT_TOKEN or vault.auth.token_file")]
    PermissionDenied,
    #[error("Vault answered with status {0}")]
    Status(u16),
    #[error("Vault's answer could not be read ({0})")]
    Malformed(&'static str),
    #[error("cannot read the Vault token file {0}")]
    TokenFile(String),
    #[error("cannot set up the Vault client: {0}")]
    Setup(String),
    #[error("the connection changed in Vault meanwhile (check-and-set failed)")]
    CasMismatch,
    #[error("{0} holds latchkey's CA, not a connection")]
    Reserved(String),
}

/// Where latchkey's CA lives under the mount (`{mount}/latchkey/ca`).
pub const CA_PATH: &str = "latchkey/ca";
/// The CA record's field holding the certificate (PEM).
pub const CA_CERT_FIELD: &str = "certificate";
/// The CA record's field holding the private key (PKCS#8 PEM).
pub const CA_KEY_FIELD: &str = "private_key";

/// The CA record as Vault holds it: its fields, the key among them.
pub struct CaRecord {
    fields: BTreeMap<String, Secret>,
}

impl CaRecord {
    /// The certificate field, or why there is none. Never looks at the key.
    pub fn cert_pem(&self) -> Result<&str, String> {
        let cert = self
            .fields
            .get(CA_CERT_FIELD)
            .ok_or_else(|| format!("the field `{CA_CERT_FIELD}` is missing"))?;
        if cert.expose().trim().is_empty() {
            return Err(format!("the field `{CA_CERT_FIELD}` is empty"));
        }
        Ok(cert.expose())
    }

    /// The CA, checked as [`Ca::from_pem`] checks it; the reason names the field at fault and
    /// never quotes the key.
    pub fn load(&self) -> Result<Ca, String> {
        let cert = self.cert_pem()?;
        let key = self
            .fields
            .get(CA_KEY_FIELD)
            .filter(|k| !k.expose().trim().is_empty())
            .ok_or_else(|| format!("the field `{CA_KEY_FIELD}` is missing or empty"))?;
        Ca::from_pem(cert, key).map_err(|e| {
            let field = match e {
                CaError::BadKey | CaError::KeyMismatch => CA_KEY_FIELD,
                _ => CA_CERT_FIELD,
            };
            format!("`{field}`: {e}")
        })
    }
}

/// The shared Vault client.
pub struct Vault {
    client: RwLock<Arc<VaultClient>>,
    config: VaultConfig,
    /// The token in use, so that a re-read token file can be told apart from the same token.
    token: RwLock<Secret>,
    healthy: AtomicBool,
}

impl Vault {
    /// Builds the client. Reads the token (from `VAULT_TOKEN` or its file) but makes no request.
    pub fn new(config: &VaultConfig) -> Result<Vault, VaultError> {
        let token = read_token(&config.auth)?;
        let client = build_client(config, &token)?;
        Ok(Vault {
            client: RwLock::new(Arc::new(client)),
            config: config.clone(),
            token: RwLock::new(token),
            healthy: AtomicBool::new(true),
        })
    }

    /// Whether the last call reached Vault and was accepted.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn address(&self) -> &str {
        &self.config.address
    }

    fn client(&self) -> Arc<VaultClient> {
        match self.client.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The connection's path under the mount; `None` when that is the CA's.
    fn path(&self, id: &ConnectionId) -> Option<String> {
        let path = if self.config.prefix.is_empty() {
            id.to_string()
        } else {
            format!("{}/{}", self.config.prefix, id)
        };
        (path != CA_PATH).then_some(path)
    }

    /// The connection's path for a write: refused when that is the CA's.
    fn write_path(&self, id: &ConnectionId) -> Result<String, VaultError> {
        self.path(id)
            .ok_or_else(|| VaultError::Reserved(self.ca_location()))
    }

    /// Where the CA is, mount included (`secret/latchkey/ca`), for messages.
    pub fn ca_location(&self) -> String {
        format!("{}/{CA_PATH}", self.config.mount)
    }

    /// Runs one call with the timeout, the metrics and, for a token file, one retry with a
    /// re-read token after a permission error.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, VaultError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut retried = false;
        loop {
            let started = Instant::now();
            let client = self.client();
            let result = match tokio::time::timeout(self.config.timeout, f(client.clone())).await {
                Err(_) => Err(CallError::Timeout),
                Ok(Err(e)) => Err(CallError::Client(e)),
                Ok(Ok(v)) => Ok(v),
            };
            let outcome = match &result {
                Ok(_) => "ok",
                Err(CallError::Client(ClientError::APIError { code: 404, .. })) => "not_found",
                Err(CallError::Timeout) => "timeout",
                Err(_) => "error",
            };
            telemetry::vault_call(op, outcome, started.elapsed());
            match result {
                Ok(v) => {
                    self.set_healthy(None);
                    return Ok(v);
                }
                Err(CallError::Timeout) => {
                    let err = VaultError::Timeout(self.config.timeout);
                    self.set_healthy(Some(&err));
                    return Err(err);
                }
                Err(CallError::Client(e)) => {
                    let err = self.classify(e);
                    match &err {
                        VaultError::Status(404 | 400) => {
                            self.set_healthy(None);
                            return Err(err);
                        }
                        VaultError::PermissionDenied if !retried => {
                            retried = true;
                            // Another call may have re-read the token file since this one took
                            // its client: then the client to retry with is already there.
                            if self.reload_token()? || !Arc::ptr_eq(&client, &self.client()) {
                                continue;
                            }
                        }
                        _ => {}
                    }
                    self.set_healthy(Some(&err));
                    return Err(err);
                }
            }
        }
    }

    /// Records how the last call went (`None`: Vault answered). A change is logged once, not
    /// every call: while Vault fails, cached connections are served without a word, and an
    /// operator at the default level must still learn that, and why.
    fn set_healthy(&self, failure: Option<&VaultError>) {
        let was = self.healthy.swap(failure.is_none(), Ordering::Relaxed);
        match failure {
            Some(e) if was => tracing::warn!(
                error = %e,
                "Vault is failing: cached connections are served stale, others get 503 until it answers"
            ),
            None if !was => tracing::info!("Vault answers again"),
            _ => {}
        }
    }

    fn classify(&self, e: ClientError) -> VaultError {
        match e {
            ClientError::APIError { code: 403, .. } => VaultError::PermissionDenied,
            ClientError::APIError { code, .. } => VaultError::Status(code),
            ClientError::RestClientError { source } => match source {
                rustify::errors::ClientError::ServerResponseError { code: 403, .. } => {
                    VaultError::PermissionDenied
                }
                rustify::errors::ClientError::ServerResponseError { code, .. } => {
                    VaultError::Status(code)
                }
                rustify::errors::ClientError::RequestError { source, .. } => {
                    let timeout = std::iter::successors(
                        Some(&*source as &(dyn std::error::Error + 'static)),
                        |e| e.source(),
                    )
                    .any(|e| {
                        e.downcast_ref::<reqwest::Error>()
                            .is_some_and(|r| r.is_timeout())
                    });
                    if timeout {
                        VaultError::Timeout(self.config.timeout)
                    } else {
                        VaultError::Unreachable(self.config.address.clone())
                    }
                }
                rustify::errors::ClientError::ResponseParseError { .. }
                | rustify::errors::ClientError::ResponseConversionError { .. } => {
                    VaultError::Malformed("not the JSON of the Vault API")
                }
                _ => VaultError::Malformed("unexpected client error"),
            },
            ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => {
                VaultError::Malformed("empty response")
            }
            ClientError::JsonParseError { .. } => VaultError::Malformed("not JSON"),
            _ => VaultError::Malformed("unexpected client error"),
        }
    }

    /// Re-reads a token file; true when it held a new token and the client now uses it.
    fn reload_token(&self) -> Result<bool, VaultError> {
        if !matches!(self.config.auth, VaultAuth::TokenFile(_)) {
            return Ok(false);
        }
        let token = read_token(&self.config.auth)?;
        let same = match self.token.read() {
            Ok(t) => *t == token,
            Err(p) => *p.into_inner() == token,
        };
        if same {
            return Ok(false);
        }
        let client = build_client(&self.config, &token)?;
        if let Ok(mut c) = self.client.write() {
            *c = Arc::new(client);
        }
        if let Ok(mut t) = self.token.write() {
            *t = token;
        }
        tracing::info!("re-read the Vault token file after Vault refused the previous token");
        Ok(true)
    }

    /// Reads a connection: its fields, version and custom metadata, in one request.
    /// `Ok(None)` when Vault has no such secret (or its latest version is deleted).
    pub async fn read(&self, id: &ConnectionId) -> Result<Option<StoredConnection>, VaultError> {
        match self.path(id) {
            Some(path) => self.read_at("read", path).await,
            None => Ok(None),
        }
    }

    /// Reads latchkey's CA record (`None` when there is none). Its key is in the record: the
    /// caller takes out only what it needs.
    pub async fn read_ca(&self) -> Result<Option<CaRecord>, VaultError> {
        let stored = self.read_at("read_ca", CA_PATH.to_string()).await?;
        if stored.as_ref().is_some_and(|s| !s.not_text.is_empty()) {
            return Err(VaultError::Malformed("a field is not a string"));
        }
        Ok(stored.map(|s| CaRecord { fields: s.fields }))
    }

    /// Stores a new CA at [`CA_PATH`], only if there is none (check-and-set 0): of two
    /// `latchkey ca init` racing, one gets [`VaultError::CasMismatch`].
    pub async fn create_ca(&self, ca: &Ca) -> Result<(), VaultError> {
        let fields = BTreeMap::from([
            (CA_CERT_FIELD.to_string(), Secret::new(ca.cert_pem())),
            (CA_KEY_FIELD.to_string(), ca.key_pem()),
        ]);
        self.write_at("write_ca", CA_PATH.to_string(), &fields, Some(0))
            .await
            .map(|_| ())
    }

    async fn read_at(
        &self,
        op: &'static str,
        path: String,
    ) -> Result<Option<StoredConnection>, VaultError> {
        let mount = self.config.mount.as_str();
        let response = self
            .call(op, |client| {
                let path = path.clone();
                async move {
                    let endpoint = ReadSecretRequest::builder()
                        .mount(mount)
                        .path(path)
                        .build()
                        .map_err(|_| ClientError::InvalidUpdateParameter)?;
                    vaultrs::api::exec_with_result(&*client, endpoint).await
                }
            })
            .await;
        let response = match response {
            Ok(r) => r,
            Err(VaultError::Status(404)) => return Ok(None),
            Err(e) => return Err(e),
        };
        stored_connection(response)
    }

    /// Writes a new version of a connection; returns the version number. With `cas`, the write
    /// only happens if the current version is that one (0: only if there is none), and
    /// [`VaultError::CasMismatch`] says it was not.
    pub async fn write(
        &self,
        id: &ConnectionId,
        fields: &BTreeMap<String, Secret>,
        cas: Option<u64>,
    ) -> Result<u64, VaultError> {
        let path = self.write_path(id)?;
        self.write_at("write", path, fields, cas).await
    }

    async fn write_at(
        &self,
        op: &'static str,
        path: String,
        fields: &BTreeMap<String, Secret>,
        cas: Option<u64>,
    ) -> Result<u64, VaultError> {
        let data = WriteData(fields);
        let cas = match cas.map(u32::try_from) {
            Some(Ok(c)) => Some(c),
            Some(Err(_)) => return Err(VaultError::Malformed("version out of range")),
            None => None,
        };
        let meta = self
            .call(op, |client| {
                let (path, data) = (path.clone(), &data);
                async move {
                    match cas {
                        Some(cas) => {
                            vaultrs::kv2::set_with_options(
                                &*client,
                                &self.config.mount,
                                &path,
                                data,
                                vaultrs::api::kv2::requests::SetSecretRequestOptions { cas },
                            )
                            .await
                        }
                        None => vaultrs::kv2::set(&*client, &self.config.mount, &path, data).await,
                    }
                }
            })
            .await;
        match meta {
            Ok(meta) => Ok(meta.version),
            // Vault answers a failed check-and-set with 400.
            Err(VaultError::Status(400)) if cas.is_some() => Err(VaultError::CasMismatch),
            Err(e) => Err(e),
        }
    }

    /// Replaces the connection's KV `custom_metadata` (which never creates a version).
    pub async fn set_custom_metadata(
        &self,
        id: &ConnectionId,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), VaultError> {
        let path = self.write_path(id)?;
        let custom: HashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.call("write_metadata", |client| {
            let (path, custom) = (path.clone(), custom.clone());
            async move {
                let mut builder = SetSecretMetadataRequest::builder();
                builder.custom_metadata(custom);
                vaultrs::kv2::set_metadata(&*client, &self.config.mount, &path, Some(&mut builder))
                    .await
            }
        })
        .await
    }

    /// The connection's current `custom_metadata` and version, from the metadata endpoint
    /// (`None` when there is no such secret). For read-modify-write of single keys.
    pub async fn custom_metadata(
        &self,
        id: &ConnectionId,
    ) -> Result<Option<(BTreeMap<String, String>, u64)>, VaultError> {
        let Some(path) = self.path(id) else {
            return Ok(None);
        };
        let meta = self
            .call("read_metadata", |client| {
                let path = path.clone();
                async move { vaultrs::kv2::read_metadata(&*client, &self.config.mount, &path).await }
            })
            .await;
        match meta {
            Ok(m) => Ok(Some((
                m.custom_metadata.unwrap_or_default().into_iter().collect(),
                m.current_version,
            ))),
            Err(VaultError::Status(404)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes a connection and all of its versions.
    pub async fn delete(&self, id: &ConnectionId) -> Result<(), VaultError> {
        let path = self.write_path(id)?;
        self.call("delete", |client| {
            let path = path.clone();
            async move { vaultrs::kv2::delete_metadata(&*client, &self.config.mount, &path).await }
        })
        .await
    }

    /// Lists the connection IDs stored under the prefix (invalid IDs, and the CA record when
    /// the prefix is `latchkey`, are skipped).
    pub async fn list(&self) -> Result<Vec<ConnectionId>, VaultError> {
        let prefix = self.config.prefix.clone();
        let keys = self
            .call("list", |client| {
                let prefix = prefix.clone();
                async move { vaultrs::kv2::list(&*client, &self.config.mount, &prefix).await }
            })
            .await;
        match keys {
            Ok(keys) => Ok(keys
                .into_iter()
                .filter_map(|k| ConnectionId::parse(&k).ok())
                .filter(|id| self.path(id).is_some())
                .collect()),
            Err(VaultError::Status(404)) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Looks the token up: Vault is reachable and accepts it. Returns the token's remaining TTL
    /// when it is renewable.
    pub async fn check_token(&self) -> Result<Option<Duration>, VaultError> {
        let info = self
            .call("lookup_self", |client| async move {
                vaultrs::token::lookup_self(&*client).await
            })
            .await?;
        Ok((info.renewable && info.ttl > 0).then(|| Duration::from_secs(info.ttl)))
    }

    /// Keeps a renewable token alive: renews it at half its remaining TTL, until shutdown.
    pub async fn renew_token_until(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let wait = match self.check_token().await {
                Ok(Some(ttl)) => ttl / 2,
                Ok(None) => return,
                Err(_) => Duration::from_secs(10),
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait.max(Duration::from_secs(1))) => {}
            }
            let renewed = self
                .call("renew_self", |client| async move {
                    vaultrs::token::renew_self(&*client, None).await
                })
                .await;
            if let Err(e) = renewed {
                tracing::warn!(error = %e, "could not renew the Vault token");
            }
        }
    }
}

enum CallError {
    Timeout,
    Client(ClientError),
}

/// The fields of a write as vaultrs takes them: serialized straight from the [`Secret`]s, so
/// latchkey makes no plain copy of its own. vaultrs makes two that latchkey cannot reach: it
/// turns the data into a `serde_json::Value` and then into the request body; both live only
/// until the call returns (each retry makes them anew), and are not zeroized. `Debug` shows the
/// field names only.
struct WriteData<'a>(&'a BTreeMap<String, Secret>);

impl serde::Serialize for WriteData<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name, value.expose())?;
        }
        map.end()
    }
}

impl std::fmt::Debug for WriteData<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

/// A KV v2 read's answer as latchkey keeps it: `None` for a deleted or destroyed version, the
/// fields that are text (strings, numbers, booleans), and the names of those that are not.
fn stored_connection(response: ReadSecretResponse) -> Result<Option<StoredConnection>, VaultError> {
    if response.metadata.destroyed || !response.metadata.deletion_time.is_empty() {
        return Ok(None);
    }
    let serde_json::Value::Object(map) = response.data else {
        return Err(VaultError::Malformed("the secret's data is not an object"));
    };
    let mut fields = BTreeMap::new();
    let mut not_text = Vec::new();
    for (name, value) in map {
        let value = match value {
            serde_json::Value::String(s) => Secret::from(s),
            serde_json::Value::Number(n) => Secret::from(n.to_string()),
            serde_json::Value::Bool(b) => Secret::from(b.to_string()),
            // One connection's bad field is that connection's problem, not Vault's.
            _ => {
                not_text.push(name);
                continue;
            }
        };
        fields.insert(name, value);
    }
    Ok(Some(StoredConnection {
        fields,
        version: response.metadata.version,
        custom_metadata: response
            .metadata
            .custom_metadata
            .unwrap_or_default()
            .into_iter()
            .collect(),
        not_text,
    }))
}

/// The body of a KV v2 read as Vault sends it, parsed as [`Vault::read`] parses it, for the fuzz
/// targets in `fuzz/` (cargo feature `fuzzing`; not part of latchkey's API).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn parse_read_body(body: &[u8]) -> Result<Option<StoredConnection>, VaultError> {
    let result: vaultrs::api::EndpointResult<ReadSecretResponse> = serde_json::from_slice(body)
        .map_err(|_| VaultError::Malformed("the answer is not a KV v2 read"))?;
    let response = result
        .data
        .ok_or(VaultError::Malformed("the answer has no data"))?;
    stored_connection(response)
}

fn read_token(auth: &VaultAuth) -> Result<Secret, VaultError> {
    match auth {
        // The standard library hands out a copy of the variable: it is zeroized once trimmed
        // into the token. (The process's own environment block keeps the original, as it
        // does for every variable; latchkey does not rewrite it.)
        VaultAuth::TokenEnv => std::env::var("VAULT_TOKEN")
            .ok()
            .map(zeroize::Zeroizing::new)
            .filter(|t| !t.trim().is_empty())
            .map(|t| Secret::new(t.trim()))
            .ok_or_else(|| VaultError::Setup("VAULT_TOKEN is not set".into())),
        VaultAuth::TokenFile(path) => read_token_file(path),
    }
}

fn read_token_file(path: &PathBuf) -> Result<Secret, VaultError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| VaultError::TokenFile(format!("{}: {e}", path.display())))?;
    let text = Secret::from(text);
    let token = text.expose().trim();
    if token.is_empty() {
        return Err(VaultError::TokenFile(format!(
            "{} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(token))
}

fn build_client(config: &VaultConfig, token: &Secret) -> Result<VaultClient, VaultError> {
    let mut settings = VaultClientSettingsBuilder::default();
    // The builder's address setter panics on a bad URL; the config checked it, and it is
    // checked again here so that nothing can reach that panic.
    reqwest::Url::parse(&config.address)
        .map_err(|_| VaultError::Setup(format!("{:?} is not a URL", config.address)))?;
    settings
        .address(&config.address)
        .token(token.expose())
        .timeout(Some(config.timeout))
        .verify(true)
        .ca_certs(Vec::new());
    let settings = settings
        .build()
        .map_err(|_| VaultError::Setup("invalid Vault client settings".into()))?;
    let mut client = VaultClient::new(settings)
        .map_err(|_| VaultError::Setup("cannot build the Vault client".into()))?;

    let mut http = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .timeout(config.timeout)
        .connect_timeout(config.timeout);
    if let Some(path) = &config.ca_cert {
        let pem = std::fs::read(path)
            .map_err(|e| VaultError::Setup(format!("cannot read {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
            VaultError::Setup(format!("{} holds no PEM certificate", path.display()))
        })?;
        for cert in certs {
            http = http.add_root_certificate(cert);
        }
    }
    let http = http
        .build()
        .map_err(|_| VaultError::Setup("cannot build the Vault HTTP client".into()))?;
    client.http = rustify::clients::reqwest::Client::new(&config.address, http);
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_of_a_write_is_serialized_from_the_secrets_and_debug_hides_it() {
        let fields = BTreeMap::from([
            ("api_key".to_string(), Secret::new("sk-write-path-1234")),
            ("connector".to_string(), Secret::new("generic-bearer")),
        ]);
        let data = WriteData(&fields);
        let value = serde_json::to_value(&data).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"api_key": "sk-write-path-1234", "connector": "generic-bearer"})
        );
        let debug = format!("{data:?}");
        assert!(!debug.contains("sk-write-path"), "{debug}");
        assert!(debug.contains("api_key"), "{debug}");
    }

    fn record(fields: &[(&str, &str)]) -> CaRecord {
        CaRecord {
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), Secret::new(*v)))
                .collect(),
        }
    }

    #[test]
    fn a_ca_record_loads_and_says_which_field_is_wrong_never_quoting_the_key() {
        let ca = Ca::generate("test CA").unwrap();
        let key = ca.key_pem();
        let whole = record(&[(CA_CERT_FIELD, ca.cert_pem()), (CA_KEY_FIELD, key.expose())]);
        assert_eq!(
            whole.load().unwrap().cert_pem(),
            ca.cert_pem().replace("\r\n", "\n")
        );

        let no_key = record(&[(CA_CERT_FIELD, ca.cert_pem())]);
        assert!(no_key.load().unwrap_err().contains("`private_key`"));
        assert_eq!(no_key.cert_pem().unwrap(), ca.cert_pem());
        let no_cert = record(&[(CA_KEY_FIELD, key.expose())]);
        let err = no_cert.load().unwrap_err();
        assert!(err.contains("`certificate`"), "{err}");
        let empty = record(&[(CA_CERT_FIELD, " "), (CA_KEY_FIELD, key.expose())]);
        assert!(empty.cert_pem().unwrap_err().contains("empty"));

        let other = Ca::generate("other CA").unwrap();
        let mismatched = record(&[
            (CA_CERT_FIELD, ca.cert_pem()),
            (CA_KEY_FIELD, other.key_pem().expose()),
        ]);
        let err = mismatched.load().unwrap_err();
        assert!(
            err.contains("`private_key`: ") && err.contains("does not belong"),
            "{err}"
        );
        for line in other
            .key_pem()
            .expose()
            .lines()
            .filter(|l| !l.starts_with("-----"))
        {
            assert!(!err.contains(line));
        }
    }
}
