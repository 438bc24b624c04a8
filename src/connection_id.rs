//! The connection ID: 1 to 128 characters of `A-Z a-z 0-9 _ -`, starting with a letter or
//! digit, parsed strictly before it goes anywhere near Vault (PRODUCT.md section 1).

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// A validated connection ID: 1 to 128 characters of `A-Z a-z 0-9 _ -`, starting with a letter
/// or digit. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(Arc<str>);

impl ConnectionId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(s: &str) -> Result<ConnectionId, BadConnectionId> {
        if Self::is_valid(s) {
            Ok(ConnectionId(Arc::from(s)))
        } else {
            Err(BadConnectionId)
        }
    }

    pub fn is_valid(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= Self::MAX_LEN
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The ID as a shared string (a reference count, no copy).
    pub fn shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl Borrow<str> for ConnectionId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "connection IDs are 1 to 128 characters of A-Z a-z 0-9 _ -, starting with a letter or digit"
)]
pub struct BadConnectionId;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids() {
        for ok in ["a", "stripe-prod", "A_1", "9lives", &"x".repeat(128)] {
            assert!(ConnectionId::parse(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            "a b",
            "a/b",
            "a.b",
            "a%2Fb",
            "ä",
            &"x".repeat(129),
            "../x",
            "a\n",
        ] {
            assert!(ConnectionId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
