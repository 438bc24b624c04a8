//! latchkey: an HTTP proxy that holds API keys so that workflows never do.
//!
//! A workflow sends its request tagged with a connection ID; latchkey reads the connection from
//! Vault (or OpenBao) into an in-memory cache, injects the credential the way the service
//! expects it, forwards the request over TLS and streams the answer back. The contract is
//! `PRODUCT.md`; the README shows how to run it.
//!
//! # Layout
//!
//! One noun per module, in layers: a module imports only from layers below its own, so there is
//! no import cycle. `scripts/check-layout` reads the `use crate::` graph, fails on a cycle, and
//! checks that this table is the layering the code has (CI runs it).
//!
//! | layer | modules |
//! |---|---|
//! | 0 | connection_id, destination, hop_by_hop, misses, secret, spare, strict, telemetry, upstream::sessions, vault::capped |
//! | 1 | auth, body, ca, record, upstream::dial, vault::login |
//! | 2 | catalog, encoding, idle, scrub, upstream::h1, upstream::replay |
//! | 3 | config, downstream, inject, release, upstream::h1::fuzzing, upstream::pool |
//! | 4 | connection, upstream, vault, websocket |
//! | 5 | cache, draft, verify |
//! | 6 | coverage, lifecycle |
//! | 7 | response |
//! | 8 | admin::connections, admin::web, proxy |
//! | 9 | admin, downstream::fuzzing, proxy::fuzzing, reload, tunnel |
//! | 10 | server |
//!
//! From the bottom up:
//!
//! - Leaf types: [`secret`] (the redacted, zeroized secret), [`connection_id`] (the strict
//!   connection ID), [`hop_by_hop`] (hop-by-hop and framing headers, one rule both ways),
//!   [`telemetry`] (logging, the access log, every metric name), [`destination`] (base URLs,
//!   host allow-lists, the check on the dialled address), [`misses`] (per client, how often
//!   Vault may be read for connections that do not exist), [`strict`] (strict HTTP/1.1 framing
//!   of what clients send, checked before hyper reads it), [`upstream::sessions`] (the TLS
//!   sessions upstreams hand out, kept for resuming), [`spare`] (header maps a worker keeps
//!   for the next message), `vault::capped` (Vault's answers read to a bound).
//! - Over them: [`auth`] (client tokens, globs, who may use which connection; constant-time
//!   token matching for clients and admins alike), [`body`] (the boxed body type, the byte
//!   counter and the access-logging body), [`record`] (a connection as Vault stores it),
//!   [`ca`] (latchkey's CA and the leaf certificates it mints for the tunnel form),
//!   [`vault::login`] (the Vault login calls, and when a token is renewed or logged in again).
//! - Answers: [`scrub`] (the credential's forms replaced by the placeholder in headers and
//!   streamed bodies), [`encoding`] (content codings decoded so that they can be scrubbed).
//! - Policies: [`catalog`] (connectors), [`inject`] (the credential, and the pure request
//!   rewrite: strip, then inject), [`config`] (the file, every error naming its key).
//! - The connection: [`connection`] (a stored record checked and its credential rendered),
//!   [`draft`] (what a person submits, and the checks of a save).
//! - [`release`]: HTTP/1.1 client connections served in turns, holding no hyper connection
//!   while idle; [`downstream`]: latchkey's own HTTP/1.1 server for client connections
//!   (`proxy.http1_server = "latchkey"`), behind the same strict check, handing upgrades,
//!   CONNECT and `Expect` to hyper's.
//! - I/O: [`vault`] (the Vault client), [`upstream`] (dialer, own HTTP/1.1 exchange, pool),
//!   [`websocket`] (a WebSocket handshake on a connection of its own, then the splice),
//!   [`cache`] (the read-through secret cache), [`verify`] (the verification call).
//! - [`lifecycle`]: create, read masked, change, rotate, verify, delete; what the request path
//!   learns about connections.
//! - [`response`]: every error latchkey answers with, proxy and admin alike, mapped to a status
//!   and a `Latchkey-Error` code in one place.
//! - Services: [`proxy`] (the request path as named phases), [`admin`] (health, readiness,
//!   metrics, the admin API), [`tunnel`] (CONNECT: TLS terminated with a minted leaf, every
//!   request inside through the proxy), [`reload`] (a configuration read again, applied while
//!   serving: what changes live, what waits for a restart). At the top, [`server`]: listeners,
//!   workers, the balancer, shutdown.
//!
//! The binary (`src/bin/latchkey/`) is thin: the command line, logging, the configuration, then
//! [`run`]; the CLI over the admin API and the local demo live there too, outside the library.
//! [`Server::bind`] then [`Server::run`] is what `main` and the tests call.

pub mod admin;
pub mod auth;
pub mod body;
pub mod ca;
pub mod cache;
pub mod catalog;
pub mod config;
pub mod connection;
pub mod connection_id;
pub mod coverage;
pub mod destination;
pub mod downstream;
pub mod draft;
pub mod encoding;
pub mod hop_by_hop;
pub mod idle;
pub mod inject;
pub mod lifecycle;
pub mod misses;
pub mod proxy;
pub mod record;
pub mod release;
pub mod reload;
pub mod response;
pub mod scrub;
pub mod secret;
pub mod server;
pub mod spare;
pub mod strict;
pub mod telemetry;
pub mod tunnel;
pub mod upstream;
pub mod vault;
pub mod verify;
pub mod websocket;

pub use server::{run, Server, StartError};
