//! Every answer latchkey makes up itself, proxy and admin alike: each error mapped to a status
//! and a `Latchkey-Error` code in this one place, and the JSON bodies of the admin API.
//!
//! Every error response carries the header `Latchkey-Error: {code}` and the body
//! `{"error":{"code":...,"message":...}}` (the admin API adds the `field` at fault and a
//! `verification`), so a workflow can tell latchkey's answers from the upstream's own. Messages
//! are built from latchkey's own data (IDs, host names, field names); none can hold a
//! credential.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

use crate::body::{self, BoxBody};
use crate::cache::CacheError;
use crate::connection::ConnectionError;
use crate::destination::Blocked;
use crate::lifecycle::LifecycleError;
use crate::upstream::{DialError, H1Error, SendError};

pub const LATCHKEY_ERROR: &str = "latchkey-error";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadConnectionId(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    ProxyAuthRequired(&'static str),
    #[error("client {client:?} may not use connection {connection:?}")]
    ConnectionForbidden { client: String, connection: String },
    #[error(
        "{host} is not one of the hosts of connection {connection:?} (it may reach: {allowed})"
    )]
    HostNotAllowed {
        host: String,
        connection: String,
        allowed: String,
    },
    /// No connection granted to the client covers a destination that no request named a
    /// connection for.
    #[error("{0}")]
    NotCovered(String),
    #[error("{0}")]
    HostMismatch(String),
    #[error("{0}")]
    ConnectionAmbiguous(String),
    #[error("the destination is blocked: {0}")]
    DestinationBlocked(Blocked),
    #[error("connection {0:?} does not exist")]
    ConnectionNotFound(String),
    #[error("connection {connection:?} cannot be used: {error}")]
    ConnectionInvalid {
        connection: String,
        error: ConnectionError,
    },
    #[error("client {client:?} asked for too many connections that do not exist; until its limit (cache.miss_rate) refills, only connections latchkey has cached are served")]
    TooManyMisses { client: String, retry_after: u64 },
    #[error("the secret store is unavailable and connection {0:?} is not cached, or its cached copy is older than cache.max_stale allows")]
    SecretStoreUnavailable(String),
    #[error("the secret store is unavailable, so which connection covers {0} is not known")]
    CannotChoose(String),
    #[error("{0}")]
    UpstreamUnreachable(String),
    #[error("{0}")]
    UpstreamTls(String),
    #[error("{0}")]
    UpstreamTimeout(String),
    /// The client stopped sending its request body part-way.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("CONNECT (the tunnel form) needs latchkey's CA: make it with `latchkey ca init` (stored in Vault; restart latchkey) or set tls.ca_cert and tls.ca_key to files that `latchkey ca init --cert FILE --key FILE` makes")]
    ConnectUnsupported,
    #[error("a CONNECT inside a tunnel is not served: open each tunnel to latchkey itself")]
    ConnectInsideTunnel,
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadConnectionId(_) | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ProxyAuthRequired(_) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::ConnectionForbidden { .. }
            | ProxyError::HostNotAllowed { .. }
            | ProxyError::NotCovered(_)
            | ProxyError::DestinationBlocked(_) => StatusCode::FORBIDDEN,
            ProxyError::HostMismatch(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::ConnectionAmbiguous(_) => StatusCode::BAD_REQUEST,
            ProxyError::ConnectionNotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::TooManyMisses { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::ConnectionInvalid { .. } | ProxyError::Internal => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ProxyError::SecretStoreUnavailable(_) | ProxyError::CannotChoose(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamTls(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ConnectUnsupported | ProxyError::ConnectInsideTunnel => {
                StatusCode::METHOD_NOT_ALLOWED
            }
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadConnectionId(_) => "bad_connection_id",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::ProxyAuthRequired(_) => "proxy_auth_required",
            ProxyError::ConnectionForbidden { .. } => "connection_forbidden",
            ProxyError::HostNotAllowed { .. } | ProxyError::NotCovered(_) => "host_not_allowed",
            ProxyError::DestinationBlocked(_) => "destination_blocked",
            ProxyError::HostMismatch(_) => "host_mismatch",
            ProxyError::ConnectionAmbiguous(_) => "connection_ambiguous",
            ProxyError::ConnectionNotFound(_) => "connection_not_found",
            ProxyError::TooManyMisses { .. } => "too_many_misses",
            ProxyError::ConnectionInvalid { .. } => "connection_invalid",
            ProxyError::SecretStoreUnavailable(_) | ProxyError::CannotChoose(_) => {
                "secret_store_unavailable"
            }
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamTls(_) => "upstream_tls",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::RequestTimeout(_) => "request_timeout",
            ProxyError::ConnectUnsupported | ProxyError::ConnectInsideTunnel => {
                "method_not_allowed"
            }
            ProxyError::Internal => "internal",
        }
    }

    /// Maps a cache failure for `connection`.
    pub fn from_cache(connection: &str, e: CacheError) -> ProxyError {
        match e {
            CacheError::NotFound => ProxyError::ConnectionNotFound(connection.to_string()),
            CacheError::Invalid(error) => ProxyError::ConnectionInvalid {
                connection: connection.to_string(),
                error,
            },
            CacheError::Unavailable(_) => {
                ProxyError::SecretStoreUnavailable(connection.to_string())
            }
            CacheError::Internal => ProxyError::Internal,
        }
    }

    /// Maps a failure to reach or hear from the upstream.
    pub fn from_upstream(e: &SendError) -> ProxyError {
        match e {
            SendError::Dial(DialError::Blocked(b)) => ProxyError::DestinationBlocked(*b),
            SendError::Dial(d @ DialError::Tls { .. }) => ProxyError::UpstreamTls(d.to_string()),
            SendError::Dial(d @ DialError::Timeout(_)) => {
                ProxyError::UpstreamTimeout(d.to_string())
            }
            SendError::Dial(d) => ProxyError::UpstreamUnreachable(d.to_string()),
            // The client's own body was not valid HTTP (a chunk size that overflows, a body
            // cut short): the client's error, said once.
            SendError::H1(H1Error::RequestBody(e)) => {
                ProxyError::BadRequest(format!("the request body could not be read: {e}"))
            }
            SendError::H1(e @ H1Error::RequestLength(_)) => ProxyError::BadRequest(e.to_string()),
            // A request body the client stopped sending: the client's delay, not the
            // upstream's (RFC 9110 section 15.5.9).
            SendError::H1(e @ H1Error::ClientStalled(_)) => {
                ProxyError::RequestTimeout(e.to_string())
            }
            SendError::H1(e @ H1Error::UpstreamStalled(_)) => {
                ProxyError::UpstreamTimeout(e.to_string())
            }
            e if e.is_timeout() => ProxyError::UpstreamTimeout(e.to_string()),
            other => ProxyError::UpstreamUnreachable(other.describe()),
        }
    }

    pub fn into_response(self) -> Response<BoxBody> {
        let mut response = error_response(self.status(), self.code(), &self.to_string());
        if let ProxyError::TooManyMisses { retry_after, .. } = self {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        response
    }
}

/// An answer of the admin API that is not a success: status, code, message, and where one field
/// is at fault, its name (and for a failed verification, what it found).
#[derive(Debug)]
pub struct AdminError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub verification: Option<Value>,
}

impl AdminError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> AdminError {
        AdminError {
            status,
            code,
            message: message.into(),
            field: None,
            verification: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 408: a request body that did not come in time (`proxy.body_timeout`, `gap`: between
    /// pieces of the API's JSON, for the whole of the small sign-in form).
    pub fn stalled(gap: std::time::Duration) -> AdminError {
        AdminError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not come in time (proxy.body_timeout, {gap:?})"),
        )
    }

    pub fn not_found() -> AdminError {
        AdminError::new(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint")
    }

    /// 405, with the methods the endpoint takes in `Allow` (RFC 9110 section 15.5.6).
    pub fn not_allowed(allow: &'static str) -> Response<BoxBody> {
        let mut r = AdminError::method_not_allowed().into_response();
        r.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
        r
    }

    pub fn method_not_allowed() -> AdminError {
        AdminError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not take that method",
        )
    }

    pub fn field(mut self, field: impl Into<String>) -> AdminError {
        self.field = Some(field.into());
        self
    }

    pub fn into_response(self) -> Response<BoxBody> {
        let mut inner = json!({ "code": self.code, "message": self.message });
        if let Some(f) = self.field {
            inner["field"] = json!(f);
        }
        if let Some(v) = self.verification {
            inner["verification"] = v;
        }
        let mut r = error_json(self.status, self.code, &inner);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"latchkey-admin\""),
            );
        }
        r
    }
}

impl From<LifecycleError> for AdminError {
    fn from(e: LifecycleError) -> AdminError {
        let message = e.to_string();
        match e {
            LifecycleError::BadId(_) => {
                AdminError::new(StatusCode::BAD_REQUEST, "bad_connection_id", message).field("id")
            }
            LifecycleError::Invalid(f) => {
                AdminError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", f.message)
                    .field(f.field)
            }
            LifecycleError::NotFound(_) => {
                AdminError::new(StatusCode::NOT_FOUND, "connection_not_found", message)
            }
            LifecycleError::Exists(_) => {
                AdminError::new(StatusCode::CONFLICT, "connection_exists", message).field("id")
            }
            LifecycleError::Conflict(_) => {
                AdminError::new(StatusCode::CONFLICT, "conflict", message)
            }
            LifecycleError::VerificationFailed(v, field) => AdminError {
                verification: Some(v.to_json()),
                ..AdminError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "verification_failed",
                    message,
                )
                .field(field)
            },
            LifecycleError::Vault(_) => AdminError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "secret_store_unavailable",
                message,
            ),
        }
    }
}

/// A JSON error response with the `Latchkey-Error` header.
pub fn error_response(status: StatusCode, code: &'static str, message: &str) -> Response<BoxBody> {
    error_json(status, code, &json!({ "code": code, "message": message }))
}

/// The one builder of error responses: `{"error": inner}`, `Latchkey-Error: {code}`, and the
/// challenge a 407 needs.
fn error_json(status: StatusCode, code: &'static str, inner: &Value) -> Response<BoxBody> {
    let mut response = json_response(status, &json!({ "error": inner }));
    let headers = response.headers_mut();
    headers.insert(LATCHKEY_ERROR, HeaderValue::from_static(code));
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        headers.insert(
            http::header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"latchkey\""),
        );
    }
    response
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &Value) -> Response<BoxBody> {
    let mut r = Response::new(body::full(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// An empty 204.
pub fn no_content() -> Response<BoxBody> {
    let mut r = Response::new(body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}
