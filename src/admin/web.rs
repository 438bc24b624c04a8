//! The web page on the admin listener: its files (built into the binary, nothing loaded from
//! elsewhere), the headers every admin answer carries, and the browser's sign-in.
//!
//! The admin token is typed once and exchanged (`POST /session`, a form) for a random session
//! ID in an `HttpOnly; SameSite=Strict` cookie, `Secure` with `admin.secure_cookie` (on by
//! default when the listener speaks TLS).
//! Sessions live in memory and expire; `DELETE /session` ends one. Every write made with the
//! cookie carries the session's CSRF token in `X-CSRF-Token`, compared in constant time. A
//! request with `Authorization` is judged by its bearer token alone, as before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::body::{self, BoxBody};
use crate::response::{json_response, no_content, AdminError};

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");

/// The cookie that carries the session ID.
pub const COOKIE: &str = "latchkey_session";
/// The header that carries the CSRF token on a write made with the cookie.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts from sign-in.
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Most sessions held at once; the oldest goes first when a sign-in would exceed it.
const MAX_SESSIONS: usize = 1024;
/// Largest sign-in body read.
const MAX_SIGN_IN_BODY: usize = 4096;
/// Failed sign-ins allowed per window, from everyone together; past them every sign-in is
/// answered 429 without looking at its token until the window is over, so that guessing an
/// admin token through the page is slow and a right guess cannot be told from a wrong one. The
/// bearer API is not affected.
const SIGN_IN_FAILURES: u32 = 10;
const SIGN_IN_WINDOW: Duration = Duration::from_secs(60);

/// The failed sign-ins of the current window.
struct Failures {
    since: Instant,
    count: u32,
}

impl Failures {
    /// How long sign-ins stay refused, if they are.
    fn blocked(&mut self, now: Instant) -> Option<Duration> {
        if now.duration_since(self.since) >= SIGN_IN_WINDOW {
            self.since = now;
            self.count = 0;
        }
        (self.count >= SIGN_IN_FAILURES)
            .then(|| SIGN_IN_WINDOW.saturating_sub(now.duration_since(self.since)))
    }

    fn failed(&mut self, now: Instant) {
        if self.blocked(now).is_none() {
            self.count += 1;
        }
    }
}

/// `default-src 'self'` and nothing inline: the page's script and style are files of its own.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// One of the page's files, if `path` names one.
pub fn asset(path: &str) -> Option<Response<BoxBody>> {
    let (text, kind) = match path {
        "/" | "/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/app.css" => (APP_CSS, "text/css; charset=utf-8"),
        // No icon: an empty answer rather than a 404 in the browser's console.
        "/favicon.ico" => return Some(no_content()),
        _ => return None,
    };
    let mut r = Response::new(body::full(Bytes::from_static(text.as_bytes())));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    Some(r)
}

/// The headers every admin answer carries: a strict CSP, no sniffing, no referrer, no framing,
/// and no caching (API answers name connections; the page's files are small).
pub fn secure_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

struct Session {
    /// The name of the admin token that signed in: what audit lines show.
    admin: String,
    csrf: String,
    expires: Instant,
    created: Instant,
}

/// What a request carrying a session cookie is.
pub enum CookieAuth {
    /// No session cookie at all.
    None,
    /// A valid session, and for a write a matching CSRF token: the admin token's name.
    Admin(String),
    /// A cookie naming no live session.
    Expired,
    /// A write without the session's CSRF token.
    NoCsrf,
}

/// The browser sessions, in memory, keyed by the SHA-256 of their ID.
pub struct Sessions {
    by_id: Mutex<HashMap<[u8; 32], Session>>,
    rng: SystemRandom,
    /// Whether the cookie is `Secure` (`admin.secure_cookie`).
    secure: bool,
    /// `proxy.body_timeout`: a sign-in form not whole this long is answered `408`.
    body_timeout: Duration,
    failures: Mutex<Failures>,
}

impl Sessions {
    pub fn new(secure: bool, body_timeout: Duration) -> Sessions {
        Sessions {
            by_id: Mutex::new(HashMap::new()),
            rng: SystemRandom::new(),
            secure,
            body_timeout,
            failures: Mutex::new(Failures {
                since: Instant::now(),
                count: 0,
            }),
        }
    }

    fn random(&self) -> Option<String> {
        let mut bytes = [0u8; 32];
        self.rng.fill(&mut bytes).ok()?;
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session for the admin token named `admin`: its ID and CSRF token.
    fn open(&self, admin: &str) -> Option<(String, String)> {
        let id = self.random()?;
        let csrf = self.random()?;
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        while map.len() >= MAX_SESSIONS {
            let Some(oldest) = map.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| *k) else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(
            key(&id),
            Session {
                admin: admin.to_string(),
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
                created: now,
            },
        );
        Some((id, csrf))
    }

    /// Judges the session cookie of `req`; `write` asks for the CSRF token too.
    pub fn check(&self, headers: &HeaderMap, write: bool) -> CookieAuth {
        let Some(id) = session_cookie(headers) else {
            return CookieAuth::None;
        };
        let now = Instant::now();
        let mut map = self.lock();
        let k = key(&id);
        let Some(s) = map.get(&k) else {
            return CookieAuth::Expired;
        };
        if s.expires <= now {
            map.remove(&k);
            return CookieAuth::Expired;
        }
        if write {
            let sent = headers
                .get(CSRF_HEADER)
                .map(HeaderValue::as_bytes)
                .unwrap_or_default();
            if !bool::from(sent.ct_eq(s.csrf.as_bytes())) {
                return CookieAuth::NoCsrf;
            }
        }
        CookieAuth::Admin(s.admin.clone())
    }

    /// `/session`: `POST` signs in with a form's `token`, `GET` tells the page who is signed in
    /// (and its CSRF token), `DELETE` signs out.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        find: impl Fn(&str) -> Option<String>,
    ) -> Response<BoxBody> {
        match *req.method() {
            Method::POST => self.sign_in(req, find).await,
            // Not signed in is an answer here, not an error: the page asks on every load.
            Method::GET => {
                let not_signed_in = || json_response(StatusCode::OK, &json!({"signed_in": false}));
                let Some(id) = session_cookie(req.headers()) else {
                    return not_signed_in();
                };
                let now = Instant::now();
                let map = self.lock();
                match map.get(&key(&id)) {
                    Some(s) if s.expires > now => json_response(
                        StatusCode::OK,
                        &json!({
                            "signed_in": true,
                            "admin": s.admin,
                            "csrf": s.csrf,
                            "expires_in_seconds": (s.expires - now).as_secs(),
                        }),
                    ),
                    _ => not_signed_in(),
                }
            }
            Method::DELETE => match self.check(req.headers(), true) {
                CookieAuth::Admin(_) => {
                    if let Some(id) = session_cookie(req.headers()) {
                        self.lock().remove(&key(&id));
                    }
                    let mut r = no_content();
                    r.headers_mut()
                        .insert(header::SET_COOKIE, self.cookie("", 0));
                    r
                }
                CookieAuth::NoCsrf => csrf_refused(),
                CookieAuth::None | CookieAuth::Expired => signed_out(),
            },
            _ => AdminError::not_allowed("GET, HEAD, POST, DELETE"),
        }
    }

    async fn sign_in(
        &self,
        req: Request<Incoming>,
        find: impl Fn(&str) -> Option<String>,
    ) -> Response<BoxBody> {
        // A sign-in posted by another site's form is refused: the page posts from its own origin.
        if !same_origin(req.headers(), req.uri().authority()) {
            return AdminError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "sign in from latchkey's own page",
            )
            .into_response();
        }
        let form_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';').next().is_some_and(|m| {
                    m.trim()
                        .eq_ignore_ascii_case("application/x-www-form-urlencoded")
                })
            });
        if !form_type {
            return AdminError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "sign in with a form (application/x-www-form-urlencoded) holding token",
            )
            .into_response();
        }
        if req
            .body()
            .size_hint()
            .upper()
            .is_some_and(|n| n > MAX_SIGN_IN_BODY as u64)
        {
            return too_large();
        }
        let limited = http_body_util::Limited::new(req.into_body(), MAX_SIGN_IN_BODY);
        // The form is small: all of it is due within the body timeout.
        let bytes = match tokio::time::timeout(self.body_timeout, limited.collect()).await {
            Ok(Ok(b)) => Zeroizing::new(b.to_bytes().to_vec()),
            Ok(Err(_)) => return too_large(),
            Err(_) => return AdminError::stalled(self.body_timeout).into_response(),
        };
        let token = url::form_urlencoded::parse(&bytes)
            .find(|(k, _)| k == "token")
            .map(|(_, v)| Zeroizing::new(v.into_owned()));
        let failures = || self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(wait) = failures().blocked(Instant::now()) {
            let mut r = AdminError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sign_ins",
                format!(
                    "{SIGN_IN_FAILURES} failed sign-ins within {}s: sign-in is refused for {}s more",
                    SIGN_IN_WINDOW.as_secs(),
                    wait.as_secs().max(1)
                ),
            )
            .into_response();
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(wait.as_secs().max(1)),
            );
            return r;
        }
        let Some(admin) = token.as_deref().and_then(|t| find(t.trim())) else {
            failures().failed(Instant::now());
            tracing::warn!(target: "latchkey::audit", action = "sign_in", outcome = "refused", "a sign-in to the web page with a token that is not an admin token");
            return AdminError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "that is not an admin token",
            )
            .into_response();
        };
        let Some((id, csrf)) = self.open(&admin) else {
            return AdminError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no_randomness",
                "the system's random number generator failed",
            )
            .into_response();
        };
        tracing::info!(target: "latchkey::audit", admin = %admin, action = "sign_in", "admin signed in to the web page");
        let mut r = json_response(
            StatusCode::OK,
            &json!({
                "signed_in": true,
                "admin": admin,
                "csrf": csrf,
                "expires_in_seconds": SESSION_TTL.as_secs(),
            }),
        );
        r.headers_mut()
            .insert(header::SET_COOKIE, self.cookie(&id, SESSION_TTL.as_secs()));
        r
    }

    fn cookie(&self, id: &str, max_age: u64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("latchkey_session=; Max-Age=0"))
    }
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// The value of the session cookie, from any `Cookie` header.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == COOKIE && !v.is_empty())
        .map(|(_, v)| v.to_string())
}

/// False when an `Origin` header names another origin than the host the request went to: its
/// `Host` header, or over HTTP/2 (which has none) its `:authority`, `authority` here.
pub fn same_origin(headers: &HeaderMap, authority: Option<&http::uri::Authority>) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = match headers.get(header::HOST) {
        Some(h) => h.to_str().ok(),
        None => authority.map(http::uri::Authority::as_str),
    };
    let (Ok(origin), Some(host)) = (origin.to_str(), host) else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

fn signed_out() -> Response<BoxBody> {
    AdminError::new(StatusCode::UNAUTHORIZED, "signed_out", "not signed in").into_response()
}

pub fn csrf_refused() -> Response<BoxBody> {
    AdminError::new(
        StatusCode::FORBIDDEN,
        "csrf",
        "a write made with the session cookie needs the session's X-CSRF-Token",
    )
    .into_response()
}

fn too_large() -> Response<BoxBody> {
    AdminError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        "the sign-in form is too large",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn a_write_needs_the_sessions_own_csrf_token() {
        let s = Sessions::new(false, Duration::from_secs(60));
        let (id, csrf) = s.open("ops").unwrap();
        let mut h = with_cookie(&format!("other=1; {COOKIE}={id}"));
        assert!(matches!(s.check(&h, false), CookieAuth::Admin(a) if a == "ops"));
        assert!(matches!(s.check(&h, true), CookieAuth::NoCsrf));
        h.insert(CSRF_HEADER, HeaderValue::from_static("wrong"));
        assert!(matches!(s.check(&h, true), CookieAuth::NoCsrf));
        let (_, other_csrf) = s.open("ops").unwrap();
        h.insert(CSRF_HEADER, HeaderValue::from_str(&other_csrf).unwrap());
        assert!(matches!(s.check(&h, true), CookieAuth::NoCsrf));
        h.insert(CSRF_HEADER, HeaderValue::from_str(&csrf).unwrap());
        assert!(matches!(s.check(&h, true), CookieAuth::Admin(a) if a == "ops"));
    }

    #[test]
    fn an_unknown_or_missing_cookie_is_no_session() {
        let s = Sessions::new(false, Duration::from_secs(60));
        assert!(matches!(
            s.check(&HeaderMap::new(), false),
            CookieAuth::None
        ));
        let h = with_cookie(&format!("{COOKIE}=made-up"));
        assert!(matches!(s.check(&h, false), CookieAuth::Expired));
    }

    #[test]
    fn the_cookie_is_httponly_strict_and_secure_only_with_tls() {
        let plain = Sessions::new(false, Duration::from_secs(60)).cookie("abc", 60);
        assert_eq!(
            plain.to_str().unwrap(),
            "latchkey_session=abc; HttpOnly; SameSite=Strict; Path=/; Max-Age=60"
        );
        let tls = Sessions::new(true, Duration::from_secs(60)).cookie("abc", 60);
        assert!(tls.to_str().unwrap().ends_with("; Secure"));
    }

    #[test]
    fn failed_sign_ins_close_the_door_until_the_window_is_over() {
        let t0 = Instant::now();
        let mut f = Failures {
            since: t0,
            count: 0,
        };
        for _ in 0..SIGN_IN_FAILURES {
            assert_eq!(f.blocked(t0), None);
            f.failed(t0);
        }
        let later = t0 + Duration::from_secs(20);
        assert_eq!(
            f.blocked(later),
            Some(SIGN_IN_WINDOW - Duration::from_secs(20))
        );
        // Failures while refused do not push the window further.
        f.failed(later);
        assert_eq!(f.count, SIGN_IN_FAILURES);
        assert_eq!(f.blocked(t0 + SIGN_IN_WINDOW), None);
        assert_eq!(f.count, 0);
    }

    #[test]
    fn sessions_are_bounded() {
        let s = Sessions::new(false, Duration::from_secs(60));
        for _ in 0..MAX_SESSIONS + 10 {
            s.open("ops").unwrap();
        }
        assert_eq!(s.lock().len(), MAX_SESSIONS);
    }

    #[test]
    fn another_origin_is_told_apart_from_ours() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9090"));
        assert!(same_origin(&h, None));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9090"),
        );
        assert!(same_origin(&h, None));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.test"),
        );
        assert!(!same_origin(&h, None));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h, None));
    }

    #[test]
    fn over_http2_the_origin_is_compared_with_the_authority() {
        let ours = http::uri::Authority::from_static("127.0.0.1:9443");
        let mut h = HeaderMap::new();
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://127.0.0.1:9443"),
        );
        assert!(same_origin(&h, Some(&ours)));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.test"),
        );
        assert!(!same_origin(&h, Some(&ours)));
        // Neither a Host header nor an authority: nothing to compare with, refused.
        assert!(!same_origin(&h, None));
        // A Host header, when there is one, is what counts.
        h.insert(header::HOST, HeaderValue::from_static("evil.test"));
        assert!(same_origin(&h, Some(&ours)));
    }
}
