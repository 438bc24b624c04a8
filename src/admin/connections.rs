//! `/v1/connections`: the HTTP side of the connection lifecycle. Parses JSON (never echoing a
//! value in an error), calls [`Lifecycle`], and maps its errors to statuses.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use zeroize::Zeroizing;

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
    (rest, gap): (&str, Duration),
) -> Response<BoxBody> {
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    let result = match (segments.as_slice(), &method) {
        ([], &Method::GET) => lifecycle
            .list()
            .await
            .map(|list| (StatusCode::OK, json!({ "connections": list }))),
        ([], &Method::POST) => match body(req, gap).await {
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
        ([id], &Method::PATCH) => match body(req, gap).await {
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
        ([id, "secret"], &Method::PUT) => match body(req, gap).await {
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
        ([], _) => return AdminError::not_allowed("GET, HEAD, POST"),
        ([_], _) => return AdminError::not_allowed("GET, HEAD, PATCH, DELETE"),
        ([_, "secret"], _) => return AdminError::not_allowed("PUT"),
        ([_, "verify"], _) => return AdminError::not_allowed("POST"),
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

/// Why a request body was not read.
enum Unread {
    /// It failed, or was larger than the limit.
    Failed,
    /// No byte of it came for the gap (`proxy.body_timeout`).
    Stalled,
}

/// Reads a request body into one buffer that is zeroized when dropped (it holds the keys of a
/// create or a rotation), growing it without leaving a plain copy behind; a body that fails, is
/// larger than `limit` or sends nothing for `gap` is not read. The frames hyper hands over
/// live in hyper's buffers, which latchkey cannot reach.
async fn read_body(
    mut body: Incoming,
    limit: usize,
    gap: Duration,
) -> Result<Zeroizing<Vec<u8>>, Unread> {
    let hint = usize::try_from(body.size_hint().lower()).unwrap_or(limit);
    let mut buf = Zeroizing::new(Vec::with_capacity(hint.min(limit)));
    loop {
        let frame = match tokio::time::timeout(gap, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => return Err(Unread::Stalled),
        };
        let Ok(data) = frame.map_err(|_| Unread::Failed)?.into_data() else {
            continue;
        };
        let needed = buf.len() + data.len();
        if needed > limit {
            return Err(Unread::Failed);
        }
        if needed > buf.capacity() {
            // A `Vec` that grows leaves its old allocation unzeroized: move to a new buffer by
            // hand, and let the old one be zeroized as it drops.
            let mut bigger = Zeroizing::new(Vec::with_capacity(
                needed.max(buf.capacity() * 2).min(limit),
            ));
            bigger.extend_from_slice(&buf);
            buf = bigger;
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf)
}

/// Reads and parses a JSON body. A parse error names where it went wrong and never quotes a
/// value (a misplaced key would otherwise be echoed back). The body is read into a zeroizing
/// buffer, and each secret field is parsed into a [`Secret`](crate::secret::Secret); a value
/// written with JSON escapes passes through serde_json's scratch buffer, which is freed when
/// parsing ends but not zeroized.
async fn body<T: DeserializeOwned>(req: Request<Incoming>, gap: Duration) -> Result<T, AdminError> {
    let bytes = match read_body(req.into_body(), MAX_BODY, gap).await {
        Ok(bytes) => bytes,
        Err(Unread::Failed) => {
            return Err(AdminError::bad_request(
                "the request body could not be read (at most 1 MiB of JSON)",
            ))
        }
        Err(Unread::Stalled) => return Err(AdminError::stalled(gap)),
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
        && (text.starts_with("unknown field")
            || text.starts_with("missing field")
            || text.starts_with("duplicate field"))
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
