//! `/v1/connections`: the HTTP side of the connection lifecycle. Parses JSON (never echoing a
//! value in an error), calls [`Lifecycle`], and maps its errors to statuses.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::{json_response, method_not_allowed};
use crate::lifecycle::{Lifecycle, LifecycleError, Saved};
use crate::proxy::ProxyBody;

/// Largest request body the API reads.
const MAX_BODY: usize = 1024 * 1024;

/// Routes `rest`, the path after `/v1/connections`.
pub async fn handle(
    lifecycle: &Lifecycle,
    admin: &str,
    req: Request<Incoming>,
    rest: &str,
) -> Response<ProxyBody> {
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    let result = match (segments.as_slice(), &method) {
        ([], &Method::GET) => lifecycle
            .list()
            .await
            .map(|list| (StatusCode::OK, json!({ "connections": list }))),
        ([], &Method::POST) => match body(req).await {
            Ok(create) => lifecycle
                .create(admin, create)
                .await
                .map(|s| (StatusCode::CREATED, saved(s))),
            Err(e) => return e,
        },
        ([id], &Method::GET) => lifecycle
            .get(id)
            .await
            .map(|c| (StatusCode::OK, json!({ "connection": c }))),
        ([id], &Method::PATCH) => match body(req).await {
            Ok(patch) => lifecycle
                .patch(admin, id, patch)
                .await
                .map(|s| (StatusCode::OK, saved(s))),
            Err(e) => return e,
        },
        ([id], &Method::DELETE) => lifecycle
            .delete(admin, id)
            .await
            .map(|()| (StatusCode::NO_CONTENT, Value::Null)),
        ([id, "secret"], &Method::PUT) => match body(req).await {
            Ok(rotate) => lifecycle
                .rotate(admin, id, rotate)
                .await
                .map(|s| (StatusCode::OK, saved(s))),
            Err(e) => return e,
        },
        ([id, "verify"], &Method::POST) => lifecycle.verify(admin, id).await.map(|(c, v)| {
            (
                StatusCode::OK,
                json!({ "connection": c, "verification": v.to_json() }),
            )
        }),
        ([] | [_] | [_, "secret" | "verify"], _) => return method_not_allowed(),
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such admin endpoint",
                None,
                None,
            )
        }
    };
    match result {
        Ok((StatusCode::NO_CONTENT, _)) => {
            let mut r = json_response(StatusCode::NO_CONTENT, &Value::Null);
            *r.body_mut() = http_body_util::Empty::new()
                .map_err(|e| match e {})
                .boxed_unsync();
            r.headers_mut().remove(http::header::CONTENT_TYPE);
            r
        }
        Ok((status, value)) => json_response(status, &value),
        Err(e) => lifecycle_error(e),
    }
}

fn saved(s: Saved) -> Value {
    json!({
        "connection": s.connection,
        "notices": s.notices,
        "verification": s.verification.map(|v| v.to_json()),
    })
}

/// Reads and parses a JSON body. A parse error names where it went wrong and never quotes a
/// value (a misplaced key would otherwise be echoed back).
async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<ProxyBody>> {
    let bytes: Bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the request body could not be read (at most 1 MiB of JSON)",
                None,
                None,
            ))
        }
    };
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let e = match parsed {
        Ok(v) => match de.end() {
            Ok(()) => return Ok(v),
            Err(e) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!(
                        "the request body is not valid JSON (line {}, column {})",
                        e.line(),
                        e.column()
                    ),
                    None,
                    None,
                ))
            }
        },
        Err(e) => e,
    };
    let path = e.path().to_string();
    let inner = e.into_inner();
    let text = inner.to_string();
    let message = if inner.is_data()
        && (text.starts_with("unknown field") || text.starts_with("missing field"))
    {
        // Field names only: safe to repeat.
        text.split(" at line")
            .next()
            .unwrap_or_default()
            .to_string()
    } else if inner.is_data() {
        "has the wrong type".to_string()
    } else {
        format!(
            "the request body is not valid JSON (line {}, column {})",
            inner.line(),
            inner.column()
        )
    };
    let field = (path != ".").then_some(path);
    Err(error(
        StatusCode::BAD_REQUEST,
        "bad_request",
        &message,
        field.as_deref(),
        None,
    ))
}

fn lifecycle_error(e: LifecycleError) -> Response<ProxyBody> {
    let message = e.to_string();
    match e {
        LifecycleError::BadId(_) => error(
            StatusCode::BAD_REQUEST,
            "bad_connection_id",
            &message,
            Some("id"),
            None,
        ),
        LifecycleError::Invalid(f) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            &f.message,
            Some(&f.field),
            None,
        ),
        LifecycleError::NotFound(_) => error(
            StatusCode::NOT_FOUND,
            "connection_not_found",
            &message,
            None,
            None,
        ),
        LifecycleError::Exists(_) => error(
            StatusCode::CONFLICT,
            "connection_exists",
            &message,
            Some("id"),
            None,
        ),
        LifecycleError::Conflict(_) => {
            error(StatusCode::CONFLICT, "conflict", &message, None, None)
        }
        LifecycleError::VerificationFailed(v, field) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "verification_failed",
            &message,
            Some(&field),
            Some(v.to_json()),
        ),
        LifecycleError::Vault(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "secret_store_unavailable",
            &message,
            None,
            None,
        ),
    }
}

fn error(
    status: StatusCode,
    code: &'static str,
    message: &str,
    field: Option<&str>,
    verification: Option<Value>,
) -> Response<ProxyBody> {
    let mut inner = json!({ "code": code, "message": message });
    if let Some(f) = field {
        inner["field"] = json!(f);
    }
    if let Some(v) = verification {
        inner["verification"] = v;
    }
    let mut r = json_response(status, &json!({ "error": inner }));
    if let Ok(v) = http::HeaderValue::try_from(code) {
        r.headers_mut()
            .insert(crate::proxy::error::LATCHKEY_ERROR, v);
    }
    r
}
