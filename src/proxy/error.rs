//! Errors that latchkey itself answers with, mapped to a status and a `Latchkey-Error` code in
//! this one place.
//!
//! Every such response carries the header `Latchkey-Error: {code}` and the body
//! `{"error":{"code":...,"message":...}}`, so a workflow can tell latchkey's answers from the
//! upstream's own. Messages are built from latchkey's own data (IDs, host names, field names);
//! none can hold a credential.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::cache::CacheError;
use crate::connection::ConnectionError;
use crate::destination::Blocked;

use super::ProxyBody;

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
    #[error("the destination is blocked: {0}")]
    DestinationBlocked(Blocked),
    #[error("connection {0:?} does not exist")]
    ConnectionNotFound(String),
    #[error("connection {connection:?} cannot be used: {error}")]
    ConnectionInvalid {
        connection: String,
        error: ConnectionError,
    },
    #[error("the secret store is unavailable and connection {0:?} is not cached")]
    SecretStoreUnavailable(String),
    #[error("{0}")]
    UpstreamUnreachable(String),
    #[error("{0}")]
    UpstreamTls(String),
    #[error("{0}")]
    UpstreamTimeout(String),
    #[error("CONNECT (the tunnel form) is not supported yet; send absolute-form http:// requests through the proxy, or use the gateway form /{{connection_id}}/path")]
    ConnectUnsupported,
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
            | ProxyError::DestinationBlocked(_) => StatusCode::FORBIDDEN,
            ProxyError::ConnectionNotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::ConnectionInvalid { .. } | ProxyError::Internal => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ProxyError::SecretStoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamTls(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ConnectUnsupported => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadConnectionId(_) => "bad_connection_id",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::ProxyAuthRequired(_) => "proxy_auth_required",
            ProxyError::ConnectionForbidden { .. } => "connection_forbidden",
            ProxyError::HostNotAllowed { .. } => "host_not_allowed",
            ProxyError::DestinationBlocked(_) => "destination_blocked",
            ProxyError::ConnectionNotFound(_) => "connection_not_found",
            ProxyError::ConnectionInvalid { .. } => "connection_invalid",
            ProxyError::SecretStoreUnavailable(_) => "secret_store_unavailable",
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamTls(_) => "upstream_tls",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::ConnectUnsupported => "method_not_allowed",
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

    pub fn into_response(self) -> Response<ProxyBody> {
        error_response(self.status(), self.code(), &self.to_string())
    }
}

/// A JSON error response with the `Latchkey-Error` header; used by the admin API too.
pub fn error_response(
    status: StatusCode,
    code: &'static str,
    message: &str,
) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(LATCHKEY_ERROR, HeaderValue::from_static(code));
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        headers.insert(
            http::header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"latchkey\""),
        );
    }
    response
}
