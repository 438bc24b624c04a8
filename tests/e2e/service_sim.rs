//! A simulated API service, Stripe-like (and Slack-like for services that answer 200 with
//! `"ok": false`), for the connection lifecycle tests.
//!
//! It holds a mutable set of keys, each in a state ([`KeyState`]), and checks
//! `Authorization: Bearer {key}` on every request:
//!
//! - `GET /v1/balance` (Stripe's verification call): 200 for a read-write or read-only key, 401
//!   for an unknown or revoked one, 403 for a key told to lack that scope ([`ServiceSim::deny_verify`]);
//! - `POST`, `PUT`, `PATCH`, `DELETE` anywhere: 403 for a read-only key, 200 for a read-write one;
//! - any other `GET`: 200 for a known live key;
//! - `POST /auth.test` (Slack's verification call): always 200, with `{"ok": false, "error": ...}`
//!   when the key is refused;
//! - anything under [`WRONG_PREFIX`]: 404, as a wrong base URL would get;
//! - anything under [`SLOW_PREFIX`]: the same, after [`SLOW`]; the verification call of a key
//!   in a gate ([`ServiceSim::gate_verify`]) once the verification calls of all the keys of
//!   its gate have arrived.
//!
//! Every request is recorded with the key it carried ([`ServiceSim::seen`]), so that a test can
//! tell exactly which key latchkey injected. Answers carry only the SHA-256 of the key, never
//! the key, as a real service would.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A base URL under this prefix answers 404 to everything: a wrong base URL.
pub const WRONG_PREFIX: &str = "/nowhere";
/// A base URL under this prefix answers after [`SLOW`]: a service too slow to wait for.
pub const SLOW_PREFIX: &str = "/slow";
pub const SLOW: Duration = Duration::from_secs(10);

/// What the service thinks of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    ReadWrite,
    ReadOnly,
    Revoked,
}

/// One request the service received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The bearer key, if the request carried one.
    pub key: Option<String>,
    /// How many `Authorization` headers arrived.
    pub authorizations: usize,
    pub user_agent: Option<String>,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, KeyState>,
    verify_denied: HashSet<String>,
    verify_gate: HashMap<String, Arc<tokio::sync::Barrier>>,
    seen: Vec<Seen>,
}

pub struct ServiceSim {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _stop: oneshot::Sender<()>,
}

impl ServiceSim {
    /// Starts the service on 127.0.0.1, plain HTTP.
    pub async fn start() -> ServiceSim {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stop_rx => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(state.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ServiceSim {
            addr,
            state,
            _stop: stop_tx,
        }
    }

    /// `http://127.0.0.1:{port}`: the base URL of a connection to this service.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new random key with `prefix` (`sk_test_`, `sk_live_`, `xoxb-` ...), known to the
    /// service in `state`.
    pub fn new_key(&self, prefix: &str, state: KeyState) -> String {
        let key = format!("{prefix}{}", random_hex(12));
        self.set(&key, state);
        key
    }

    pub fn set(&self, key: &str, state: KeyState) {
        self.state
            .lock()
            .unwrap()
            .keys
            .insert(key.to_string(), state);
    }

    /// The service revokes the key: from now on it answers 401 to it.
    pub fn revoke(&self, key: &str) {
        self.set(key, KeyState::Revoked);
    }

    /// The key lacks the scope of the verification call: 403 there.
    pub fn deny_verify(&self, key: &str) {
        self.state
            .lock()
            .unwrap()
            .verify_denied
            .insert(key.to_string());
    }

    /// The verification calls with these keys are held until all of them have arrived, then
    /// answered together: whatever the caller did before each call is done for all of them.
    pub fn gate_verify(&self, keys: &[&str]) {
        let gate = Arc::new(tokio::sync::Barrier::new(keys.len()));
        let mut state = self.state.lock().unwrap();
        for k in keys {
            state.verify_gate.insert(k.to_string(), gate.clone());
        }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// The last request received.
    pub fn last(&self) -> Seen {
        self.seen()
            .last()
            .cloned()
            .expect("the service saw no request")
    }

    /// How many requests carried `key`.
    pub fn uses_of(&self, key: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.key.as_deref() == Some(key))
            .count()
    }
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn answer(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    // Read the whole (small) body, so that the connection stays usable.
    let _ = body.collect().await;
    let full_path = parts.uri.path().to_string();
    let authorizations = parts
        .headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .count();
    let key = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let user_agent = parts
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state.lock().unwrap().seen.push(Seen {
        method: parts.method.to_string(),
        path: full_path.clone(),
        key: key.clone(),
        authorizations,
        user_agent,
    });

    let mut path = full_path.as_str();
    if let Some(rest) = path.strip_prefix(SLOW_PREFIX) {
        tokio::time::sleep(SLOW).await;
        path = rest;
    }
    if path.starts_with(WRONG_PREFIX) {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            json!({"error": {"type": "invalid_request_error", "message": "Unrecognized request URL"}}),
        ));
    }

    let gate = key
        .as_deref()
        .and_then(|k| state.lock().unwrap().verify_gate.get(k).cloned());
    if let Some(gate) = gate.filter(|_| path == "/v1/balance") {
        gate.wait().await;
    }
    let key_state = key
        .as_deref()
        .and_then(|k| state.lock().unwrap().keys.get(k).copied());
    let verify_denied = key
        .as_deref()
        .is_some_and(|k| state.lock().unwrap().verify_denied.contains(k));
    let key_sha256 = key.as_deref().map(latchkey::auth::sha256_hex);
    let ok = json!({
        "ok": true,
        "method": parts.method.as_str(),
        "path": path,
        "key_sha256": key_sha256,
    });

    // Slack-like: always 200, the verdict in the body.
    if path == "/auth.test" {
        let error = match key_state {
            None | Some(KeyState::Revoked) => Some("invalid_auth"),
            Some(_) if verify_denied => Some("missing_scope"),
            Some(_) => None,
        };
        return Ok(match error {
            Some(e) => reply(StatusCode::OK, json!({"ok": false, "error": e})),
            None => reply(StatusCode::OK, ok),
        });
    }

    let answer = match key_state {
        None | Some(KeyState::Revoked) => reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}}),
        ),
        Some(_) if path == "/v1/balance" && parts.method == Method::GET && verify_denied => reply(
            StatusCode::FORBIDDEN,
            json!({"error": {"type": "permission_error", "message": "The provided key does not have the required permissions for this endpoint"}}),
        ),
        Some(KeyState::ReadOnly) if parts.method != Method::GET && parts.method != Method::HEAD => {
            reply(
                StatusCode::FORBIDDEN,
                json!({"error": {"type": "permission_error", "message": "The provided key has read-only permissions"}}),
            )
        }
        Some(_) => reply(StatusCode::OK, ok),
    };
    Ok(answer)
}
