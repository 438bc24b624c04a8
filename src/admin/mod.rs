//! The admin listener: health, readiness, Prometheus metrics, and the `/v1/` API behind the
//! admin tokens.
//!
//! `connections` holds the connection API; this module routes, authenticates and answers the
//! rest. Admin errors use the same JSON shape as the proxy's (`{"error":{"code","message"}}`),
//! with a `field` where one field is at fault.

mod connections;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::catalog::{Connector, Inject};
use crate::config::AdminToken;
use crate::lifecycle::Lifecycle;
use crate::proxy::error::error_response;
use crate::proxy::ProxyBody;
use crate::vault::Vault;

/// The admin listener's service.
pub struct Admin {
    vault: Arc<Vault>,
    lifecycle: Arc<Lifecycle>,
    tokens: Vec<AdminToken>,
}

impl Admin {
    pub fn new(vault: Arc<Vault>, lifecycle: Arc<Lifecycle>, tokens: Vec<AdminToken>) -> Admin {
        Admin {
            vault,
            lifecycle,
            tokens,
        }
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") => self.ready().await,
            (&Method::GET, "/metrics") => {
                let text = crate::telemetry::render_metrics();
                let mut r = Response::new(full(Bytes::from(text)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            (_, p) if p.starts_with("/v1/") || p == "/v1" => {
                let Some(admin) = self.authenticate(&req) else {
                    let mut r = error_response(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "the admin API needs Authorization: Bearer {admin token}",
                    );
                    r.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"latchkey-admin\""),
                    );
                    return r;
                };
                let admin = admin.to_string();
                self.api(&admin, req).await
            }
            _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
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
        let digest = Sha256::digest(token.trim().as_bytes());
        let mut found = None;
        for t in &self.tokens {
            if bool::from(digest.as_slice().ct_eq(&t.token_sha256)) {
                found = Some(t.name.as_str());
            }
        }
        found
    }

    async fn ready(&self) -> Response<ProxyBody> {
        match self.vault.check_token().await {
            Ok(_) => json_response(StatusCode::OK, &json!({"status": "ready"})),
            Err(e) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "not ready", "reason": e.to_string()}),
            ),
        }
    }

    async fn api(&self, admin: &str, req: Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        if path == "/v1/connectors" {
            if req.method() != Method::GET {
                return method_not_allowed();
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
            return connections::handle(&self.lifecycle, admin, req, rest).await;
        }
        error_response(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint")
    }
}

fn method_not_allowed() -> Response<ProxyBody> {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
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
    })
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|e| match e {}).boxed_unsync()
}

pub fn json_response(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    let mut r = Response::new(full(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
