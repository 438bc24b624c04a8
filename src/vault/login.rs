//! Logging in to Vault and the timing of a token's life: the login calls of the methods other
//! than `token` (AppRole, JWT, Kubernetes), the unwrapping of a response-wrapped secret ID, the
//! reading of credential files, and when to renew, log in again or retry.
//!
//! The calls are vaultrs's own; what they return is turned at once into a [`Secret`] token and
//! a [`Lease`], and nothing vaultrs returns (its `AuthInfo` holds the token) is kept or
//! formatted. The timing is pure and unit-tested: the `vault` module runs it.
//!
//! A token is renewed at about two thirds of its TTL, with jitter, so that replicas that started
//! together do not renew together. A renewal that comes back shorter than the token's first TTL
//! has met the max TTL: renewing cannot keep the token alive for long, so latchkey logs in again
//! there and then, with at least a third of a TTL to spare.

use std::path::Path;
use std::time::Duration;

use vaultrs::api::AuthInfo;
use vaultrs::client::VaultClient;
use vaultrs::error::ClientError;

use crate::secret::Secret;

/// What Vault said of a token when it granted or renewed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The TTL as of the last grant or renewal; zero for a token that never expires.
    pub ttl: Duration,
    /// The TTL a renewal gives while the max TTL is far.
    pub full_ttl: Duration,
    pub renewable: bool,
    /// Whether the last renewal gave less than `full_ttl`: the max TTL nears.
    pub capped: bool,
}

impl Lease {
    /// A token's first lease, from its login.
    pub fn new(ttl: Duration, renewable: bool) -> Lease {
        Lease {
            ttl,
            full_ttl: ttl,
            renewable,
            capped: false,
        }
    }

    /// The lease after a renewal that gave `ttl`.
    pub fn renewed(self, ttl: Duration, renewable: bool) -> Lease {
        Lease {
            ttl,
            full_ttl: self.full_ttl,
            renewable,
            capped: ttl < self.full_ttl,
        }
    }
}

/// What to do when a token's time comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Renew it: a renewal can still give it a full TTL.
    Renew,
    /// Log in again, for the reason given.
    Login(Reason),
    /// Nothing can be done: a token that never expires, or a static token that can no longer
    /// be renewed (it lives until it expires; a token file is re-read when Vault refuses it).
    Wait,
}

/// Why latchkey logs in (as the log line says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No token yet.
    Start,
    /// Vault refused the token in use.
    Denied,
    /// The token's max TTL nears: renewals no longer give it a full TTL.
    MaxTtl,
    /// The token is not renewable.
    NotRenewable,
    /// A renewal failed.
    RenewalFailed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Start => "start",
            Reason::Denied => "token_refused",
            Reason::MaxTtl => "max_ttl",
            Reason::NotRenewable => "not_renewable",
            Reason::RenewalFailed => "renewal_failed",
        }
    }
}

/// The step for a token whose renewal time has come; `can_login` is false for a static token.
pub fn step(lease: &Lease, can_login: bool) -> Step {
    if lease.ttl.is_zero() {
        return Step::Wait;
    }
    match (lease.renewable, lease.capped, can_login) {
        (true, false, _) => Step::Renew,
        (_, true, true) => Step::Login(Reason::MaxTtl),
        (false, false, true) => Step::Login(Reason::NotRenewable),
        (_, _, false) => Step::Wait,
    }
}

/// How long after a grant to take the next step: about two thirds of `ttl`, between 7/12 and
/// 3/4 of it as `unit` (uniform in `[0, 1)`) goes. `None` for a token that never expires.
pub fn renew_after(ttl: Duration, unit: f64) -> Option<Duration> {
    if ttl.is_zero() {
        return None;
    }
    Some(ttl.mul_f64(7.0 / 12.0 + unit.clamp(0.0, 1.0) / 6.0))
}

/// How long after the lease was granted to take [`step`]: about two thirds of the TTL, but at
/// once when renewals no longer give a full TTL and latchkey can log in (the token then has at
/// least a quarter of a TTL left: the renewal before had given a full one). `None` for a token
/// that never expires.
pub fn wait_before_step(lease: &Lease, can_login: bool, unit: f64) -> Option<Duration> {
    if lease.capped && can_login && !lease.ttl.is_zero() {
        return Some(Duration::ZERO);
    }
    renew_after(lease.ttl, unit)
}

/// The first wait after a failed login or renewal.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between failed attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Waits between failed attempts: doubling from [`BACKOFF_FIRST`] up to [`BACKOFF_MAX`], each
/// jittered down by up to a half.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    /// The wait before the next attempt (`unit` uniform in `[0, 1)`).
    pub fn next(&mut self, unit: f64) -> Duration {
        let wait = self.next.mul_f64(0.5 + unit.clamp(0.0, 1.0) / 2.0);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }
}

/// A number uniform in `[0, 1)`, for jitter; the middle when the system has no randomness.
pub fn unit() -> f64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    match ring::rand::SystemRandom::new().fill(&mut bytes) {
        Ok(()) => (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// A token Vault granted, taken out of vaultrs's answer: the token moves into a [`Secret`]
/// without a copy, and the rest of the answer (accessor, policies, metadata) is dropped.
pub fn granted(info: AuthInfo) -> (Secret, Lease) {
    let lease = Lease::new(Duration::from_secs(info.lease_duration), info.renewable);
    (Secret::from(info.client_token), lease)
}

/// The lease a renewal gave, on top of `lease`. The token in the answer (the same one) is
/// moved into a [`Secret`] and dropped, zeroized.
pub fn renewed(lease: Lease, info: AuthInfo) -> Lease {
    let (_token, renewal) = granted(info);
    lease.renewed(renewal.ttl, renewal.renewable)
}

/// `POST auth/{mount}/login` with a role ID and a secret ID.
pub async fn approle(
    client: &VaultClient,
    mount: &str,
    role_id: &str,
    secret_id: &Secret,
) -> Result<AuthInfo, ClientError> {
    vaultrs::auth::approle::login(client, mount, role_id, secret_id.expose()).await
}

/// `POST auth/{mount}/login` of the JWT method, with a role or the mount's default role.
pub async fn jwt(
    client: &VaultClient,
    mount: &str,
    role: Option<&str>,
    jwt: &Secret,
) -> Result<AuthInfo, ClientError> {
    vaultrs::auth::oidc::login(client, mount, jwt.expose(), role.map(str::to_string)).await
}

/// `POST auth/{mount}/login` of the Kubernetes method, with the service-account token.
pub async fn kubernetes(
    client: &VaultClient,
    mount: &str,
    role: &str,
    jwt: &Secret,
) -> Result<AuthInfo, ClientError> {
    vaultrs::auth::kubernetes::login(client, mount, role, jwt.expose()).await
}

/// The data of a wrapped AppRole secret ID: only the secret ID is taken.
#[derive(serde::Deserialize)]
struct WrappedSecretId {
    secret_id: Secret,
}

/// Unwraps a response-wrapped secret ID. `client` carries the wrapping token as its token, as
/// `bao unwrap` sends it. Vault unwraps a wrapping token once: a second try is refused (400).
/// `Ok(None)` when the wrapped answer holds no secret ID.
pub async fn unwrap_secret_id(client: &VaultClient) -> Result<Option<Secret>, ClientError> {
    let data: serde_json::Value = vaultrs::sys::wrapping::unwrap(client, None).await?;
    Ok(serde_json::from_value::<WrappedSecretId>(data)
        .ok()
        .map(|w| w.secret_id))
}

/// Reads a file holding one secret (a token, a secret ID, a JWT), trimmed. The error names the
/// file and why, never its content.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = Secret::from(text);
    let value = text.expose().trim();
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_token_is_renewed_at_about_two_thirds_of_its_ttl() {
        assert_eq!(renew_after(S(12), 0.0), Some(S(7)));
        assert_eq!(renew_after(S(12), 0.5), Some(S(8)));
        assert_eq!(renew_after(S(12), 1.0), Some(S(9)));
        assert_eq!(renew_after(S(0), 0.5), None);
        let u = unit();
        assert!((0.0..1.0).contains(&u), "{u}");
    }

    #[test]
    fn a_renewal_cut_short_by_the_max_ttl_turns_into_a_login() {
        let first = Lease::new(S(10), true);
        assert_eq!(step(&first, true), Step::Renew);
        let full = first.renewed(S(10), true);
        assert_eq!(step(&full, true), Step::Renew);
        let capped = full.renewed(S(3), true);
        assert!(capped.capped);
        assert_eq!(step(&capped, true), Step::Login(Reason::MaxTtl));
        assert_eq!(wait_before_step(&full, true, 0.5), renew_after(S(10), 0.5));
        assert_eq!(wait_before_step(&capped, true, 0.5), Some(S(0)));
        assert_eq!(
            wait_before_step(&capped, false, 0.5),
            renew_after(S(3), 0.5)
        );
        // A static token cannot log in: it is left to live out its max TTL.
        assert_eq!(step(&capped, false), Step::Wait);
        assert_eq!(step(&first, false), Step::Renew);
    }

    #[test]
    fn tokens_that_cannot_be_renewed_or_never_expire() {
        let batch = Lease::new(S(60), false);
        assert_eq!(step(&batch, true), Step::Login(Reason::NotRenewable));
        assert_eq!(step(&batch, false), Step::Wait);
        let forever = Lease::new(S(0), false);
        assert_eq!(step(&forever, true), Step::Wait);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_down() {
        let mut b = Backoff::default();
        assert_eq!(b.next(1.0), S(1));
        assert_eq!(b.next(1.0), S(2));
        assert_eq!(b.next(0.0), S(2));
        for _ in 0..10 {
            b.next(1.0);
        }
        assert_eq!(b.next(1.0), BACKOFF_MAX);
        assert_eq!(b.next(0.0), BACKOFF_MAX / 2);
    }

    #[test]
    fn a_secret_file_is_trimmed_and_its_errors_never_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret-id");
        std::fs::write(&path, "  s3cret-id-value\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap().expose(), "s3cret-id-value");
        std::fs::write(&path, " \n").unwrap();
        let e = read_secret_file(&path).unwrap_err();
        assert!(e.ends_with("is empty"), "{e}");
        let e = read_secret_file(&dir.path().join("nope")).unwrap_err();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn a_wrapped_secret_id_is_taken_from_the_unwrapped_data() {
        let data = serde_json::json!({"secret_id": "abc-123", "secret_id_accessor": "x", "secret_id_ttl": 0});
        let w: WrappedSecretId = serde_json::from_value(data).unwrap();
        assert_eq!(w.secret_id.expose(), "abc-123");
        assert!(
            serde_json::from_value::<WrappedSecretId>(serde_json::json!({"token": "t"})).is_err()
        );
    }
}
