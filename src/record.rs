//! A connection as Vault stores it: flat string fields in one KV v2 secret per connection at
//! `{mount}/{prefix}/{connection_id}`, its version number, and the KV `custom_metadata` where
//! latchkey records what it learns (status, verification time, last error).

use std::collections::BTreeMap;

use crate::secret::Secret;

/// Field names with a meaning of their own in a stored connection; every other field is a
/// connector field.
pub const RESERVED_FIELDS: [&str; 6] = [
    "connector",
    "name",
    "environment",
    "base_url",
    "allowed_hosts",
    "expires_at",
];

/// What Vault holds for a connection: the fields of the current version, its version number and
/// the KV metadata latchkey keeps there.
pub struct StoredConnection {
    pub fields: BTreeMap<String, Secret>,
    pub version: u64,
    pub custom_metadata: BTreeMap<String, String>,
    /// Fields whose stored value is not text (a JSON list or object written by another tool):
    /// the connection cannot be used, and says which field is at fault.
    pub not_text: Vec<String>,
}
