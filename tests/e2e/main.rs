//! End-to-end tests: the real latchkey binary against a real OpenBao, real loopback upstreams
//! and real clients. See `support` for the parts. Every test that starts latchkey also checks,
//! when it ends, that no stored secret appears anywhere in latchkey's `trace` output.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code fails loudly: unwrap, expect and panic are how it reports"
)]
#![expect(
    clippy::string_slice,
    reason = "tests slice texts they wrote themselves (ASCII heads, base64), where a panic is a failure"
)]

mod support;

mod admin;
mod admin_tls;
mod attacks;
mod ca_vault;
mod cache_vault;
mod cli;
mod clients;
mod compose;
mod config_cli;
mod demo;
mod deploy;
mod destination;
mod errors;
mod faults;
mod framing;
mod hardening;
mod held;
mod inject;
mod leaks;
mod lifecycle;
mod monitoring;
mod pitfalls;
mod pool;
mod reload;
mod scrub;
mod sdk;
mod service_sim;
mod shutdown;
mod smoke;
mod streaming;
mod strict;
mod token_place;
mod tunnel;
mod upstream_h1;
mod upstream_strict;
mod vault_ha;
mod vault_login;
mod web;
mod websocket;
mod workers;
