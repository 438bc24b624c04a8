//! The admin listener: health, readiness, Prometheus metrics, and the `/v1/` API behind the
//! admin tokens.
//!
//! `connections` holds the connection API; this module routes, authenticates and answers the
//! rest. Admin errors use the same JSON shape as the proxy's (`{"error":{"code","message"}}`),
//! with a `field` where one field is at fault.

mod connections;
mod web;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::body::{self, BoxBody};
use crate::ca::LeavesSlot;
use crate::catalog::{Connector, Inject};
use crate::config::AdminToken;
use crate::lifecycle::Lifecycle;
use crate::response::{json_response, AdminError};
use crate::vault::Vault;

use web::{CookieAuth, Sessions};

/// What the fuzz target `admin_session` reaches: how a browser's request is read for its
/// session cookie and its origin.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use super::web::{same_origin, session_cookie, COOKIE};
}

/// The admin listener's service.
pub struct Admin {
    vault: Arc<Vault>,
    lifecycle: Arc<Lifecycle>,
    tokens: Vec<AdminToken>,
    /// The tunnel form's leaves, whose CA certificate `/ca.pem` serves once there is one.
    leaves: LeavesSlot,
    /// The web page's sign-in sessions.
    sessions: Sessions,
    /// `proxy.body_timeout`: a request body that sends nothing this long is answered `408`.
    body_timeout: std::time::Duration,
    /// The last readiness check of Vault and when it ended: a `/readyz` that comes while one
    /// runs waits for it and answers with its result, so that many at once cost Vault two
    /// calls, not two each.
    readiness: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
}

impl Admin {
    /// With `secure_cookie` (`admin.secure_cookie`: the listener speaks TLS, or sits behind a
    /// proxy that does), the session cookie is `Secure`.
    pub fn new(
        vault: Arc<Vault>,
        lifecycle: Arc<Lifecycle>,
        tokens: Vec<AdminToken>,
        leaves: LeavesSlot,
        (secure_cookie, body_timeout): (bool, std::time::Duration),
    ) -> Admin {
        Admin {
            vault,
            lifecycle,
            tokens,
            leaves,
            sessions: Sessions::new(secure_cookie, body_timeout),
            body_timeout,
            readiness: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<BoxBody> {
        let mut r = self.route(req).await;
        web::secure_headers(r.headers_mut());
        r
    }

    async fn route(&self, mut req: Request<Incoming>) -> Response<BoxBody> {
        let path = req.uri().path().to_string();
        // HEAD is GET without the body (RFC 9110 section 9.3.2), which hyper leaves out of the
        // answer to a HEAD: served as the GET, a load balancer's HEAD check sees the GET's
        // status and headers.
        if req.method() == Method::HEAD {
            *req.method_mut() = Method::GET;
        }
        if let Some(r) = web::asset(&path) {
            if req.method() == Method::GET {
                return r;
            }
            return AdminError::not_allowed("GET, HEAD");
        }
        match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") => self.ready().await,
            (&Method::GET, "/ca.pem") => match self.leaves.cert_pem() {
                Some(pem) => {
                    let mut r = Response::new(body::full(Bytes::copy_from_slice(pem.as_bytes())));
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/x-pem-file"),
                    );
                    r
                }
                None => AdminError::new(
                    StatusCode::NOT_FOUND,
                    "no_ca",
                    "latchkey has no CA: make it with `latchkey ca init` (stored in Vault; restart latchkey) or set tls.ca_cert and tls.ca_key",
                )
                .into_response(),
            },
            (&Method::GET, "/metrics") => {
                let text = crate::telemetry::render_metrics();
                let mut r = Response::new(body::full(Bytes::from(text)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            (_, "/healthz" | "/readyz" | "/ca.pem" | "/metrics") => {
                AdminError::not_allowed("GET, HEAD")
            }
            (_, "/session") => {
                self.sessions
                    .handle(req, |token| self.find_token(token).map(str::to_string))
                    .await
            }
            (_, p) if p.starts_with("/v1/") || p == "/v1" => {
                let unauthorized = || {
                    AdminError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "the admin API needs Authorization: Bearer {admin token}",
                    )
                    .into_response()
                };
                // A request with `Authorization` is judged by it alone; one without may carry
                // the web page's session cookie, and then a write needs its CSRF token.
                let admin = if req.headers().contains_key(http::header::AUTHORIZATION) {
                    match self.authenticate(&req) {
                        Some(admin) => admin.to_string(),
                        None => return unauthorized(),
                    }
                } else {
                    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
                    match self.sessions.check(req.headers(), write) {
                        CookieAuth::Admin(admin) => admin,
                        CookieAuth::NoCsrf => return web::csrf_refused(),
                        CookieAuth::None | CookieAuth::Expired => return unauthorized(),
                    }
                };
                self.api(&admin, req).await
            }
            _ => AdminError::not_found().into_response(),
        }
    }

    /// The name of the admin token the request carries. Every configured hash is compared, in
    /// constant time.
    fn authenticate(&self, req: &Request<Incoming>) -> Option<&str> {
        let value = req
            .headers()
            .get(http::header::AUTHORIZATION)?
            .to_str()
            .ok()?;
        let (scheme, token) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.find_token(token.trim())
    }

    /// The name of the admin token `token` is, by the same constant-time hash compare for the
    /// bearer header and the web page's sign-in.
    fn find_token(&self, token: &str) -> Option<&str> {
        crate::auth::find_by_token(
            token,
            self.tokens
                .iter()
                .map(|t| (&t.token_sha256, t.name.as_str())),
        )
    }

    async fn ready(&self) -> Response<BoxBody> {
        let asked = std::time::Instant::now();
        let result = {
            let mut last = self.readiness.lock().await;
            match &*last {
                // A check that ended after this request came: as fresh as one it would start.
                Some((ended, result)) if *ended >= asked => result.clone(),
                _ => {
                    let result = self
                        .vault
                        .check()
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    *last = Some((std::time::Instant::now(), result.clone()));
                    result
                }
            }
        };
        match result {
            Ok(()) => json_response(StatusCode::OK, &json!({"status": "ready"})),
            Err(reason) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "not ready", "reason": reason}),
            ),
        }
    }

    async fn api(&self, admin: &str, req: Request<Incoming>) -> Response<BoxBody> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        if path == "/v1/connectors" {
            if req.method() != Method::GET {
                return AdminError::not_allowed("GET, HEAD");
            }
            let list: Vec<Value> = self
                .lifecycle
                .catalog()
                .iter()
                .map(|c| connector_json(c))
                .collect();
            return json_response(StatusCode::OK, &json!({ "connectors": list }));
        }
        if let Some(rest) = path.strip_prefix("/v1/connections") {
            return connections::handle(&self.lifecycle, admin, req, (rest, self.body_timeout))
                .await;
        }
        AdminError::not_found().into_response()
    }
}

/// A connector as the API shows it: everything but nothing secret (the catalog holds none).
pub fn connector_json(c: &Connector) -> Value {
    let inject = match &c.inject {
        Inject::Bearer { value } => json!({"scheme": "bearer", "value": value.as_str()}),
        Inject::Header { header, value } => {
            json!({"scheme": "header", "header": header.as_str(), "value": value.as_str()})
        }
        Inject::Basic { username, password } => json!({
            "scheme": "basic", "username": username.as_str(), "password": password.as_str()
        }),
        Inject::Query { param, value } => {
            json!({"scheme": "query", "param": param, "value": value.as_str()})
        }
    };
    let fields: Vec<Value> = c
        .fields
        .iter()
        .map(|f| {
            json!({
                "name": f.name,
                "label": f.label,
                "secret": f.secret,
                "required": f.required,
                "pattern": f.pattern.as_ref().map(|p| p.as_str()),
                "default": f.default,
                "description": f.description,
            })
        })
        .collect();
    let patterns = |list: &[(String, regex::Regex)]| -> serde_json::Map<String, Value> {
        list.iter()
            .map(|(e, re)| (e.clone(), Value::String(re.as_str().to_string())))
            .collect()
    };
    json!({
        "id": c.id,
        "name": c.name,
        "base_url": c.base_url.as_ref().map(|t| t.as_str()),
        "allowed_hosts": c.allowed_hosts,
        "inject": inject,
        "verify": c.verify.as_ref().map(|v| json!({"method": v.method.as_str(), "path": v.path.as_str()})),
        "environments": patterns(&c.environments),
        "environment_urls": patterns(&c.environment_urls),
        "fields": fields,
        "scopes": c.scopes,
        "docs_url": c.docs_url,
        "strip": c.strip.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
    })
}
