//! The admin listener: health, readiness, Prometheus metrics, and the `/v1/` API behind the
//! admin token.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::auth;
use crate::catalog::{Catalog, Connector, Inject};
use crate::proxy::error::error_response;
use crate::proxy::ProxyBody;
use crate::vault::Vault;

/// The admin listener's service.
pub struct Admin {
    vault: Arc<Vault>,
    catalog: Arc<Catalog>,
    token_sha256: Option<[u8; 32]>,
}

impl Admin {
    pub fn new(vault: Arc<Vault>, catalog: Arc<Catalog>, token_sha256: Option<[u8; 32]>) -> Admin {
        Admin {
            vault,
            catalog,
            token_sha256,
        }
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") => self.ready().await,
            (&Method::GET, "/metrics") => {
                let text = crate::telemetry::metrics_handle().render();
                let mut r = Response::new(full(Bytes::from(text)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            (_, p) if p.starts_with("/v1/") || p == "/v1" => {
                if !self.admin_authorized(&req) {
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
                }
                self.api(req).await
            }
            _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
        }
    }

    fn admin_authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(hash) = &self.token_sha256 else {
            return false;
        };
        let Some(token) = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
        else {
            return false;
        };
        auth::token_matches(&crate::secret::Secret::new(token.trim()), hash)
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

    async fn api(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/v1/connectors") => {
                let list: Vec<Value> = self.catalog.iter().map(|c| connector_json(c)).collect();
                json_response(StatusCode::OK, &json!({ "connectors": list }))
            }
            _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
        }
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
    let environments: serde_json::Map<String, Value> = c
        .environments
        .iter()
        .map(|(e, re)| (e.clone(), Value::String(re.as_str().to_string())))
        .collect();
    json!({
        "id": c.id,
        "name": c.name,
        "base_url": c.base_url.as_ref().map(|t| t.as_str()),
        "allowed_hosts": c.allowed_hosts,
        "inject": inject,
        "verify": c.verify.as_ref().map(|v| json!({"method": v.method.as_str(), "path": v.path.as_str()})),
        "environments": environments,
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
