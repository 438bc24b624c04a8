//! The verification call: one request to the service with the connection's credential, through
//! latchkey's own upstream client (so the destination checks apply), and what its answer means.
//!
//! The outcomes tell apart what the reference's pitfalls tell apart: a key the service rejects
//! (401), a key that lacks a scope (403), a wrong base URL (404 on the verify path), a service
//! that cannot be reached or is too slow, and each comes with what to check.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};

use crate::body;
use crate::catalog::Verify as VerifySpec;
use crate::connection::Connection;
use crate::inject::{self, Target};
use crate::upstream::{DialError, Pool, ResponseBody, SendError, Tenant};

/// What a verification found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The service accepted the key.
    Verified,
    /// The connector has no verification call; nothing was checked.
    NotVerifiable,
    /// 401, or the service's own "invalid key" answer.
    KeyRejected,
    /// 403, or the service's own "missing scope" answer.
    InsufficientScope,
    /// 404 on the verification path: the base URL is wrong.
    WrongBaseUrl,
    /// DNS, connect or TLS failure, or a blocked destination.
    Unreachable,
    Timeout,
    /// Anything else.
    UnexpectedAnswer,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Verified => "verified",
            Outcome::NotVerifiable => "not_verifiable",
            Outcome::KeyRejected => "key_rejected",
            Outcome::InsufficientScope => "insufficient_scope",
            Outcome::WrongBaseUrl => "wrong_base_url",
            Outcome::Unreachable => "unreachable",
            Outcome::Timeout => "timeout",
            Outcome::UnexpectedAnswer => "unexpected_answer",
        }
    }
}

/// The verification's result, as the API shows it.
#[derive(Debug, Clone)]
pub struct Verification {
    pub outcome: Outcome,
    pub http_status: Option<u16>,
    pub message: String,
    pub hint: Option<String>,
}

impl Verification {
    /// Whether the key may be saved (or kept) on this result.
    pub fn passed(&self) -> bool {
        matches!(self.outcome, Outcome::Verified | Outcome::NotVerifiable)
    }

    /// The `status` recorded for the connection.
    pub fn status(&self) -> &'static str {
        match self.outcome {
            Outcome::Verified => "active",
            Outcome::NotVerifiable => "unverified",
            _ => "failed",
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "outcome": self.outcome.as_str(),
            "passed": self.passed(),
            "http_status": self.http_status,
            "message": self.message,
            "hint": self.hint,
        })
    }
}

/// Largest response body read when the answer must be parsed (services that say "ok": false).
const MAX_BODY: usize = 64 * 1024;

/// Runs the connector's verification call for `conn`.
pub async fn verify(conn: &Connection, client: &Arc<Pool>, timeout: Duration) -> Verification {
    let connector = &conn.connector;
    let Some(spec) = &connector.verify else {
        return Verification {
            outcome: Outcome::NotVerifiable,
            http_status: None,
            message: format!(
                "{} has no verification call; the connection is saved unverified",
                connector.name
            ),
            hint: None,
        };
    };
    let mut path = String::new();
    if let Err(field) = spec
        .path
        .render(&mut path, |f| conn.fields.get(f).map(String::as_str))
    {
        return unexpected(format!("the verification path needs the field {field}"));
    }
    let what = format!("{} {}{}", spec.method, conn.base, path);
    let response = match call(conn, spec, &path, &what, client, timeout).await {
        Ok(r) => r,
        Err(v) => return v,
    };
    judge(conn, spec, &what, response).await
}

/// Sends the verification request, as the proxy would send a workflow's (strip, then inject).
async fn call(
    conn: &Connection,
    spec: &VerifySpec,
    path: &str,
    what: &str,
    client: &Arc<Pool>,
    timeout: Duration,
) -> Result<Response<ResponseBody>, Verification> {
    let (mut parts, ()) = Request::builder()
        .method(spec.method.clone())
        .uri("/")
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "latchkey-verify")
        .body(())
        .map(Request::into_parts)
        .unwrap_or_else(|_| Request::new(()).into_parts());
    let target = Target {
        scheme: conn.base.scheme,
        authority: &conn.base.authority,
        path_prefix: &conn.base.path,
    };
    if inject::rewrite(&mut parts, path, target, &conn.credential, &conn.connector).is_err() {
        return Err(unexpected(format!(
            "the verification URL for {what} is not valid"
        )));
    }
    let request = Request::from_parts(parts, body::empty());
    let tenant = Tenant::new(conn.id.shared(), conn.version);
    match client.send(request, tenant, timeout).await {
        Err(e) if e.is_timeout() => Err(Verification {
            outcome: Outcome::Timeout,
            http_status: None,
            message: format!("{what} did not answer within {timeout:?}"),
            hint: Some("Check the base URL, and retry: the service may be slow or down.".into()),
        }),
        Err(e) => Err(unreachable(what, &e)),
        Ok(r) => Ok(r),
    }
}

/// What the service's answer says of the key: accepted, rejected (401), lacking scope (403),
/// a wrong base URL (404), or something unexpected.
async fn judge(
    conn: &Connection,
    spec: &VerifySpec,
    what: &str,
    response: Response<ResponseBody>,
) -> Verification {
    let connector = &conn.connector;
    let status = response.status();
    let scopes = connector.scopes.clone().unwrap_or_else(|| {
        "Issue a key with the permissions your workflows need, or widen this one.".into()
    });
    let env_hint = format!(
        "Check for a character lost or added in the paste, that the key was not revoked or has not expired, and that it is a{} key for {}.",
        conn.environment
            .as_deref()
            .map(|e| format!(" {e}"))
            .unwrap_or_default(),
        conn.base
    );
    match status {
        StatusCode::UNAUTHORIZED => Verification {
            outcome: Outcome::KeyRejected,
            http_status: Some(401),
            message: format!("{} rejected the key (401 from {what})", connector.name),
            hint: Some(env_hint),
        },
        StatusCode::FORBIDDEN => Verification {
            outcome: Outcome::InsufficientScope,
            http_status: Some(403),
            message: format!(
                "the key was accepted but lacks the scope or permission for {what} (403)"
            ),
            hint: Some(scopes),
        },
        StatusCode::NOT_FOUND => Verification {
            outcome: Outcome::WrongBaseUrl,
            http_status: Some(404),
            message: format!("{what} answered 404: the base URL looks wrong"),
            hint: Some(
                "Check the base URL: sandbox or production host, region or data center, store or account name."
                    .into(),
            ),
        },
        s if s.is_success() => match &spec.json_ok_field {
            None => Verification {
                outcome: Outcome::Verified,
                http_status: Some(s.as_u16()),
                message: format!("{} accepted the key", connector.name),
                hint: None,
            },
            Some(ok_field) => {
                let body = Limited::new(response.into_body(), MAX_BODY).collect().await;
                let json: Value = body
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b.to_bytes()).ok())
                    .unwrap_or(Value::Null);
                json_verdict(&json, ok_field, what, conn, s.as_u16(), env_hint, scopes)
            }
        },
        s => Verification {
            outcome: Outcome::UnexpectedAnswer,
            http_status: Some(s.as_u16()),
            message: format!("{what} answered {s}"),
            hint: s
                .is_server_error()
                .then(|| "The service had an error; retry later.".to_string()),
        },
    }
}

/// For services that answer 200 with `{"ok": false, "error": "..."}`.
fn json_verdict(
    json: &Value,
    ok_field: &str,
    what: &str,
    conn: &Connection,
    status: u16,
    env_hint: String,
    scopes: String,
) -> Verification {
    let service = conn.connector.name.as_str();
    if json[ok_field] == Value::Bool(true) {
        return Verification {
            outcome: Outcome::Verified,
            http_status: Some(status),
            message: format!("{service} accepted the key"),
            hint: None,
        };
    }
    // The service's error code is a short identifier of its own API (Slack's `invalid_auth`),
    // quoted in the admin API's answer. A service may put anything there, the key it was sent
    // included (which can look like a code): what holds or is a piece of any secret of the
    // connection is left out, and so is what does not look like a code.
    let code = json["error"]
        .as_str()
        .filter(|c| looks_like_error_code(c))
        .filter(|c| {
            conn.scrubber
                .as_ref()
                .is_none_or(|s| !s.quotes(c.as_bytes()))
        })
        .unwrap_or("unknown");
    let (outcome, hint) = match code {
        "invalid_auth" | "not_authed" | "token_revoked" | "token_expired" | "account_inactive" => {
            (Outcome::KeyRejected, env_hint)
        }
        "missing_scope" | "not_allowed_token_type" | "no_permission" => {
            (Outcome::InsufficientScope, scopes)
        }
        _ => (
            Outcome::UnexpectedAnswer,
            "See the service's documentation for this error.".to_string(),
        ),
    };
    let message = format!("{service} refused the key at {what}: {code}");
    Verification {
        outcome,
        http_status: Some(status),
        // Nothing else in it comes from the service; scrubbed all the same.
        message: match &conn.scrubber {
            Some(s) => s.text(&message).into_owned(),
            None => message,
        },
        hint: Some(hint),
    }
}

/// An error code as services write them: a letter, then letters, digits and `_`, in one case
/// (`invalid_auth`, `INVALID_API_KEY`), at most 64 bytes. A mixed-case run, as keys are, is not.
fn looks_like_error_code(c: &str) -> bool {
    let b = c.as_bytes();
    b.len() <= 64
        && b.first().is_some_and(u8::is_ascii_alphabetic)
        && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'_')
        && !(b.iter().any(u8::is_ascii_lowercase) && b.iter().any(u8::is_ascii_uppercase))
}

fn unexpected(message: String) -> Verification {
    Verification {
        outcome: Outcome::UnexpectedAnswer,
        http_status: None,
        message,
        hint: None,
    }
}

fn unreachable(what: &str, e: &SendError) -> Verification {
    let dial = match e {
        SendError::Dial(d) => Some(d),
        _ => None,
    };
    let (message, hint) = match dial {
        Some(DialError::Blocked(b)) => (
            format!("{what} cannot be called: {b}"),
            "A base URL on a private address needs proxy.allow_private_destinations.",
        ),
        Some(d @ DialError::Tls { .. }) => (
            format!("{what}: {d}"),
            "Check the base URL's scheme and host; a private CA goes in tls.extra_roots.",
        ),
        Some(DialError::Timeout(t)) => {
            return Verification {
                outcome: Outcome::Timeout,
                http_status: None,
                message: format!("{what}: connecting to {t} timed out"),
                hint: Some(
                    "Check the base URL, and retry: the service may be slow or down.".into(),
                ),
            }
        }
        Some(d) => (
            format!("{what}: {d}"),
            "Check the base URL's host, and that latchkey can reach it.",
        ),
        None => (
            format!("{what}: the connection failed"),
            "Check the base URL, and retry.",
        ),
    };
    Verification {
        outcome: Outcome::Unreachable,
        http_status: None,
        message,
        hint: Some(hint.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_told_from_keys() {
        for code in ["invalid_auth", "ratelimited", "INVALID_API_KEY", "err_403"] {
            assert!(looks_like_error_code(code), "{code}");
        }
        for key in [
            "",
            "0123456789abcdef0123456789abcdef",
            "_leading",
            "xoxbAbCdEf0123",
            "sk-live-1234",
            "invalid auth",
            &"a".repeat(65),
        ] {
            assert!(!looks_like_error_code(key), "{key}");
        }
    }
}
