//! Where latchkey keeps the TLS sessions its upstreams hand out, so that a new upstream
//! connection resumes one instead of doing a full handshake (issue 15).
//!
//! A TLS 1.3 server sends tickets after each handshake (OpenSSL and rustls: two), and the client
//! uses each one once. rustls's own store keeps eight per server. When latchkey's pool is empty
//! (after `proxy.pool_idle_timeout` without traffic) and many requests arrive at once, it opens
//! many connections to the same upstream together: with eight tickets, all but eight of them
//! were full handshakes, the certificate chain verified again each time on cores the storm
//! already keeps busy. This store keeps up to [`TICKETS_PER_SERVER`] tickets per server, newest
//! taken first, so the pool can open that many connections resumed.
//!
//! Bounded: at most [`SERVERS`] servers (the one remembered longest ago forgotten first), and
//! [`TICKETS_PER_SERVER`] tickets each (the oldest dropped). A ticket is still used at most once,
//! as rustls asks, and an expired one is refused by rustls when taken (a full handshake then).
//! Tickets are secret material; `Debug` shows only counts.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;
use rustls::NamedGroup;

/// The most TLS 1.3 tickets kept per server: more than the pool opens to one host at once
/// under the benchmark's storm (64 requests together), fewer than would matter in memory
/// (a ticket is its few hundred bytes and a share of its handshake's certificate chain).
pub const TICKETS_PER_SERVER: usize = 128;
/// The most servers remembered.
pub const SERVERS: usize = 256;

/// A [`ClientSessionStore`] with room for [`TICKETS_PER_SERVER`] tickets per server.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Servers>,
}

#[derive(Default)]
struct Servers {
    by_name: HashMap<ServerName<'static>, Server>,
    /// Names in the order they were first remembered, for forgetting the oldest.
    order: VecDeque<ServerName<'static>>,
}

#[derive(Default)]
struct Server {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    /// Oldest first.
    tls13: VecDeque<Tls13ClientSessionValue>,
}

impl Sessions {
    pub fn new() -> Sessions {
        Sessions::default()
    }

    fn lock(&self) -> MutexGuard<'_, Servers> {
        // A panic while holding the lock cannot leave the maps torn in a way that matters here:
        // at worst a ticket is missing, which costs a full handshake.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Tickets held for `name`.
    pub fn tickets(&self, name: &ServerName<'_>) -> usize {
        self.lock().get(name).map_or(0, |s| s.tls13.len())
    }
}

impl Servers {
    /// What is kept for `name` (the map's keys are owned names, so a borrowed one is copied to
    /// look it up; this runs once per handshake, not per request).
    fn get(&self, name: &ServerName<'_>) -> Option<&Server> {
        self.by_name.get(&name.to_owned())
    }

    fn entry(&mut self, name: ServerName<'static>) -> &mut Server {
        if !self.by_name.contains_key(&name) {
            while self.by_name.len() >= SERVERS {
                match self.order.pop_front() {
                    Some(oldest) => {
                        self.by_name.remove(&oldest);
                    }
                    None => break,
                }
            }
            self.order.push_back(name.clone());
        }
        self.by_name.entry(name).or_default()
    }
}

impl ClientSessionStore for Sessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.lock().entry(server_name).kx_hint = Some(group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.lock().get(server_name).and_then(|s| s.kx_hint)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.lock().entry(server_name).tls12 = Some(value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.lock().get(server_name).and_then(|s| s.tls12.clone())
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        if let Some(s) = self.lock().by_name.get_mut(server_name) {
            s.tls12 = None;
        }
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let mut servers = self.lock();
        let tickets = &mut servers.entry(server_name).tls13;
        if tickets.len() >= TICKETS_PER_SERVER {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.lock()
            .by_name
            .get_mut(server_name)
            .and_then(|s| s.tls13.pop_back())
    }
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers = self.lock();
        let tickets: usize = servers.by_name.values().map(|s| s.tls13.len()).sum();
        f.debug_struct("Sessions")
            .field("servers", &servers.by_name.len())
            .field("tls13_tickets", &tickets)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::client::{ClientSessionMemoryCache, Resumption};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, HandshakeKind, ServerConfig, ServerConnection};

    use super::*;

    fn configs(store: Arc<dyn ClientSessionStore>) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        let cert = rcgen::generate_simple_self_signed(vec!["upstream.test".to_string()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
        let server = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let mut client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = Resumption::store(store);
        (Arc::new(client), Arc::new(server))
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("upstream.test").unwrap()
    }

    /// Moves bytes both ways until neither side has anything more to say: the handshake, then
    /// the server's tickets, which the client stores as it reads them.
    fn pump(client: &mut ClientConnection, server: &mut ServerConnection) {
        loop {
            let mut moved = false;
            while client.wants_write() {
                let mut buf = Vec::new();
                client.write_tls(&mut buf).unwrap();
                server.read_tls(&mut &buf[..]).unwrap();
                server.process_new_packets().unwrap();
                moved = true;
            }
            while server.wants_write() {
                let mut buf = Vec::new();
                server.write_tls(&mut buf).unwrap();
                client.read_tls(&mut &buf[..]).unwrap();
                client.process_new_packets().unwrap();
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    /// Opens `n` connections together (every ClientHello, so every ticket taken, before any
    /// handshake goes on), completes them, and says how many resumed.
    fn storm(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>, n: usize) -> usize {
        let mut pairs: Vec<_> = (0..n)
            .map(|_| {
                let c = ClientConnection::new(client.clone(), name()).unwrap();
                let s = ServerConnection::new(server.clone()).unwrap();
                (c, s)
            })
            .collect();
        for (c, s) in &mut pairs {
            pump(c, s);
            assert!(!c.is_handshaking() && !s.is_handshaking());
        }
        pairs
            .iter()
            .filter(|(c, _)| c.handshake_kind() == Some(HandshakeKind::Resumed))
            .count()
    }

    #[test]
    fn many_connections_opened_at_once_all_resume() {
        let sessions = Arc::new(Sessions::new());
        let (client, server) = configs(sessions.clone());
        // One connection at a time: each takes a ticket and brings two.
        assert_eq!(storm(&client, &server, 1), 0, "nothing to resume yet");
        for _ in 0..30 {
            assert_eq!(storm(&client, &server, 1), 1);
        }
        assert_eq!(sessions.tickets(&name()), 32);
        // Then 24 together, as the pool does when requests find it empty.
        assert_eq!(storm(&client, &server, 24), 24);
        assert_eq!(sessions.tickets(&name()), 32 - 24 + 48);
        assert_eq!(
            format!("{sessions:?}"),
            "Sessions { servers: 1, tls13_tickets: 56 }"
        );
    }

    #[test]
    fn rustls_own_store_resumes_only_eight_of_a_storm() {
        // What the store above is for: the same storm with rustls's default store.
        let (client, server) = configs(Arc::new(ClientSessionMemoryCache::new(256)));
        for _ in 0..31 {
            storm(&client, &server, 1);
        }
        assert_eq!(storm(&client, &server, 24), 8);
    }

    #[test]
    fn tickets_and_servers_are_bounded() {
        let sessions = Arc::new(Sessions::new());
        let (client, server) = configs(sessions.clone());
        for _ in 0..(TICKETS_PER_SERVER + 10) {
            storm(&client, &server, 1);
        }
        assert_eq!(sessions.tickets(&name()), TICKETS_PER_SERVER);
        for i in 0..(SERVERS + 5) {
            let other = ServerName::try_from(format!("host{i}.test")).unwrap();
            sessions.set_kx_hint(other, NamedGroup::X25519);
        }
        let servers = sessions.lock();
        assert_eq!(servers.by_name.len(), SERVERS);
        assert_eq!(servers.order.len(), SERVERS);
        // The first remembered went first.
        assert!(!servers.by_name.contains_key(&name()));
    }
}
