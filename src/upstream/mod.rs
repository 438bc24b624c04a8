//! The upstream client: the dialer (resolve, the address check on every dialled address, TCP,
//! TLS with ALPN), latchkey's own HTTP/1.1 exchange, and the per-worker pool over both (h2
//! upstreams are hyper's).

pub mod dial;
pub mod h1;
pub mod pool;
pub mod replay;
pub mod sessions;

pub use dial::{tls_config, DialError, Dialer, MaybeTls};
pub use h1::H1Error;
pub use pool::{Limits as PoolLimits, Pool, ResponseBody, SendError, Tenant};
