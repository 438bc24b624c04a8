//! The configuration file parser (`src/config.rs`): TOML text, and the `LATCHKEY_*` variables
//! laid over it, to a validated `Config` or an error.
//!
//! Input: the file's text; after a line `#--env--`, lines of `NAME=value` make up the
//! environment (`VAULT_TOKEN` is always set, so that a file without a token file can load).
//!
//! Beyond "no panic":
//! - an error names a key: `(file)` (the message names it), `line N`, or a dotted path whose
//!   first part is a section or a key of the file;
//! - an error never quotes what was given as a token hash (a token pasted there by mistake);
//! - a configuration that loads prints its summary.

use latchkey::config::{Config, Env};

const SECTIONS: [&str; 7] = [
    "proxy",
    "admin",
    "vault",
    "cache",
    "tls",
    "clients",
    "connectors",
];

struct FuzzEnv(Vec<(String, String)>);

impl Env for FuzzEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .rev()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.clone())
    }
    fn vars(&self) -> Vec<(String, String)> {
        self.0.clone()
    }
}

fn main() {
    afl::fuzz(true, |data: &[u8]| {
        let input = String::from_utf8_lossy(data);
        let (text, env) = input.split_once("\n#--env--\n").unwrap_or((&input, ""));
        let mut vars = vec![("VAULT_TOKEN".to_string(), "fuzz".to_string())];
        vars.extend(env.lines().filter_map(|l| {
            let (n, v) = l.split_once('=')?;
            Some((n.to_string(), v.to_string()))
        }));
        let names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
        match Config::parse(text, &FuzzEnv(vars)) {
            Ok(config) => {
                let _ = config.to_string();
            }
            Err(e) => {
                // A key a variable set is named with the variable: `LATCHKEY_X (section.key)`,
                // `VAULT_ADDR (vault.address)`.
                let key = names
                    .iter()
                    .filter(|n| n.starts_with("LATCHKEY_") || n.starts_with("VAULT_"))
                    .find_map(|n| {
                        e.key
                            .strip_prefix(n.as_str())?
                            .strip_prefix(" (")?
                            .strip_suffix(')')
                    })
                    .unwrap_or(e.key.as_str());
                let first = key.split(['.', '[']).next().unwrap_or_default();
                let names_key = key == "(file)"
                    || key.starts_with("line ")
                    || SECTIONS.contains(&first)
                    || top_level_keys(text).iter().any(|k| {
                        key == *k
                            || key.starts_with(&format!("{k}."))
                            || key.starts_with(&format!("{k}["))
                    });
                assert!(names_key, "the error names no key: {e}");
                let message = e.to_string();
                for hash in token_hashes(text) {
                    if hash.len() >= 8 && input.matches(hash.as_str()).count() == 1 {
                        assert!(
                            !message.contains(hash.as_str()),
                            "the error quotes a token hash value: {message}"
                        );
                    }
                }
            }
        }
    });
}

/// The keys of the file's top-level table (an unknown one is named as it is written).
fn top_level_keys(text: &str) -> Vec<String> {
    text.parse::<toml::Table>()
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

/// Every string given as a `token_sha256` anywhere in the file.
fn token_hashes(text: &str) -> Vec<String> {
    fn walk(v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    match (k.as_str(), v) {
                        ("token_sha256", toml::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            toml::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(table) = text.parse::<toml::Table>() {
        walk(&toml::Value::Table(table), &mut out);
    }
    out
}
