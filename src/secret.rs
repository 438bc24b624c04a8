//! The `Secret` type: a credential value that redacts itself and is zeroized on drop.
//!
//! Every credential latchkey handles lives in a `Secret` from the moment it leaves the Vault
//! response until it is written into an upstream request. `Debug` prints `<redacted>`; there is
//! no `Display` (so `format!("Bearer {s}")` does not compile) and no `Serialize`; the only way to
//! the bytes is the explicit [`Secret::expose`]. What this type cannot promise is said plainly: buffers owned by other
//! crates (the HTTP response that carried the value from Vault, hyper's write buffer, the HPACK
//! encoder of an h2 connection) are outside its reach and are not zeroized.

use std::fmt;

use bytes::Bytes;
use zeroize::Zeroizing;

/// A secret string. Cloning copies the bytes into another zeroizing buffer.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Zeroizing::new(value.into()))
    }

    /// The secret's text. Callers must not log, format or keep it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Shares the secret as `Bytes` whose backing buffer is zeroized once the last clone of it is
    /// dropped, so that a header value built from it can be cloned per request without copying.
    pub fn into_shared_bytes(self) -> Bytes {
        Bytes::from_owner(ZeroizingBytes(Zeroizing::new(self.0.as_bytes().to_vec())))
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(Zeroizing::new(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    /// Takes the string serde parsed, without copying it.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::from)
    }
}

/// The owner behind [`Secret::into_shared_bytes`].
struct ZeroizingBytes(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for ZeroizingBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new("sk_live_abc123");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(&s)), "Some(<redacted>)");
        assert_eq!(s.expose(), "sk_live_abc123");
    }

    #[test]
    fn shared_bytes_carry_the_value() {
        let b = Secret::new("Bearer x").into_shared_bytes();
        assert_eq!(&b[..], b"Bearer x");
        let c = b.clone();
        drop(b);
        assert_eq!(&c[..], b"Bearer x");
    }
}
