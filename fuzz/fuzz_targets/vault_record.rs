//! A connection record as Vault answers a KV v2 read: the JSON body parsed as latchkey parses
//! it (`src/vault.rs`, into the stored record of `src/record.rs`), then checked against the
//! built-in catalog (`Connection::from_stored` in `src/connection.rs`).
//!
//! Input: the body of the answer, e.g.
//! `{"data":{"data":{"connector":"stripe","api_key":"sk_test_x"},"metadata":{...}}, ...}`.
//!
//! Beyond "no panic":
//! - a refused record names the field at fault, and the message never holds a secret field's
//!   value (one that does not also appear as some other string of the record);
//! - a usable connection's `Debug` holds no secret value either, and its host is allowed on its
//!   base URL's port.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;

use latchkey::catalog::Catalog;
use latchkey::connection::Connection;
use latchkey::connection_id::ConnectionId;
use latchkey::vault::parse_read_body;

fn main() {
    let (Ok(catalog), Ok(id)) = (Catalog::builtin(), ConnectionId::parse("fuzz-conn")) else {
        return;
    };
    let catalog = AssertUnwindSafe(catalog);
    afl::fuzz(true, |data: &[u8]| {
        let Ok(Some(stored)) = parse_read_body(data) else {
            return;
        };
        // The secret values, as stored and as trimmed, that appear nowhere else in the record.
        let connector = stored
            .fields
            .get("connector")
            .and_then(|c| catalog.get(c.expose().trim()));
        let mut others = BTreeSet::new();
        let mut secrets = Vec::new();
        for (name, value) in &stored.fields {
            others.insert(name.clone());
            let secret = connector
                .and_then(|c| c.field(name))
                .is_some_and(|f| f.secret);
            if secret {
                secrets.push(value.expose().to_string());
            } else {
                others.insert(value.expose().to_string());
            }
        }
        others.extend(stored.not_text.iter().cloned());
        for (k, v) in &stored.custom_metadata {
            others.insert(k.clone());
            others.insert(v.clone());
        }
        let secrets: Vec<String> = secrets
            .iter()
            .flat_map(|s| [s.clone(), s.trim().to_string()])
            .filter(|s| s.len() >= 8)
            .filter(|s| {
                !others.iter().any(|o| o.contains(s.as_str()))
                    && secrets.iter().filter(|t| t.contains(s.as_str())).count() == 1
            })
            .collect();
        let leaks = |text: &str| secrets.iter().find(|s| text.contains(s.as_str())).cloned();

        // A field may be named "" in JSON; an error about it names it so.
        let named_empty =
            stored.fields.contains_key("") || stored.not_text.iter().any(String::is_empty);
        match Connection::from_stored(id.clone(), stored, &catalog) {
            Ok(conn) => {
                let shown = format!("{conn:?}");
                assert_eq!(leaks(&shown), None, "Debug shows a secret: {shown}");
                assert!(
                    conn.hosts.allows_at(&conn.base.host, conn.base.port),
                    "{shown}"
                );
            }
            Err(e) => {
                assert!(
                    !e.field().is_empty() || named_empty,
                    "the error names no field: {e}"
                );
                let message = e.to_string();
                assert_eq!(
                    leaks(&message),
                    None,
                    "the error quotes a secret: {message}"
                );
                let debug = format!("{e:?}");
                assert_eq!(leaks(&debug), None, "the error's Debug quotes a secret");
            }
        }
    });
}
