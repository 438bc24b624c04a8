//! The Vault (or OpenBao) client: its token, KV v2 reads and writes in latchkey's layout.
//!
//! The token comes from `VAULT_TOKEN`, a token file, or a login (AppRole, JWT, Kubernetes: see
//! [`login`]). A login method logs in at the first call; [`Vault::renew_token_until`] then
//! keeps the token alive, renewing it and logging in again as its lease says, and a call that
//! Vault refuses with permission denied logs in again once (one login serves every call that
//! was refused) and is retried, so that no request fails because a token ran out.
//!
//! Beside the connections, under the same mount, lives latchkey's CA: one KV v2 secret at
//! [`CA_PATH`] with the certificate and the key, both PEM, written once by `latchkey ca init`
//! with check-and-set 0 so that of two writers racing only one wins. A connection whose path
//! would be the CA's (a prefix of `latchkey` and the ID `ca`) is never read, listed or written.
//!
//! One `vaultrs` client per Vault node (`vault.address` may list every node of an HA cluster),
//! shared by everything. Their HTTP client is one built here, with a timeout, the CA file, no
//! redirects and proxies switched off: in a sidecar `HTTPS_PROXY` points at latchkey itself, and
//! Vault traffic must go direct; and the token goes to the listed nodes only, never to wherever
//! a redirect points. A call that cannot reach a node, times out, or gets a 5xx, a 429 or a
//! redirect moves on to the next node; the node that answered last is where the next calls
//! start. No vaultrs value or error is ever formatted with `{:?}` (several print tokens or
//! response bodies); errors are classified into [`VaultError`], whose messages hold no data from
//! Vault.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
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

mod capped;
pub mod login;

use login::{Backoff, Lease, Reason, Step};

/// What can go wrong talking to Vault. Messages never carry anything Vault sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    #[error("Vault did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to Vault at {0}")]
    Unreachable(String),
    #[error("Vault at {0} is not trusted: its TLS certificate does not check against the built-in roots or vault.ca_cert / VAULT_CACERT")]
    Untrusted(String),
    #[error("Vault refused latchkey's token (permission denied); check vault.auth (or VAULT_TOKEN) and the token's policies")]
    PermissionDenied,
    #[error("Vault's policy for latchkey's token does not cover this path (permission denied; the token itself is valid)")]
    PathDenied,
    #[error("vault.mount {0:?} is not a mount latchkey's token can use: there is no such mount, or no policy of the token covers it")]
    NoMount(String),
    #[error(
        "vault.mount {mount:?} is a {found} mount; latchkey needs a KV version 2 mount (kv-v2)"
    )]
    NotKv2 { mount: String, found: String },
    #[error("Vault refused the {method} login (status {status}{says}); check {hint}")]
    LoginRefused {
        method: &'static str,
        status: u16,
        says: VaultSays,
        hint: &'static str,
    },
    #[error("Vault refused to unwrap the wrapping token in {0} (vault.auth.secret_id_file): a wrapping token unwraps once only, and expires; put a new one there")]
    UnwrapRefused(String),
    #[error("cannot read {key}: {reason}")]
    CredentialFile { key: &'static str, reason: String },
    #[error("Vault answered with status {0}{1}")]
    Status(u16, VaultSays),
    #[error("the Vault node at {0} cannot serve the KV mount yet (a standby waiting for the active node's upgrade of it)")]
    NotYet(String),
    #[error("Vault's answer could not be read ({0})")]
    Malformed(&'static str),
    /// The record's own fault, where [`VaultError::Malformed`] is the answer's (Vault's, or
    /// whatever answered in its place).
    #[error("a field is not a string")]
    NotText,
    #[error("the Vault node at {0} sent an answer longer than {1} bytes: refused unread")]
    TooLong(String, usize),
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
    client: RwLock<Arc<Nodes>>,
    config: Box<VaultConfig>,
    /// The token in use, so that a re-read token file can be told apart from the same token.
    /// Empty for a login method until the first login.
    token: RwLock<Secret>,
    healthy: AtomicBool,
    /// The token's life: lease, logins, changes (boxed, as the configuration is, to keep a
    /// `Vault` value small: the CLI holds one in an enum beside much smaller variants).
    auth: Box<AuthState>,
    /// The index of the node that answered last: calls start there.
    current: AtomicUsize,
}

/// A client per node of `vault.address`, in the configured order (never empty), all with the
/// same token and sharing one HTTP client.
struct Nodes(Vec<Node>);

struct Node {
    address: String,
    client: Arc<VaultClient>,
}

struct AuthState {
    /// The token's lease and the last login's failure.
    session: Mutex<Session>,
    /// One login at a time. Holds the secret ID unwrapped from the last wrapping token.
    login: tokio::sync::Mutex<Unwrapped>,
    /// Counts the tokens put in place, so that the renewal task reschedules for a new one.
    changed: tokio::sync::watch::Sender<u64>,
}

/// What is known of the token in use.
#[derive(Default)]
struct Session {
    /// When the lease was granted (or renewed), and the lease; `None` until known.
    lease: Option<(Instant, Lease)>,
    /// The last login, when it failed: no other is tried before `retry_at`.
    failure: Option<Failure>,
}

struct Failure {
    error: VaultError,
    reason: Reason,
    retry_at: Instant,
    backoff: Backoff,
}

/// The wrapping token last unwrapped and the secret ID it held: a wrapping token unwraps only
/// once, so a login again with the same file uses the secret ID kept here.
#[derive(Default)]
struct Unwrapped(Option<(Secret, Secret)>);

impl Vault {
    /// Builds the client. Reads the token (from `VAULT_TOKEN` or its file) but makes no request;
    /// a login method logs in at the first call.
    pub fn new(config: &VaultConfig) -> Result<Vault, VaultError> {
        let token = read_token(&config.auth)?;
        let client = build_client(config, &token)?;
        Ok(Vault {
            client: RwLock::new(Arc::new(client)),
            config: Box::new(config.clone()),
            token: RwLock::new(token),
            healthy: AtomicBool::new(true),
            auth: Box::new(AuthState {
                session: Mutex::new(Session::default()),
                login: tokio::sync::Mutex::new(Unwrapped::default()),
                changed: tokio::sync::watch::Sender::new(0),
            }),
            current: AtomicUsize::new(0),
        })
    }

    /// Whether the last call reached Vault and was accepted.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The configured node addresses, comma-separated, for messages.
    pub fn address(&self) -> String {
        self.config.addresses.join(", ")
    }

    fn client(&self) -> Arc<Nodes> {
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
            let nodes = self.client();
            if self.config.auth.logs_in() && !self.has_token() {
                self.login(&nodes, Reason::Start).await?;
                continue;
            }
            let err = match self.call_nodes(op, &nodes, &f).await {
                Ok(v) => {
                    self.set_healthy(None);
                    return Ok(v);
                }
                Err(e) => e,
            };
            match &err {
                VaultError::Status(404 | 400, _) => {
                    self.set_healthy(None);
                    return Err(err);
                }
                VaultError::PermissionDenied if !retried => {
                    retried = true;
                    // A policy that leaves this path out refuses it with the same 403 as a
                    // token that is no longer valid. The token looked up tells them apart, so
                    // that a path latchkey may not touch costs no login, and Vault does not
                    // look down for it.
                    if !matches!(op, "lookup_self" | "renew_self") && self.token_works(&nodes).await
                    {
                        self.set_healthy(None);
                        return Err(VaultError::PathDenied);
                    }
                    if self.replace_token(&nodes).await? {
                        continue;
                    }
                }
                _ => {}
            }
            self.set_healthy(Some(&err));
            return Err(err);
        }
    }

    /// Whether Vault accepts the token the client has (a lookup of itself, which every token's
    /// default policy allows).
    async fn token_works(&self, nodes: &Nodes) -> bool {
        let lookup =
            |client: Arc<VaultClient>| async move { capped::exec(&client, LookupSelf).await };
        self.call_nodes("lookup_self", nodes, &lookup).await.is_ok()
    }

    /// Tries the nodes in turn, from the one that answered last, until one answers with anything
    /// but a failure that another node may not have (see [`fails_over`]). The node that answers
    /// is where the next calls start. When every node fails, the last failure is the error (or,
    /// when none could be reached, one naming them all).
    async fn call_nodes<T, F, Fut>(
        &self,
        op: &'static str,
        nodes: &Nodes,
        f: &F,
    ) -> Result<T, VaultError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let count = nodes.0.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut unreachable = 0;
        let mut last = VaultError::Unreachable(self.address());
        for i in (0..count).map(|k| (first + k) % count) {
            let Some(node) = nodes.0.get(i) else { continue };
            let started = Instant::now();
            let result =
                match tokio::time::timeout(self.config.timeout, f(node.client.clone())).await {
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
            let err = match result {
                Ok(v) => {
                    self.answered(i, node);
                    return Ok(v);
                }
                Err(CallError::Timeout) => VaultError::Timeout(self.config.timeout),
                Err(CallError::Client(e)) => self.classify(e, &node.address),
            };
            if !fails_over(&err) {
                self.answered(i, node);
                return Err(err);
            }
            if count > 1 {
                tracing::debug!(vault = %node.address, error = %err, "Vault node failed; trying the next");
            }
            if matches!(err, VaultError::Unreachable(_)) {
                unreachable += 1;
            }
            last = err;
        }
        if unreachable == count && count > 1 {
            last = VaultError::Unreachable(self.address());
        }
        Err(last)
    }

    /// Remembers the node that answered, so that the next calls start there.
    fn answered(&self, index: usize, node: &Node) {
        if self.current.swap(index, Ordering::Relaxed) != index {
            tracing::info!(vault = %node.address, "Vault calls now go to this node");
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
            None if !was => tracing::info!("Vault calls succeed again"),
            _ => {}
        }
    }

    fn classify(&self, e: ClientError, address: &str) -> VaultError {
        match e {
            ClientError::APIError { code: 403, .. } => VaultError::PermissionDenied,
            // A 503 in all but its code: another node may serve it.
            ClientError::APIError { code: 400, errors }
                if errors.iter().any(|e| e.starts_with(KV_UPGRADING)) =>
            {
                VaultError::NotYet(address.to_string())
            }
            ClientError::APIError { code, errors } => {
                VaultError::Status(code, VaultSays::new(&errors))
            }
            ClientError::RestClientError { source } => match source {
                rustify::errors::ClientError::ServerResponseError { code: 403, .. } => {
                    VaultError::PermissionDenied
                }
                rustify::errors::ClientError::ServerResponseError { code, content } => {
                    VaultError::Status(code, VaultSays::from_body(content.as_deref()))
                }
                rustify::errors::ClientError::RequestError { source, .. } => {
                    let timeout = causes(&*source).any(timed_out);
                    let untrusted = causes(&*source).any(untrusted_certificate);
                    if timeout {
                        VaultError::Timeout(self.config.timeout)
                    } else if untrusted {
                        VaultError::Untrusted(address.to_string())
                    } else {
                        VaultError::Unreachable(address.to_string())
                    }
                }
                rustify::errors::ClientError::ResponseParseError { .. }
                | rustify::errors::ClientError::ResponseConversionError { .. } => {
                    VaultError::Malformed("not the JSON of the Vault API")
                }
                // The answer's body: it stopped coming in time, broke off, or was longer than
                // latchkey reads. Vault's trouble (another node may do better), not a record's.
                rustify::errors::ClientError::ResponseError { source } => {
                    if let Some(long) =
                        causes(&*source).find_map(|e| e.downcast_ref::<capped::TooLong>())
                    {
                        VaultError::TooLong(address.to_string(), long.0)
                    } else if causes(&*source).any(timed_out) {
                        VaultError::Timeout(self.config.timeout)
                    } else {
                        VaultError::Unreachable(address.to_string())
                    }
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

    /// After Vault refused the token `stale` carries: whether there is another token to retry
    /// with now. Another call may have put one in place meanwhile; otherwise a token file is
    /// re-read, and a login method logs in again.
    async fn replace_token(&self, stale: &Arc<Nodes>) -> Result<bool, VaultError> {
        if !Arc::ptr_eq(stale, &self.client()) {
            return Ok(true);
        }
        match &self.config.auth {
            VaultAuth::TokenEnv => Ok(false),
            VaultAuth::TokenFile(_) => self.reload_token(),
            _ => self.login(stale, Reason::Denied).await.map(|()| true),
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
        self.session().lease = None;
        self.auth.changed.send_modify(|n| *n += 1);
        tracing::info!("re-read the Vault token file after Vault refused the previous token");
        Ok(true)
    }

    fn session(&self) -> MutexGuard<'_, Session> {
        match self.auth.session.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn has_token(&self) -> bool {
        match self.token.read() {
            Ok(t) => !t.is_empty(),
            Err(p) => !p.into_inner().is_empty(),
        }
    }

    /// Logs in with the configured method and puts the new token in place, unless the token
    /// `stale` carries was replaced while this caller waited for its turn (one login serves
    /// every caller that saw the same token refused), or the last login failed and its backoff
    /// has not passed (then that login's error, without asking Vault again).
    async fn login(&self, stale: &Arc<Nodes>, reason: Reason) -> Result<(), VaultError> {
        let mut unwrapped = self.auth.login.lock().await;
        if !Arc::ptr_eq(stale, &self.client()) {
            return Ok(());
        }
        if let Some(f) = &self.session().failure {
            if Instant::now() < f.retry_at {
                return Err(f.error.clone());
            }
        }
        let method = self.config.auth.method();
        let logged_in = match self.log_in(&mut unwrapped).await {
            Ok((token, lease)) => build_client(&self.config, &token).map(|c| (c, token, lease)),
            Err(e) => Err(e),
        };
        match logged_in {
            Ok((client, token, lease)) => {
                if let Ok(mut c) = self.client.write() {
                    *c = Arc::new(client);
                }
                if let Ok(mut t) = self.token.write() {
                    *t = token;
                }
                {
                    let mut session = self.session();
                    session.lease = Some((Instant::now(), lease));
                    session.failure = None;
                }
                self.auth.changed.send_modify(|n| *n += 1);
                self.healthy.store(true, Ordering::Relaxed);
                telemetry::vault_auth("login", "ok");
                tracing::info!(
                    method,
                    reason = reason.as_str(),
                    ttl_s = lease.ttl.as_secs(),
                    renewable = lease.renewable,
                    "logged in to Vault"
                );
                Ok(())
            }
            Err(error) => {
                let wait = {
                    let mut session = self.session();
                    let mut backoff = session
                        .failure
                        .take()
                        .map(|f| f.backoff)
                        .unwrap_or_default();
                    let wait = backoff.next(login::unit());
                    session.failure = Some(Failure {
                        error: error.clone(),
                        reason,
                        retry_at: Instant::now() + wait,
                        backoff,
                    });
                    wait
                };
                self.healthy.store(false, Ordering::Relaxed);
                telemetry::vault_auth("login", auth_outcome(&error));
                tracing::warn!(
                    method,
                    reason = reason.as_str(),
                    error = %error,
                    retry_in_ms = wait.as_millis() as u64,
                    "could not log in to Vault"
                );
                Err(error)
            }
        }
    }

    /// One login with the configured method: reads the credential's file (and unwraps a
    /// wrapped secret ID), then asks Vault, on a client with no token.
    async fn log_in(&self, unwrapped: &mut Unwrapped) -> Result<(Secret, Lease), VaultError> {
        let anonymous = build_client(&self.config, &Secret::default())?;
        let (info, hint) = match &self.config.auth {
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
                wrapped,
            } => {
                let secret_id = if *wrapped {
                    self.unwrap_secret_id(secret_id_file, unwrapped).await?
                } else {
                    read_credential("vault.auth.secret_id_file", secret_id_file)?
                };
                let info = self
                    .call_nodes("login", &anonymous, &|c: Arc<VaultClient>| {
                        let secret_id = &secret_id;
                        async move { login::approle(&c, mount, role_id, secret_id).await }
                    })
                    .await;
                (
                    info,
                    "vault.auth.mount, vault.auth.role_id and the secret ID in vault.auth.secret_id_file",
                )
            }
            VaultAuth::Jwt {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_credential("vault.auth.jwt_file", jwt_file)?;
                let info = self
                    .call_nodes("login", &anonymous, &|c: Arc<VaultClient>| {
                        let jwt = &jwt;
                        async move { login::jwt(&c, mount, role.as_deref(), jwt).await }
                    })
                    .await;
                (
                    info,
                    "vault.auth.mount, vault.auth.role and the JWT in vault.auth.jwt_file",
                )
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_credential("vault.auth.jwt_file", jwt_file)?;
                let info = self
                    .call_nodes("login", &anonymous, &|c: Arc<VaultClient>| {
                        let jwt = &jwt;
                        async move { login::kubernetes(&c, mount, role, jwt).await }
                    })
                    .await;
                (
                    info,
                    "vault.auth.mount, vault.auth.role and the service-account token in vault.auth.jwt_file",
                )
            }
            VaultAuth::TokenEnv | VaultAuth::TokenFile(_) => {
                return Err(VaultError::Setup("the token method does not log in".into()))
            }
        };
        match info {
            Ok(info) => Ok(login::granted(info)),
            Err(VaultError::PermissionDenied) => Err(self.refused(403, VaultSays::default(), hint)),
            Err(VaultError::Status(status @ 400..=499, says)) => {
                Err(self.refused(status, says, hint))
            }
            Err(e) => Err(e),
        }
    }

    fn refused(&self, status: u16, says: VaultSays, hint: &'static str) -> VaultError {
        VaultError::LoginRefused {
            method: self.config.auth.method(),
            status,
            says,
            hint,
        }
    }

    /// The secret ID wrapped by the token in `path`: unwrapped once per wrapping token, and
    /// kept for the logins after (Vault unwraps a token only once).
    async fn unwrap_secret_id(
        &self,
        path: &std::path::Path,
        unwrapped: &mut Unwrapped,
    ) -> Result<Secret, VaultError> {
        let wrapping = read_credential("vault.auth.secret_id_file", path)?;
        if let Some((token, secret_id)) = &unwrapped.0 {
            if *token == wrapping {
                return Ok(secret_id.clone());
            }
        }
        let client = build_client(&self.config, &wrapping)?;
        let unwrapped_id = self
            .call_nodes("unwrap", &client, &|c: Arc<VaultClient>| async move {
                login::unwrap_secret_id(&c).await
            })
            .await;
        match unwrapped_id {
            Ok(Some(secret_id)) => {
                unwrapped.0 = Some((wrapping, secret_id.clone()));
                tracing::info!(file = %path.display(), "unwrapped the AppRole secret ID");
                Ok(secret_id)
            }
            Ok(None) => Err(VaultError::CredentialFile {
                key: "vault.auth.secret_id_file",
                reason: format!(
                    "the wrapping token in {} unwrapped to no secret_id",
                    path.display()
                ),
            }),
            Err(VaultError::PermissionDenied | VaultError::Status(400..=499, _)) => {
                Err(VaultError::UnwrapRefused(path.display().to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// Reads a connection: its fields, version and custom metadata, in one request.
    /// `Ok(None)` when Vault has no such secret (or its latest version is deleted).
    pub async fn read(&self, id: &ConnectionId) -> Result<Option<StoredConnection>, VaultError> {
        match self.path(id) {
            Some(path) => match self.read_at("read", path).await {
                // Not readable by latchkey is not there for its clients: cached as not found,
                // counted against the client's misses, and said to the operator.
                Err(VaultError::PathDenied) => {
                    tracing::warn!(connection = %id, "Vault's policy for latchkey's token does not cover this connection's path: answered as not found");
                    Ok(None)
                }
                read => read,
            },
            None => Ok(None),
        }
    }

    /// Reads latchkey's CA record (`None` when there is none). Its key is in the record: the
    /// caller takes out only what it needs.
    pub async fn read_ca(&self) -> Result<Option<CaRecord>, VaultError> {
        let stored = self.read_at("read_ca", CA_PATH.to_string()).await?;
        if stored.as_ref().is_some_and(|s| !s.not_text.is_empty()) {
            return Err(VaultError::NotText);
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
                    capped::exec(&client, endpoint).await
                }
            })
            .await;
        let response = match response {
            Ok(r) => r,
            Err(VaultError::Status(404, _)) => return Ok(None),
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
            Err(VaultError::Status(400, _)) if cas.is_some() => Err(VaultError::CasMismatch),
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
            Err(VaultError::Status(404, _)) => Ok(None),
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
            Err(VaultError::Status(404, _)) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Looks the token up: Vault is reachable and accepts it. Returns the token's remaining TTL
    /// when it is renewable.
    pub async fn check_token(&self) -> Result<Option<Duration>, VaultError> {
        let info = self
            .call("lookup_self", |client| async move {
                capped::exec(&client, LookupSelf).await
            })
            .await?;
        Ok((info.renewable && info.ttl > 0).then(|| Duration::from_secs(info.ttl)))
    }

    /// Looks the token up, then the mount: readiness. A mount that is not there, or not KV
    /// version 2, would otherwise look healthy while every connection reads as not found.
    pub async fn check(&self) -> Result<Option<Duration>, VaultError> {
        let ttl = self.check_token().await?;
        self.check_mount().await?;
        Ok(ttl)
    }

    /// What `vault.mount` is, as Vault's own CLI asks it (`sys/internal/ui/mounts`, which the
    /// default policy allows for any path the token has a capability under).
    async fn check_mount(&self) -> Result<(), VaultError> {
        let mount = self.config.mount.clone();
        let info = self
            .call("mount_info", |client| {
                let mount = mount.clone();
                async move { capped::exec(&client, MountInfo(mount)).await }
            })
            .await;
        let info = match info {
            Ok(info) => info,
            Err(VaultError::PathDenied | VaultError::Status(404, _)) => {
                return Err(VaultError::NoMount(mount))
            }
            Err(e) => return Err(e),
        };
        let version = info.options.as_ref().and_then(|o| o.get("version"));
        if info.kind == "kv" && version.is_some_and(|v| v == "2") {
            return Ok(());
        }
        let found = match (info.kind.as_str(), version) {
            ("kv", Some(v)) => format!("KV version {v}"),
            ("kv", None) => "KV version 1".to_string(),
            (kind, _) => format!("{kind:?}"),
        };
        Err(VaultError::NotKv2 { mount, found })
    }

    /// Keeps latchkey's token alive until shutdown. A login method logs in (if no call has
    /// yet), renews its token at about two thirds of the TTL (with jitter), and logs in again
    /// when a renewal fails, when renewals no longer give a full TTL (the max TTL nears) or
    /// when the token is not renewable; failed logins are retried with backoff. A static token
    /// is looked up, then renewed the same way while it is renewable; a renewal that fails is
    /// retried with backoff.
    pub async fn renew_token_until(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut changed = self.auth.changed.subscribe();
        let logs_in = self.config.auth.logs_in();
        let mut backoff = Backoff::default();
        let mut warned_capped = false;
        loop {
            changed.borrow_and_update();
            let (lease, failure) = {
                let session = self.session();
                let failure = session.failure.as_ref().map(|f| (f.retry_at, f.reason));
                (session.lease, failure)
            };
            // A login method without a token, or whose last login failed: log in, once the
            // backoff has passed.
            if logs_in && (failure.is_some() || !self.has_token()) {
                let (retry_at, reason) = failure.unwrap_or((Instant::now(), Reason::Start));
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep_until(retry_at.into()) => {}
                }
                let _ = self.login(&self.client(), reason).await;
                continue;
            }
            let (granted, lease) = match lease {
                Some(known) => known,
                // A login always leaves a lease: wait for the next token.
                None if logs_in => {
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = changed.changed() => continue,
                    }
                }
                None => match self.look_up_lease().await {
                    Ok(Some(known)) => {
                        backoff = Backoff::default();
                        known
                    }
                    // Not renewable, or never expires: nothing to do until another token.
                    Ok(None) => {
                        tokio::select! {
                            _ = &mut shutdown => return,
                            _ = changed.changed() => continue,
                        }
                    }
                    Err(_) => {
                        tokio::select! {
                            _ = &mut shutdown => return,
                            _ = tokio::time::sleep(backoff.next(login::unit())) => continue,
                        }
                    }
                },
            };
            let Some(after) = login::wait_before_step(&lease, logs_in, login::unit()) else {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = changed.changed() => continue,
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = changed.changed() => continue,
                _ = tokio::time::sleep_until((granted + after).into()) => {}
            }
            match login::step(&lease, logs_in) {
                Step::Renew => match self.renew().await {
                    Ok(()) => backoff = Backoff::default(),
                    Err(_) if logs_in => {
                        let _ = self.login(&self.client(), Reason::RenewalFailed).await;
                    }
                    Err(_) => {
                        tokio::select! {
                            _ = &mut shutdown => return,
                            _ = changed.changed() => {}
                            _ = tokio::time::sleep(backoff.next(login::unit())) => {}
                        }
                    }
                },
                Step::Login(reason) => {
                    let _ = self.login(&self.client(), reason).await;
                }
                Step::Wait => {
                    if !warned_capped {
                        warned_capped = true;
                        tracing::warn!(
                            ttl_s = lease.ttl.as_secs(),
                            "the Vault token cannot be renewed past its max TTL; it expires then (a token file is re-read when Vault refuses the token)"
                        );
                    }
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = changed.changed() => {}
                    }
                }
            }
        }
    }

    /// Renews the token in use and records the lease the renewal gave (unless the token was
    /// replaced meanwhile: then the new token's lease stands).
    async fn renew(&self) -> Result<(), VaultError> {
        let before = *self.auth.changed.borrow();
        let renewed = self
            .call("renew_self", |client| async move {
                vaultrs::token::renew_self(&*client, None).await
            })
            .await;
        match renewed {
            Ok(info) => {
                telemetry::vault_auth("renew", "ok");
                let mut session = self.session();
                let current = session
                    .lease
                    .filter(|_| *self.auth.changed.borrow() == before);
                match current {
                    Some((_, lease)) => {
                        let lease = login::renewed(lease, info);
                        session.lease = Some((Instant::now(), lease));
                        tracing::debug!(
                            ttl_s = lease.ttl.as_secs(),
                            max_ttl_near = lease.capped,
                            "renewed the Vault token"
                        );
                    }
                    None => drop(login::granted(info)),
                }
                Ok(())
            }
            Err(e) => {
                telemetry::vault_auth("renew", auth_outcome(&e));
                tracing::warn!(error = %e, "could not renew the Vault token");
                Err(e)
            }
        }
    }

    /// A static token's lease, by looking it up: `None` when it cannot be renewed or never
    /// expires.
    async fn look_up_lease(&self) -> Result<Option<(Instant, Lease)>, VaultError> {
        let before = *self.auth.changed.borrow();
        let info = self
            .call("lookup_self", |client| async move {
                capped::exec(&client, LookupSelf).await
            })
            .await?;
        if !info.renewable || info.ttl == 0 {
            return Ok(None);
        }
        let ttl = Duration::from_secs(info.ttl);
        let lease = Lease {
            ttl,
            full_ttl: Duration::from_secs(info.creation_ttl).max(ttl),
            renewable: true,
            capped: false,
        };
        let known = (Instant::now(), lease);
        if *self.auth.changed.borrow() == before {
            self.session().lease = Some(known);
        }
        Ok(Some(known))
    }
}

/// What Vault said of an error (its `errors` list), for the operator reading a log line or
/// `/readyz`: "Vault is sealed", "invalid role or secret ID". Vault's messages name paths and
/// reasons, not the values sent; even so only printable ASCII is kept, and 200 characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VaultSays(Option<Box<str>>);

impl VaultSays {
    const LIMIT: usize = 200;

    pub fn new(errors: &[String]) -> VaultSays {
        let mut said = String::new();
        for e in errors.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if !said.is_empty() {
                said.push_str("; ");
            }
            said.extend(e.chars().map(|c| match c {
                ' '..='~' => c,
                _ => ' ',
            }));
            if said.len() > Self::LIMIT {
                break;
            }
        }
        if said.len() > Self::LIMIT {
            said.truncate(Self::LIMIT);
            said.push_str("...");
        }
        VaultSays((!said.is_empty()).then(|| said.into_boxed_str()))
    }

    /// From an error answer's body, `{"errors": [...]}` when Vault wrote one.
    fn from_body(body: Option<&str>) -> VaultSays {
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(default)]
            errors: Vec<String>,
        }
        body.and_then(|b| serde_json::from_str::<Body>(b).ok())
            .map_or_else(VaultSays::default, |b| VaultSays::new(&b.errors))
    }
}

impl std::fmt::Display for VaultSays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(said) => write!(f, ": {said:?}"),
            None => Ok(()),
        }
    }
}

/// A login's or renewal's outcome, as counted: `refused` when Vault said no.
fn auth_outcome(e: &VaultError) -> &'static str {
    match e {
        VaultError::PermissionDenied
        | VaultError::LoginRefused { .. }
        | VaultError::UnwrapRefused(_)
        | VaultError::Status(400..=499, _) => "refused",
        _ => "error",
    }
}

/// Reads a credential file (a secret ID, a JWT); the error names the key and the file.
fn read_credential(key: &'static str, path: &std::path::Path) -> Result<Secret, VaultError> {
    login::read_secret_file(path).map_err(|reason| VaultError::CredentialFile { key, reason })
}

enum CallError {
    Timeout,
    Client(ClientError),
}

/// Whether an error is, or wraps, rustls refusing the server's certificate. rustls's error
/// reaches reqwest inside `io::Error`s (nested), whose `source` skips what they wrap.
fn untrusted_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut e = e;
    for _ in 0..8 {
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
            return true;
        }
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => e = inner,
            None => return false,
        }
    }
    false
}

/// `e` and the errors under it.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// Whether `e` is reqwest's timeout (`vault.timeout` on the HTTP client).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<reqwest::Error>()
        .is_some_and(|r| r.is_timeout())
}

/// What a KV v2 mount answers (with a 400) on a standby that has not yet seen the active node
/// finish upgrading the mount's layout: for a moment after a mount is made, and after a
/// standby's mount table changes.
const KV_UPGRADING: &str = "Waiting for the primary to upgrade";

/// Whether another node may answer where this one failed: it could not be reached, did not
/// answer in time, showed a certificate that does not check or cannot serve the mount yet, or
/// answered with a server error (sealed, no active node, overloaded), a 429
/// (rate limited, or a standby behind the index asked for), or a redirect (a standby pointing
/// at the active node, which latchkey does not follow: the token goes to listed nodes only).
fn fails_over(e: &VaultError) -> bool {
    match e {
        VaultError::Timeout(_)
        | VaultError::Unreachable(_)
        | VaultError::Untrusted(_)
        | VaultError::TooLong(..)
        | VaultError::NotYet(_) => true,
        VaultError::Status(code, _) => *code >= 500 || *code == 429 || (300..400).contains(code),
        _ => false,
    }
}

/// `GET auth/token/lookup-self`, read for the three fields latchkey uses. (vaultrs' own
/// response type insists on fields a root token made by `operator init` does not have, such as
/// `issue_time`: with it, such a token would never look valid.)
struct LookupSelf;

#[derive(serde::Deserialize)]
struct TokenLookup {
    #[serde(default)]
    ttl: u64,
    #[serde(default)]
    creation_ttl: u64,
    #[serde(default)]
    renewable: bool,
}

impl rustify::Endpoint for LookupSelf {
    type Response = TokenLookup;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;

    fn path(&self) -> String {
        "auth/token/lookup-self".to_string()
    }

    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::GET
    }
}

/// `sys/internal/ui/mounts/{mount}`: a mount's type and options.
struct MountInfo(String);

#[derive(serde::Deserialize)]
struct MountDescription {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    options: Option<HashMap<String, String>>,
}

impl rustify::Endpoint for MountInfo {
    type Response = MountDescription;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;

    fn path(&self) -> String {
        format!("sys/internal/ui/mounts/{}", self.0)
    }

    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::GET
    }
}

/// The fields of a write as vaultrs takes them: serialized straight from the [`Secret`]s, so
/// latchkey makes no plain copy of its own. vaultrs makes two that latchkey cannot reach: it
/// turns the data into a `serde_json::Value` and then into the request body; both live only
/// until the call returns (each retry makes them anew), and are not zeroized.
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

/// The token of the `token` method; empty for a login method, which has none until it logs in.
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
        VaultAuth::TokenFile(path) => login::read_secret_file(path).map_err(VaultError::TokenFile),
        VaultAuth::AppRole { .. } | VaultAuth::Jwt { .. } | VaultAuth::Kubernetes { .. } => {
            Ok(Secret::default())
        }
    }
}

/// A client per node, sharing one HTTP client: proxies off, no redirects, the CA file trusted.
fn build_client(config: &VaultConfig, token: &Secret) -> Result<Nodes, VaultError> {
    let mut http = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.timeout)
        .connect_timeout(config.timeout);
    if let Some(path) = &config.ca_cert {
        let pem = std::fs::read(path)
            .map_err(|e| VaultError::Setup(format!("cannot read {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|certs| !certs.is_empty())
            .ok_or_else(|| {
                VaultError::Setup(format!("{} holds no PEM certificate", path.display()))
            })?;
        for cert in certs {
            http = http.add_root_certificate(cert);
        }
    }
    let http = http
        .build()
        .map_err(|_| VaultError::Setup("cannot build the Vault HTTP client".into()))?;
    // vaultrs puts the namespace in a header with an `unwrap`: the config checked it, and it
    // is checked again here so that nothing can reach that panic.
    if let Some(ns) = &config.namespace {
        http::HeaderValue::from_str(ns)
            .map_err(|_| VaultError::Setup(format!("{ns:?} is not a namespace")))?;
    }
    let nodes = config
        .addresses
        .iter()
        .map(|address| {
            Ok(Node {
                address: address.clone(),
                client: Arc::new(node_client(config, address, token, http.clone())?),
            })
        })
        .collect::<Result<Vec<_>, VaultError>>()?;
    if nodes.is_empty() {
        return Err(VaultError::Setup("no Vault address".into()));
    }
    Ok(Nodes(nodes))
}

fn node_client(
    config: &VaultConfig,
    address: &str,
    token: &Secret,
    http: reqwest::Client,
) -> Result<VaultClient, VaultError> {
    let mut settings = VaultClientSettingsBuilder::default();
    // The builder's address setter panics on a bad URL; the config checked it, and it is
    // checked again here so that nothing can reach that panic.
    reqwest::Url::parse(address)
        .map_err(|_| VaultError::Setup(format!("{address:?} is not a URL")))?;
    settings
        .address(address)
        .token(token.expose())
        .timeout(Some(config.timeout))
        .verify(true)
        .ca_certs(Vec::new())
        .namespace(config.namespace.clone());
    let settings = settings
        .build()
        .map_err(|_| VaultError::Setup("invalid Vault client settings".into()))?;
    let mut client = VaultClient::new(settings)
        .map_err(|_| VaultError::Setup("cannot build the Vault client".into()))?;
    client.http = rustify::clients::reqwest::Client::new(address, http);
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_vault_says_is_kept_printable_and_short() {
        assert_eq!(VaultSays::new(&[]).to_string(), "");
        assert_eq!(VaultSays::new(&[" ".into()]).to_string(), "");
        assert_eq!(
            VaultSays::new(&["Vault is sealed".into()]).to_string(),
            r#": "Vault is sealed""#
        );
        assert_eq!(
            VaultSays::new(&["one".into(), "two\r\nthree\u{1b}".into()]).to_string(),
            r#": "one; two  three ""#
        );
        let long = VaultSays::new(&["x".repeat(500)]).to_string();
        assert_eq!(long.len(), ": \"".len() + 200 + "...\"".len(), "{long}");
        assert_eq!(
            VaultSays::from_body(Some(r#"{"errors":["permission denied"]}"#)).to_string(),
            r#": "permission denied""#
        );
        assert_eq!(VaultSays::from_body(Some("<html>")).to_string(), "");
        assert_eq!(VaultSays::from_body(None).to_string(), "");
    }

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
