//! `/v1/connections`: the HTTP side of the connection lifecycle. Parses JSON (never echoing a
//! value in an error), calls [`Lifecycle`], and maps its errors to statuses.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::body::BoxBody;
use crate::lifecycle::{Lifecycle, Saved};
use crate::response::{json_response, no_content, AdminError};

/// Largest request body the API reads.
const MAX_BODY: usize = 1024 * 1024;

/// Routes `rest`, the path after `/v1/connections`.
pub async fn handle(
    lifecycle: &Lifecycle,
    admin: &str,
    req: Request<Incoming>,
    rest: &str,
) -> Response<BoxBody> {
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
            Err(e) => return e.into_response(),
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
            Err(e) => return e.into_response(),
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
            Err(e) => return e.into_response(),
        },
        ([id, "verify"], &Method::POST) => lifecycle.verify(admin, id).await.map(|(c, v)| {
            (
                StatusCode::OK,
                json!({ "connection": c, "verification": v.to_json() }),
            )
        }),
        ([] | [_] | [_, "secret" | "verify"], _) => {
            return AdminError::method_not_allowed().into_response()
        }
        _ => return AdminError::not_found().into_response(),
    };
    match result {
        Ok((StatusCode::NO_CONTENT, _)) => no_content(),
        Ok((status, value)) => json_response(status, &value),
        Err(e) => AdminError::from(e).into_response(),
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
async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, AdminError> {
    let bytes: Bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(AdminError::bad_request(
                "the request body could not be read (at most 1 MiB of JSON)",
            ))
        }
    };
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let e = match parsed {
        Ok(v) => match de.end() {
            Ok(()) => return Ok(v),
            Err(e) => {
                return Err(AdminError::bad_request(format!(
                    "the request body is not valid JSON (line {}, column {})",
                    e.line(),
                    e.column()
                )))
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
    let e = AdminError::bad_request(message);
    Err(if path == "." { e } else { e.field(path) })
}
