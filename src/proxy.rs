//! The proxy service: one request's way through latchkey, as named phases.
//!
//! 1. [`Proxy::route`]: which form the request is in, its connection ID and client token.
//! 2. [`Proxy::authorize`]: the client's token and its right to the connection.
//! 3. [`Proxy::connection`]: the connection, from the cache (one Vault read on a miss).
//! 4. [`Proxy::upstream_peer`]: where the request goes, checked against the connection's hosts.
//!    The address check on the dialled address follows in the upstream connector.
//! 5. [`inject::rewrite`]: strip, then inject.
//! 6. [`Proxy::forward`]: the pooled client, streaming both ways; hop-by-hop headers of the
//!    answer are stripped, and a 401 starts a re-read of the connection. A WebSocket handshake
//!    goes instead on a connection of its own ([`websocket`]), spliced once upgraded.
//! 7. The access log line and metrics, on success (when the body ends) and on failure alike.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use http::uri::Authority;
use http::{Method, Request, Response, Uri, Version};
use http_body::Frame;
use http_body_util::BodyExt;

use crate::auth::{self, Client, Clients, CredentialsError, Place, TokenPlaces};
use crate::body::{
    BoxBody, BoxError, BytesIn, ClientBody, Counted, Logged, PendingLog, Unanswered,
};
use crate::cache::{Cache, CacheError};
use crate::catalog::{Catalog, Inject};
use crate::connection::Connection;
use crate::connection_id::ConnectionId;
use crate::coverage::Coverage;
use crate::destination::{self, normalize_host, Passthrough, Scheme};
use crate::encoding;
use crate::inject::{self, Target};
use crate::lifecycle::Lifecycle;
use crate::misses::MissLimit;
use crate::response::ProxyError;
use crate::scrub::{Answer, Scrubbed, Scrubber};
use crate::secret::Secret;
use crate::strict::{self, Link};
use crate::telemetry::{self, AccessLog, CacheOutcome, LogPath};
use crate::upstream::{MaybeTls, Pool, ResponseBody, Tenant};
use crate::websocket;

/// A worker's proxy as requests find it: each request loads the one in force and keeps it to
/// its end; a reload stores a new one, built from the new configuration.
pub type ProxySlot = Arc<arc_swap::ArcSwap<Proxy>>;

/// The proxy listener's service.
pub struct Proxy {
    cache: Cache,
    lifecycle: Arc<Lifecycle>,
    clients: Clients,
    /// Where a gateway-form client may put its token instead of `Proxy-Authorization`.
    token_places: TokenPlaces,
    /// Which connections cover a host, for requests that name none.
    coverage: Arc<Coverage>,
    /// CONNECT targets spliced without TLS termination or credential.
    passthrough: Arc<Passthrough>,
    upstream: Arc<Pool>,
    request_timeout: Duration,
    /// Per client: Vault reads that found nothing.
    misses: Arc<MissLimit>,
}

/// What the proxy's side of a CONNECT decided.
pub enum Opened {
    /// A tunnel that latchkey terminates, its requests served by the pipeline.
    Tunnel(Tunnel),
    /// A passthrough host, already dialled: its bytes are spliced as they are, and the
    /// CONNECT's access line is written when the splice closes.
    Splice(MaybeTls, PendingLog),
}

/// [`Opened`] before the CONNECT's line is dealt with.
enum Opening {
    Tunnel(Tunnel),
    Splice(MaybeTls),
}

/// Which of the request forms of PRODUCT.md section 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Gateway,
    Forward,
    Tunnel,
}

impl Form {
    fn as_str(self) -> &'static str {
        match self {
            Form::Gateway => "gateway",
            Form::Forward => "forward",
            Form::Tunnel => "tunnel",
        }
    }
}

/// What a CONNECT established: the client, the connection, and the host and port that every
/// request inside the tunnel is held to.
#[derive(Clone)]
pub struct Tunnel {
    /// The connection named at CONNECT; `None` when each request picks its own: a
    /// `latchkey.{id}` placeholder where the key goes, or the one candidate.
    pub id: Option<ConnectionId>,
    /// When no connection was named: the granted connections covering the CONNECT host and
    /// port, found at CONNECT.
    pub candidates: Arc<[ConnectionId]>,
    pub client: Option<Arc<str>>,
    /// The authenticated client, for the connections a request names later.
    pub grant: Option<Client>,
    /// Normalized (lower case, no trailing dot, IPv6 in brackets).
    pub host: Arc<str>,
    pub port: u16,
    /// TLS inside (latchkey terminates it), or plain HTTP.
    pub tls: bool,
    /// The SNI the client sent matched the host (always true without TLS).
    pub sni_matches: bool,
    /// The CONNECT's client token: taken out of every request inside, wherever it stands.
    pub token: Option<Secret>,
}

impl Tunnel {
    /// The connection's ID for a log line, or `-` when each request names its own.
    pub fn connection(&self) -> &str {
        self.id.as_ref().map_or("-", ConnectionId::as_str)
    }

    /// Where every request inside goes: the CONNECT host and port, over TLS when the tunnel
    /// carries TLS.
    fn requested(&self) -> Requested<'_> {
        Requested {
            scheme: if self.tls {
                Scheme::Https
            } else {
                Scheme::Http
            },
            host: &self.host,
            port: Some(self.port),
        }
    }

    /// An inner request names the CONNECT host and port in its `Host` or `:authority`, and the
    /// TLS handshake named it in its SNI; otherwise 421, and nothing is sent. A request that
    /// names its host twice, in an absolute URI (or h2's `:authority`) and in a `Host` header,
    /// names the CONNECT host in both: an upstream may route on either.
    fn check_inner(&self, headers: &http::HeaderMap, uri: &Uri) -> Result<(), ProxyError> {
        if !self.sni_matches {
            return Err(ProxyError::HostMismatch(format!(
                "the TLS server name is not {}, the CONNECT host",
                self.host
            )));
        }
        let mut hosts = headers.get_all(http::header::HOST).iter();
        let host = hosts.next();
        if hosts.next().is_some() {
            return Err(ProxyError::BadRequest("more than one Host header".into()));
        }
        let host = match host {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.parse::<Authority>().ok())
                    .ok_or_else(|| {
                        ProxyError::HostMismatch("the Host header is not a host and port".into())
                    })?,
            ),
            None => None,
        };
        if uri.authority().is_none() && host.is_none() {
            return Err(ProxyError::HostMismatch(
                "a request inside a tunnel must name its host".into(),
            ));
        }
        let default = if self.tls { 443 } else { 80 };
        for named in uri.authority().into_iter().chain(host.as_ref()) {
            // User information is not part of a request's authority (RFC 9113 section 8.3.1,
            // RFC 9110 section 4.2.4), and is not the tunnel's host however it ends.
            if named.as_str().contains('@') {
                return Err(ProxyError::BadRequest(
                    "the request's authority must not carry user information".into(),
                ));
            }
            if normalize_host(named.host()) != *self.host
                || named.port_u16().unwrap_or(default) != self.port
            {
                return Err(ProxyError::HostMismatch(format!(
                    "the request names {} but the tunnel goes to {}:{}",
                    named.as_str(),
                    self.host,
                    self.port
                )));
            }
        }
        Ok(())
    }
}

/// A request target that is a host and port alone (authority-form) is CONNECT's (RFC 9112
/// section 3.2.3); any other method that sends one is refused, not read as a host to check.
/// The target is not echoed: it may carry user information.
fn not_authority_form(uri: &Uri) -> Result<(), ProxyError> {
    if uri.scheme().is_none() && uri.authority().is_some() {
        return Err(ProxyError::BadRequest(
            "the request target is a host and port (authority-form), which only CONNECT sends"
                .into(),
        ));
    }
    Ok(())
}

/// The fields a request must or must not have that the servers under it let through: an
/// HTTP/1.1 request carries `Host`; an h2 field value does not start or end with whitespace
/// (RFC 9113 section 8.2.1: such a request is malformed, and an intermediary must not forward
/// it; HTTP/1's parser trims it, as RFC 9112 section 5.1 asks).
fn check_fields<B>(req: &Request<B>) -> Result<(), ProxyError> {
    if req.version() == Version::HTTP_11 {
        // RFC 9112 section 3.2: a server answers 400 to an HTTP/1.1 request without `Host`.
        // A CONNECT names its host in its target, which is all a tunnel needs.
        if !req.headers().contains_key(http::header::HOST) && req.method() != Method::CONNECT {
            return Err(ProxyError::BadRequest(
                "an HTTP/1.1 request must carry a Host header (RFC 9112 section 3.2)".into(),
            ));
        }
        return Ok(());
    }
    if req.version() != Version::HTTP_2 {
        return Ok(());
    }
    for (name, value) in req.headers() {
        let v = value.as_bytes();
        if matches!(v.first(), Some(b' ' | b'\t')) || matches!(v.last(), Some(b' ' | b'\t')) {
            return Err(ProxyError::BadRequest(format!(
                "the value of {name} starts or ends with whitespace, which HTTP/2 does not allow"
            )));
        }
    }
    Ok(())
}

/// What the first phase learns of a request.
struct Route<'u> {
    form: Form,
    id: ConnectionId,
    token: Option<Secret>,
    /// The path and query to send on (in gateway form, what follows the connection ID).
    path_and_query: Cow<'u, str>,
    /// The destination a forward-form request named.
    requested: Option<Requested<'u>>,
}

/// A request's route, or for a forward-form request that names no connection (proxy user `_`,
/// empty, or none), what it needs to pick one.
enum Routed<'u> {
    Named(Route<'u>),
    Unnamed(Unnamed<'u>),
}

struct Unnamed<'u> {
    form: Form,
    token: Option<Secret>,
    path_and_query: Cow<'u, str>,
    requested: Requested<'u>,
}

/// Where phase 4 sends the request.
struct Peer<'c> {
    scheme: Scheme,
    authority: Cow<'c, Authority>,
    /// The base URL's path in gateway form; nothing in forward form.
    path_prefix: &'c str,
    /// The host, for the log.
    host: Arc<str>,
}

struct Requested<'u> {
    scheme: Scheme,
    host: &'u str,
    port: Option<u16>,
}

impl Proxy {
    pub fn new(
        cache: Cache,
        lifecycle: Arc<Lifecycle>,
        clients: Clients,
        (coverage, passthrough): (Arc<Coverage>, Arc<Passthrough>),
        upstream: Arc<Pool>,
        (request_timeout, misses): (Duration, Arc<MissLimit>),
    ) -> Proxy {
        let token_places = token_places(&lifecycle.catalog());
        Proxy {
            cache,
            lifecycle,
            clients,
            token_places,
            coverage,
            passthrough,
            upstream,
            request_timeout,
            misses,
        }
    }

    /// Serves one request; never fails (latchkey's own errors become responses).
    ///
    /// This and the next are not `async fn`s: a layer that only hands the request on would
    /// copy it into a future of its own and its answer out again, on every request. The request
    /// comes boxed by the server that read it, so that each layer down to
    /// [`Proxy::send_on`], where it is taken apart, moves a pointer rather than its 264 bytes.
    pub fn handle(
        &self,
        req: Box<Request<ClientBody>>,
    ) -> impl std::future::Future<Output = Response<BoxBody>> + '_ {
        self.logged(req, None)
    }

    /// Serves one request that arrived inside `tunnel`.
    pub fn handle_tunneled<'a>(
        &'a self,
        req: Box<Request<ClientBody>>,
        tunnel: &'a Tunnel,
    ) -> impl std::future::Future<Output = Response<BoxBody>> + 'a {
        self.logged(req, Some(tunnel))
    }

    /// Serves a request and writes its access line, on success (when the body ends) and on
    /// failure alike.
    async fn logged(
        &self,
        req: Box<Request<ClientBody>>,
        tunnel: Option<&Tunnel>,
    ) -> Response<BoxBody> {
        let mut unanswered = Unanswered::new(AccessLog {
            method: req.method().clone(),
            ..AccessLog::default()
        });
        let (log, bytes_in) = (&mut unanswered.log, &unanswered.bytes_in);
        let served = match tunnel {
            None => self.serve(req, log, bytes_in).await,
            Some(t) => self.serve_tunneled(req, t, log, bytes_in).await,
        };
        let PendingLog {
            mut log,
            started,
            bytes_in,
        } = unanswered.answered();
        match served {
            Ok(mut response) => {
                log.status = response.status().as_u16();
                if let Some(at_close) = response.extensions_mut().remove::<websocket::LogAtClose>()
                {
                    // An upgraded WebSocket: its line is written when it closes.
                    at_close.send(PendingLog {
                        log,
                        started,
                        bytes_in,
                    });
                    return response.map(|b| b.boxed_unsync());
                }
                let (parts, body) = response.into_parts();
                let body = Logged::new(
                    body,
                    PendingLog {
                        log,
                        started,
                        bytes_in,
                    },
                );
                Response::from_parts(parts, body.boxed_unsync())
            }
            Err(e) => {
                log.status = e.status().as_u16();
                log.error = Some(e.code());
                log.bytes_in = bytes_in.load();
                if e.status().is_server_error() {
                    // The upstream's or Vault's failure: an operator needs its cause, which the
                    // client's answer has and the access line's code alone does not say.
                    tracing::warn!(
                        code = e.code(),
                        connection = log.connection.as_deref().unwrap_or("-"),
                        host = log.host.as_deref().unwrap_or("-"),
                        cause = %e,
                        "request failed"
                    );
                } else {
                    tracing::debug!(code = e.code(), message = %e, "request refused");
                }
                log.emit(started.elapsed());
                e.into_response()
            }
        }
    }

    async fn serve(
        &self,
        mut req: Box<Request<ClientBody>>,
        log: &mut AccessLog,
        bytes_in: &BytesIn,
    ) -> Result<Response<Answer<ResponseBody>>, ProxyError> {
        check_fields(&req)?;
        let uri = std::mem::take(req.uri_mut());

        let mut route = match Self::route(&req, &uri)? {
            Routed::Named(route) => route,
            Routed::Unnamed(route) => {
                log.form = route.form.as_str();
                self.pick(req.headers(), route, log).await?
            }
        };
        self.take_client_tokens(req.headers_mut(), &mut route, None);
        log.form = route.form.as_str();
        log.connection = Some(route.id.shared());
        if let Some(r) = &route.requested {
            log.host = Some(Arc::from(r.host));
        }

        self.authorize(&route, log)?;
        // How the client reached latchkey, for a `Location` that names latchkey itself.
        let reached_as = match route.form {
            Form::Gateway => match uri.authority() {
                Some(a) => Some(ReachedAs::Authority(a.clone())),
                None => req
                    .headers()
                    .get(http::header::HOST)
                    .map(|h| ReachedAs::Host(h.clone())),
            },
            _ => None,
        };
        self.send_on(req, &route, reached_as.as_ref(), log, bytes_in)
            .await
    }

    /// A request inside a tunnel: held to the CONNECT's host and port (SNI and `Host` or
    /// `:authority` alike), then sent on as a forward-form request on the tunnel's connection.
    async fn serve_tunneled(
        &self,
        mut req: Box<Request<ClientBody>>,
        tunnel: &Tunnel,
        log: &mut AccessLog,
        bytes_in: &BytesIn,
    ) -> Result<Response<Answer<ResponseBody>>, ProxyError> {
        let uri = std::mem::take(req.uri_mut());
        log.form = Form::Tunnel.as_str();
        log.client = tunnel.client.clone();
        log.host = Some(tunnel.host.clone());
        check_fields(&req)?;
        // A tunnel inside a tunnel would carry bytes latchkey does not read; an h2 extended
        // CONNECT (a WebSocket) is a request like any other.
        if req.method() == Method::CONNECT && websocket::request_asks(&req).is_none() {
            return Err(ProxyError::ConnectInsideTunnel);
        }
        not_authority_form(&uri)?;
        tunnel.check_inner(req.headers(), &uri)?;
        let grant = self.tunnel_grant(tunnel)?;
        let id = match &tunnel.id {
            Some(id) => id.clone(),
            None => choose(
                placeholder(&self.token_places, req.headers(), uri.query())?,
                grant,
                &tunnel.candidates,
                &format!("{}:{}", tunnel.host, tunnel.port),
            )?,
        };
        if let Some(client) = grant {
            if !client.may_use(id.as_str()) {
                return Err(ProxyError::ConnectionForbidden {
                    client: client.name.to_string(),
                    connection: id.to_string(),
                });
            }
        }
        log.connection = Some(id.shared());
        let mut route = Route {
            form: Form::Tunnel,
            id,
            token: None,
            path_and_query: Cow::Borrowed(uri.path_and_query().map_or("/", |p| p.as_str())),
            requested: Some(tunnel.requested()),
        };
        self.take_client_tokens(req.headers_mut(), &mut route, tunnel.token.as_ref());
        self.send_on(req, &route, None, log, bytes_in).await
    }

    /// The client of a tunnel as the configuration in force knows it: a reload since the
    /// CONNECT may have removed it, or changed what it may use.
    fn tunnel_grant<'a>(&'a self, tunnel: &Tunnel) -> Result<Option<&'a Client>, ProxyError> {
        match &tunnel.grant {
            None if self.clients.is_open() => Ok(None),
            granted => granted
                .as_ref()
                .and_then(|g| self.clients.by_token_hash(&g.token_sha256))
                .map(Some)
                .ok_or(ProxyError::ProxyAuthRequired(
                    "the client token is not valid",
                )),
        }
    }

    /// The CONNECT's phases: its target, the client, the connection and its hosts and ports
    /// (or, when none is named, the granted connections covering the target, or a passthrough
    /// host), and the addresses the target resolves to. Writes the CONNECT's access line
    /// whatever the outcome.
    pub async fn connect(
        &self,
        parts: &http::request::Parts,
        tls: bool,
    ) -> Result<Opened, ProxyError> {
        let started = Instant::now();
        let mut log = AccessLog {
            method: Method::CONNECT,
            form: Form::Tunnel.as_str(),
            ..AccessLog::default()
        };
        let opened = self.open_tunnel(parts, tls, &mut log).await;
        match opened {
            Ok(Opening::Tunnel(tunnel)) => {
                log.status = 200;
                log.emit(started.elapsed());
                Ok(Opened::Tunnel(tunnel))
            }
            // A splice is all its CONNECT does: its line has the bytes each way and how long
            // it lasted, once it closes.
            Ok(Opening::Splice(stream)) => {
                log.status = 200;
                let pending = PendingLog {
                    log,
                    started,
                    bytes_in: BytesIn::default(),
                };
                Ok(Opened::Splice(stream, pending))
            }
            Err(e) => {
                log.status = e.status().as_u16();
                log.error = Some(e.code());
                if e.status().is_server_error() {
                    // As for requests (`request failed`): the cause of latchkey's own 5xx,
                    // which the client's answer has and the access line's code alone does not.
                    tracing::warn!(code = e.code(), host = log.host.as_deref().unwrap_or("-"), cause = %e, "CONNECT failed");
                } else {
                    tracing::debug!(code = e.code(), message = %e, "CONNECT refused");
                }
                log.emit(started.elapsed());
                Err(e)
            }
        }
    }

    async fn open_tunnel(
        &self,
        parts: &http::request::Parts,
        tls: bool,
        log: &mut AccessLog,
    ) -> Result<Opening, ProxyError> {
        // Only `host:port` (RFC 9112 section 3.2.3): no scheme, path, user information or empty
        // host, which a device in front of latchkey might read as another host.
        let target = || ProxyError::BadRequest("CONNECT needs a host:port target".into());
        let authority = parts.uri.authority().ok_or_else(target)?;
        // Digits only (a `+443` parses as a number, and is not a port).
        let digits = authority
            .port()
            .is_some_and(|p| p.as_str().bytes().all(|b| b.is_ascii_digit()));
        let port = authority.port_u16().filter(|_| digits).ok_or_else(target)?;
        if parts.uri.scheme().is_some()
            || parts
                .uri
                .path_and_query()
                .is_some_and(|p| !p.as_str().is_empty())
            || authority.as_str().contains('@')
            || authority.host().is_empty()
        {
            return Err(target());
        }
        let host = normalize_host(authority.host());
        log.host = Some(Arc::from(host.as_str()));
        let (user, token) = match auth::proxy_credentials(&parts.headers) {
            Ok(creds) => (creds.user, Some(creds.token)),
            // Open (no [[clients]]): a CONNECT may come without any proxy credentials.
            Err(CredentialsError::Missing) if self.clients.is_open() => (None, None),
            Err(e) => {
                return Err(ProxyError::ProxyAuthRequired(match e {
                    CredentialsError::Missing => {
                        "CONNECT carries the client token in Proxy-Authorization: Basic base64(connection_id:token)"
                    }
                    CredentialsError::Malformed => {
                        "Proxy-Authorization must be Basic base64(connection_id:token)"
                    }
                }))
            }
        };
        let mut tunnel = Tunnel {
            id: None,
            candidates: Arc::from(Vec::new()),
            client: None,
            grant: None,
            host: Arc::from(host.as_str()),
            port,
            tls,
            sni_matches: true,
            token: token.clone(),
        };
        let covered = match user.filter(|u| !u.is_empty() && u != "_") {
            None => {
                let client = self.authenticate(token.as_ref())?;
                log.client = client.map(|c| c.name.clone());
                tunnel.grant = client.cloned();
                // As a forward request's URL would name it: plain HTTP inside a CONNECT to
                // port 80 (which goes over TLS to a connection whose base URL is https, as in
                // forward form), TLS to any other port.
                let dialled = (
                    Some(port),
                    if port == 80 {
                        Scheme::Http
                    } else {
                        Scheme::Https
                    },
                );
                let candidates = self
                    .coverage
                    .candidates(client, &host, dialled)
                    .await
                    .map_err(|_| ProxyError::CannotChoose(format!("{host}:{port}")))?;
                tunnel.candidates = Arc::from(candidates);
                !tunnel.candidates.is_empty()
            }
            Some(user) => self.named_tunnel(&user, token, &mut tunnel, log).await?,
        };
        tunnel.client = log.client.clone();
        if !covered {
            return self.passthrough(&host, port, &tunnel, log).await;
        }
        self.upstream
            .dialer()
            .check_destination(&host, port)
            .await
            .map_err(|e| ProxyError::from_upstream(&e.into()))?;
        Ok(Opening::Tunnel(tunnel))
    }

    /// A CONNECT whose proxy user names the connection: the client may use it, and whether it
    /// covers the CONNECT host and port.
    async fn named_tunnel(
        &self,
        user: &str,
        token: Option<Secret>,
        tunnel: &mut Tunnel,
        log: &mut AccessLog,
    ) -> Result<bool, ProxyError> {
        let id =
            ConnectionId::parse(user).map_err(|e| ProxyError::BadConnectionId(e.to_string()))?;
        log.connection = Some(id.shared());
        let route = Route {
            form: Form::Tunnel,
            id,
            token,
            path_and_query: Cow::Borrowed("/"),
            requested: Some(tunnel.requested()),
        };
        let client = self.authorize(&route, log)?;
        let grant = client.cloned();
        let conn = self.connection(&route.id, log).await?;
        log.connection_known = true;
        let covered = match Self::upstream_peer(&route, &conn) {
            Ok(_) => true,
            // Not this connection's host: a passthrough host is spliced, anything else refused.
            Err(ProxyError::HostNotAllowed { .. })
                if self.passthrough.covers(&tunnel.host, tunnel.port) =>
            {
                false
            }
            Err(e) => return Err(e),
        };
        let id = route.id;
        tunnel.grant = grant;
        if covered {
            tunnel.id = Some(id);
        }
        Ok(covered)
    }

    /// A CONNECT target no granted connection covers: dialled and spliced when it is a
    /// passthrough host (after the address check, as every dial), refused otherwise.
    async fn passthrough(
        &self,
        host: &str,
        port: u16,
        tunnel: &Tunnel,
        log: &mut AccessLog,
    ) -> Result<Opening, ProxyError> {
        if !self.passthrough.covers(host, port) {
            return Err(ProxyError::NotCovered(match &tunnel.client {
                Some(client) => format!(
                    "no connection that client {client:?} may use covers {host}:{port}, and it is not a proxy.passthrough host"
                ),
                None => format!(
                    "no connection covers {host}:{port}, and it is not a proxy.passthrough host"
                ),
            }));
        }
        log.form = "passthrough";
        log.connection = None;
        log.connection_known = false;
        let authority = Authority::from_maybe_shared(bytes::Bytes::from(destination::authority(
            host,
            port,
            Scheme::Http,
        )))
        .map_err(|_| ProxyError::BadRequest("the CONNECT host is not valid".into()))?;
        let stream = self
            .upstream
            .dialer()
            .dial(false, &authority)
            .await
            .map_err(|e| ProxyError::from_upstream(&e.into()))?;
        Ok(Opening::Splice(stream))
    }

    /// Phases 3 to 6, once the route and the client are known. `reached_as`: in gateway
    /// form, how the client reached latchkey.
    async fn send_on(
        &self,
        req: Box<Request<ClientBody>>,
        route: &Route<'_>,
        reached_as: Option<&ReachedAs>,
        log: &mut AccessLog,
        bytes_in: &BytesIn,
    ) -> Result<Response<Answer<ResponseBody>>, ProxyError> {
        let conn = self.connection(&route.id, log).await?;
        log.connection_known = true;

        let peer = Self::upstream_peer(route, &conn)?;
        log.host = Some(peer.host.clone());
        let authority = &*peer.authority;
        // Out of its box here, where it is rewritten and sent on: each layer before moved
        // only the box.
        let (mut parts, body) = (*req).into_parts();
        // Taken before the rewrite strips `Upgrade` and `Connection` as hop-by-hop.
        let websocket = websocket::ClientSide::take(&mut parts);
        let bodiless = parts.method == Method::HEAD;

        let target = Target {
            scheme: peer.scheme,
            authority,
            path_prefix: peer.path_prefix,
        };
        let log_path = inject::rewrite(
            &mut parts,
            &route.path_and_query,
            target,
            &conn.credential,
            &conn.connector,
        )
        .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        // Logged from here on, so that an upstream failure's line says what was asked; with
        // any form of the key that the client wrote into the path or query itself replaced
        // (PRODUCT.md 4.8: never in a log line).
        log.path = Some(match &conn.scrubber {
            Some(scrubber) => unquoted(log_path, scrubber),
            None => log_path,
        });

        let mut response = match websocket {
            // Boxed: a handshake's future is the largest of this function's, and every
            // request's future (this one's and each caller's) would otherwise be that large,
            // and moved whole at every level it is built at.
            Some(client) => {
                let response = Box::pin(self.upgrade(parts, client, log)).await?;
                // Scrubbed as any answer: a refusal (401, 404...) with its body, and the
                // headers of a 101 kept for the client. The frames after it are not.
                match &conn.scrubber {
                    Some(scrubber) => Self::scrub(response, scrubber, bodiless)?,
                    None => response.map(Answer::pass),
                }
            }
            None => {
                // No body (most requests): nothing to count or strip, and no box to allocate.
                let body = match body {
                    ClientBody::Empty => crate::body::empty(),
                    body => NoTrailers::new(Counted::new(body, bytes_in.counter()))
                        .map_err(BoxError::from)
                        .boxed_unsync(),
                };
                // Phase 6: send it on and take the answer's head (here rather than in a
                // function of its own, whose future would be one more copy of the request and
                // of the answer).
                let response = self
                    .upstream
                    .send(
                        Request::from_parts(parts, body),
                        Tenant::new(conn.id.shared(), conn.version),
                        self.request_timeout,
                    )
                    .await
                    .map_err(|e| ProxyError::from_upstream(&e))?;
                log.upstream_version = Some(match response.version() {
                    Version::HTTP_2 => "h2",
                    Version::HTTP_10 => "http/1.0",
                    _ => "http/1.1",
                });
                match &conn.scrubber {
                    Some(scrubber) => Self::scrub(response, scrubber, bodiless)?,
                    None => response.map(Answer::pass),
                }
            }
        };
        if route.form == Form::Gateway {
            let asked = log.path.as_ref().map_or("/", |p| p.as_str());
            gateway_location(response.headers_mut(), &conn, asked, reached_as);
        }
        let what = || {
            let path = log.path.as_ref().map_or("", |p| p.as_str());
            format!("{} {authority}{path}", log.method)
        };
        match response.status() {
            http::StatusCode::UNAUTHORIZED => {
                telemetry::upstream_unauthorized(route.id.as_str());
                if let Some(reread) = self.cache.reread_after_unauthorized(&route.id) {
                    tracing::info!(connection = %route.id, "upstream answered 401; re-reading the connection");
                    self.lifecycle
                        .upstream_unauthorized(conn.clone(), reread, what());
                }
            }
            http::StatusCode::FORBIDDEN => {
                telemetry::upstream_forbidden(route.id.as_str());
                self.lifecycle.upstream_forbidden(conn.clone(), what());
            }
            status
                if status.is_success()
                    && conn.failed.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                self.lifecycle.upstream_accepted(conn.clone());
            }
            _ => {}
        }
        Ok(response)
    }

    /// Phase 1: the request's form, connection ID and token.
    fn route<'u, B>(req: &Request<B>, uri: &'u Uri) -> Result<Routed<'u>, ProxyError> {
        // An h2 extended CONNECT for a WebSocket is a request like any other; a plain CONNECT
        // is the tunnel's.
        if req.method() == Method::CONNECT && websocket::request_asks(req).is_none() {
            return Err(ProxyError::ConnectUnsupported);
        }
        // HTTP/2 requests always carry scheme and authority; only HTTP/1 absolute-form is a
        // forward-proxy request.
        let absolute = uri.scheme().is_some() && uri.authority().is_some();
        if absolute && req.version() < Version::HTTP_2 {
            return Self::route_forward(req.headers(), uri);
        }
        not_authority_form(uri)?;

        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        let Some(after) = pq.strip_prefix('/') else {
            return Err(ProxyError::BadRequest(
                "send /{connection_id}/path to the proxy, or an absolute http:// URL".into(),
            ));
        };
        let end = after.find(['/', '?']).unwrap_or(after.len());
        let (id, rest) = after.split_at(end);
        if id.is_empty() {
            return Err(ProxyError::BadConnectionId(
                "the path must start with /{connection_id}/".into(),
            ));
        }
        let id = ConnectionId::parse(id).map_err(|e| ProxyError::BadConnectionId(e.to_string()))?;
        let path = rest.split_once('?').map_or(rest, |(p, _)| p);
        if let Some(why) = destination::path_escape(path) {
            return Err(ProxyError::BadRequest(format!(
                "the path holds {why}, which could leave the connection's base URL path"
            )));
        }
        let token = match auth::proxy_credentials(req.headers()) {
            Ok(c) => Some(c.token),
            Err(CredentialsError::Missing) => None,
            Err(CredentialsError::Malformed) => return Err(ProxyError::ProxyAuthRequired(
                "Proxy-Authorization must be `Bearer {token}` or Basic with the token as password",
            )),
        };
        Ok(Routed::Named(Route {
            form: Form::Gateway,
            id,
            token,
            path_and_query: Cow::Borrowed(rest),
            requested: None,
        }))
    }

    fn route_forward<'u>(
        headers: &http::HeaderMap,
        uri: &'u Uri,
    ) -> Result<Routed<'u>, ProxyError> {
        let scheme = match uri.scheme_str() {
            // `ws://` and `wss://`, as some clients name a WebSocket's URL to a proxy.
            Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("ws") => {
                Scheme::Http
            }
            Some(s) if s.eq_ignore_ascii_case("https") || s.eq_ignore_ascii_case("wss") => {
                Scheme::Https
            }
            _ => {
                return Err(ProxyError::BadRequest(
                    "only http:// and https:// (or ws:// and wss://) URLs can be proxied".into(),
                ))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| ProxyError::BadRequest("no host".into()))?;
        if authority.as_str().contains('@') {
            return Err(ProxyError::BadRequest(
                "the request URL must not carry user information".into(),
            ));
        }
        let host = authority.host();
        let port = authority.port_u16();

        let mut hosts = headers.get_all(http::header::HOST).iter();
        if let Some(value) = hosts.next() {
            if hosts.next().is_some() {
                return Err(ProxyError::BadRequest("more than one Host header".into()));
            }
            let named = value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<Authority>().ok())
                .ok_or_else(|| ProxyError::BadRequest("the Host header is not a host".into()))?;
            let default = scheme.default_port();
            if normalize_host(named.host()) != normalize_host(host)
                || named.port_u16().unwrap_or(default) != port.unwrap_or(default)
            {
                return Err(ProxyError::BadRequest(format!(
                    "the Host header names {} but the request URL names {}",
                    named.as_str(),
                    authority.as_str()
                )));
            }
        }

        let requested = Requested { scheme, host, port };
        let path_and_query = Cow::Borrowed(uri.path_and_query().map_or("/", |p| p.as_str()));
        let (user, token) = match auth::proxy_credentials(headers) {
            Ok(creds) => (creds.user, Some(creds.token)),
            Err(CredentialsError::Missing) => (None, None),
            Err(CredentialsError::Malformed) => return Err(ProxyError::ProxyAuthRequired(
                "Proxy-Authorization must be Basic base64(connection_id:token) or Bearer {token}",
            )),
        };
        match user.filter(|u| !u.is_empty() && u != "_") {
            Some(user) => Ok(Routed::Named(Route {
                form: Form::Forward,
                id: ConnectionId::parse(&user)
                    .map_err(|e| ProxyError::BadConnectionId(e.to_string()))?,
                token,
                path_and_query,
                requested: Some(requested),
            })),
            None => Ok(Routed::Unnamed(Unnamed {
                form: Form::Forward,
                token,
                path_and_query,
                requested,
            })),
        }
    }

    /// A forward-form request that names no connection: the client, then its connection by
    /// placeholder or as the one granted connection that covers the host.
    async fn pick<'u>(
        &self,
        headers: &http::HeaderMap,
        unnamed: Unnamed<'u>,
        log: &mut AccessLog,
    ) -> Result<Route<'u>, ProxyError> {
        let req = &unnamed.requested;
        log.host = Some(Arc::from(normalize_host(req.host)));
        let client = self.authenticate(unnamed.token.as_ref())?;
        log.client = client.map(|c| c.name.clone());
        let what = req
            .port
            .map_or_else(|| req.host.to_string(), |p| format!("{}:{p}", req.host));
        let query = unnamed.path_and_query.split_once('?').map(|(_, q)| q);
        let named = placeholder(&self.token_places, headers, query)?;
        let candidates = if named.is_some() {
            Vec::new()
        } else {
            self.coverage
                .candidates(client, req.host, (req.port, req.scheme))
                .await
                .map_err(|_| ProxyError::CannotChoose(what.clone()))?
        };
        let id = choose(named, client, &candidates, &what)?;
        Ok(Route {
            form: unnamed.form,
            id,
            token: unnamed.token,
            path_and_query: unnamed.path_and_query,
            requested: Some(unnamed.requested),
        })
    }

    /// Takes every client token out of the request, from every place one may stand in
    /// (`Authorization` and the headers and query parameters the catalog's connectors use),
    /// however the client authenticated: a client token is latchkey's, never the upstream's (a
    /// workflow that authenticates in `Proxy-Authorization` and also gives its SDK the token as
    /// the API key would otherwise send it on, in whichever place the connection does not
    /// overwrite). In gateway form without `Proxy-Authorization`, the first one found is the
    /// request's token. Nothing to take when latchkey runs open (no client tokens).
    #[inline]
    fn take_client_tokens(
        &self,
        headers: &mut http::HeaderMap,
        route: &mut Route<'_>,
        known: Option<&Secret>,
    ) {
        if !self.clients.is_open() {
            self.take_client_tokens_from(headers, route, known);
        }
    }

    /// [`Proxy::take_client_tokens`] once there are client tokens to take.
    fn take_client_tokens_from(
        &self,
        headers: &mut http::HeaderMap,
        route: &mut Route<'_>,
        known: Option<&Secret>,
    ) {
        // The token the client authenticated with, in any header or query parameter at all.
        if let Some(token) = known.or(route.token.as_ref()) {
            without_token(headers, &mut route.path_and_query, token.expose());
        }
        let query = route.path_and_query.split_once('?').map(|(_, q)| q);
        let mut token = None;
        let mut places: Vec<Place> = Vec::new();
        for (candidate, place) in self.token_places.candidates(headers, query) {
            if self.clients.authenticate(&candidate).is_some() {
                token.get_or_insert(candidate);
                if !places.contains(&place) {
                    places.push(place);
                }
            }
        }
        let Some(token) = token else {
            return;
        };
        // A token found where the key goes is the one the client authenticated with (in
        // gateway form): taken out of everywhere else as well.
        if known.is_none() && route.token.is_none() {
            without_token(headers, &mut route.path_and_query, token.expose());
        }
        for place in places {
            match place {
                Place::Header(name) => {
                    headers.remove(name);
                }
                Place::Query(param) => {
                    let rest = auth::without_query_param(&route.path_and_query, &param);
                    route.path_and_query = Cow::Owned(rest);
                }
            }
        }
        if route.form == Form::Gateway && route.token.is_none() {
            route.token = Some(token);
        }
    }

    /// Phase 2: the client (named in the access log from here, a refusal included), and
    /// whether it may use the connection.
    fn authorize(
        &self,
        route: &Route<'_>,
        log: &mut AccessLog,
    ) -> Result<Option<&Client>, ProxyError> {
        let Some(client) = self.authenticate(route.token.as_ref())? else {
            return Ok(None);
        };
        log.client = Some(client.name.clone());
        if !client.may_use(route.id.as_str()) {
            return Err(ProxyError::ConnectionForbidden {
                client: client.name.to_string(),
                connection: route.id.to_string(),
            });
        }
        Ok(Some(client))
    }

    /// The client whose token this is; `None` when latchkey runs open (no `[[clients]]`).
    fn authenticate(&self, token: Option<&Secret>) -> Result<Option<&Client>, ProxyError> {
        if self.clients.is_open() {
            return Ok(None);
        }
        let token = token.ok_or(ProxyError::ProxyAuthRequired(
            "a client token is required: in Proxy-Authorization, or in gateway form where the API key goes",
        ))?;
        self.clients
            .authenticate(token)
            .map(Some)
            .ok_or(ProxyError::ProxyAuthRequired(
                "the client token is not valid",
            ))
    }

    /// Phase 3: the connection, through the cache. A client (the one authenticated, as the log
    /// names it; everyone alike when latchkey runs open) whose Vault reads keep finding nothing
    /// is served only from the cache until its miss limit refills ([`MissLimit`]).
    async fn connection(
        &self,
        id: &ConnectionId,
        log: &mut AccessLog,
    ) -> Result<Arc<Connection>, ProxyError> {
        // Most requests: a fresh hit, in one look at the map (a held connection never meets
        // the miss limit, so nothing is skipped).
        if let Some(conn) = self.cache.get_fresh(id) {
            log.cache = Some(CacheOutcome::Hit);
            return Ok(conn);
        }
        let client = log.client.as_deref().unwrap_or("");
        // A read of an ID the cache neither holds nor is reading takes a token first, so that
        // concurrent misses are limited as sequential ones are.
        let ticket = if self.cache.holds(id) {
            None
        } else {
            // Boxed: rare, and its wait would otherwise make every request's future larger.
            match Box::pin(self.misses.take(client)).await {
                Ok(ticket) => Some(ticket),
                Err(wait) => {
                    return Err(ProxyError::TooManyMisses {
                        client: client.to_string(),
                        retry_after: wait.as_secs().max(1),
                    })
                }
            }
        };
        let found = self.cache.get(id).await;
        // What found a connection (usable or not) costs nothing; an ID that is not there, or a
        // read Vault left unanswered, keeps its token.
        let missed = matches!(
            found,
            Err((CacheError::NotFound | CacheError::Unavailable(_), _))
        );
        if let Some(ticket) = ticket {
            if !missed {
                ticket.found();
            }
        }
        match found {
            Ok((conn, outcome)) => {
                log.cache = Some(outcome);
                Ok(conn)
            }
            Err((e, outcome)) => {
                log.cache = Some(outcome);
                Err(ProxyError::from_cache(id.as_str(), e))
            }
        }
    }

    /// Phase 4: the upstream's scheme, authority and path prefix, and the host for the log.
    fn upstream_peer<'c>(route: &Route<'_>, conn: &'c Connection) -> Result<Peer<'c>, ProxyError> {
        let Some(req) = &route.requested else {
            let base = &conn.base;
            return Ok(Peer {
                scheme: base.scheme,
                authority: Cow::Borrowed(&base.authority),
                path_prefix: &base.path,
                host: base.host.clone(),
            });
        };
        // A connection whose base URL is https never sends its credential in the clear.
        let (scheme, port) =
            destination::sent_to(conn.base.scheme == Scheme::Https, req.scheme, req.port);
        // Lower case, no trailing dot (`127.0.0.1.` is 127.0.0.1, and is dialled as such).
        let host = normalize_host(req.host);
        // The host and the port dialled: the credential goes to a host the connection names,
        // on its port, never to another port of the same host.
        if !conn.hosts.allows_at(&host, port) {
            return Err(ProxyError::HostNotAllowed {
                host: if conn.hosts.allows(&host) {
                    format!("{host}:{port}")
                } else {
                    host.clone()
                },
                connection: conn.id.to_string(),
                allowed: conn.hosts.iter().collect::<Vec<_>>().join(", "),
            });
        }
        let authority = Authority::from_maybe_shared(bytes::Bytes::from(destination::authority(
            &host, port, scheme,
        )))
        .map_err(|_| ProxyError::BadRequest("the request URL's host is not valid".into()))?;
        Ok(Peer {
            scheme,
            authority: Cow::Owned(authority),
            path_prefix: "",
            host: Arc::from(host),
        })
    }

    /// Phase 6 for a WebSocket: the handshake on a connection of its own, then the splice.
    /// The request timeout bounds the handshake only.
    async fn upgrade(
        &self,
        parts: http::request::Parts,
        client: websocket::ClientSide,
        log: &mut AccessLog,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let dialer = self.upstream.dialer();
        let opened = websocket::open(&dialer, parts, client);
        let response = match tokio::time::timeout(self.request_timeout, opened).await {
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout(format!(
                    "the upstream did not answer the WebSocket handshake within {:?}",
                    self.request_timeout
                )))
            }
            Ok(Err(e)) => return Err(ProxyError::from_upstream(&e)),
            Ok(Ok(r)) => r,
        };
        log.upstream_version = Some("http/1.1");
        Ok(response)
    }

    /// Phase 7: the credential does not come back. Header values are scrubbed, and the body,
    /// decoded first if the upstream compressed it although asked not to.
    fn scrub(
        response: Response<ResponseBody>,
        scrubber: &Arc<Scrubber>,
        bodiless: bool,
    ) -> Result<Response<Answer<ResponseBody>>, ProxyError> {
        use http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
        use http::StatusCode;
        let (mut parts, body) = response.into_parts();
        scrubber.headers(&mut parts.headers);
        let status = parts.status;
        if bodiless
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Response::from_parts(parts, Answer::pass(body)));
        }
        let codings = encoding::codings(&parts.headers).map_err(|name| {
            ProxyError::UpstreamUnreachable(format!(
                "the upstream answered in the content coding {name:?}, which latchkey cannot \
                 decode to keep the credential out of the answer (it asked for identity)"
            ))
        })?;
        // The framing of what goes back is the body's own (its size hint); latchkey's HTTP/1.1
        // client left framing headers out already.
        if parts.version == http::Version::HTTP_2 {
            parts.headers.remove(CONTENT_LENGTH);
        }
        if !codings.is_empty() {
            parts.headers.remove(CONTENT_ENCODING);
            // Another representation now: a strong validator would be a lie.
            weaken_etag(&mut parts.headers);
            let decoded = encoding::decoded(body.boxed_unsync(), &codings);
            let body = Answer::Decoded {
                inner: Box::pin(Scrubbed::new(decoded, None, scrubber)),
            };
            return Ok(Response::from_parts(parts, body));
        }
        // A body that came whole with its head (most small answers) is scrubbed whole and keeps
        // a length; any other streams as it comes, scrubbed and re-framed. Nothing waits here:
        // the first frame is taken only if it is already read.
        let mut body = body;
        let length = http_body::Body::size_hint(&body).exact();
        let first = match length {
            Some(0) => return Ok(Response::from_parts(parts, Answer::pass(body))),
            Some(_) => body.frame().now_or_never().flatten(),
            None => None,
        };
        let body = match first {
            Some(Err(e)) => {
                return Err(ProxyError::UpstreamUnreachable(format!(
                    "the upstream's answer's body failed: {e}"
                )))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data)
                    if Some(data.len() as u64) == length
                        && http_body::Body::is_end_stream(&body) =>
                {
                    Answer::Whole {
                        data: Some(scrubber.whole(data).0),
                    }
                }
                Ok(data) => Answer::Stream {
                    inner: Box::pin(Scrubbed::new(body, Some(Frame::data(data)), scrubber)),
                },
                Err(frame) => Answer::Stream {
                    inner: Box::pin(Scrubbed::new(body, Some(frame), scrubber)),
                },
            },
            None => Answer::Stream {
                inner: Box::pin(Scrubbed::new(body, None, scrubber)),
            },
        };
        Ok(Response::from_parts(parts, body))
    }
}

/// How a gateway-form request reached latchkey: its URI's authority, or else its `Host`
/// header, kept as it came and read as an authority only when an answer carries a `Location`
/// (most do not, and the parse was a visible share of every request).
enum ReachedAs {
    Authority(Authority),
    Host(http::HeaderValue),
}

impl ReachedAs {
    /// The authority, if the `Host` header is one.
    fn authority(&self) -> Option<Authority> {
        match self {
            ReachedAs::Authority(a) => Some(a.clone()),
            ReachedAs::Host(h) => Authority::try_from(h.as_bytes()).ok(),
        }
    }
}

/// A strong `ETag` made weak: the body it was given for has been decoded.
fn weaken_etag(headers: &mut http::HeaderMap) {
    let Some(tag) = headers.get(http::header::ETAG) else {
        return;
    };
    if tag.as_bytes().starts_with(b"W/") {
        return;
    }
    let mut weak = b"W/".to_vec();
    weak.extend_from_slice(tag.as_bytes());
    match http::HeaderValue::from_bytes(&weak) {
        Ok(v) => headers.insert(http::header::ETAG, v),
        Err(_) => headers.remove(http::header::ETAG),
    };
}

/// Serves one request of a client connection whose reads [`strict`] checks. The stand-in of a
/// refused head is answered `400 bad_request` (and the connection then closes); the answer to a
/// request that asks for an upgrade is told to the reader, which holds back what follows until
/// it knows whether the connection still carries HTTP/1.
pub async fn checked<B, F, E>(
    link: Arc<Link>,
    req: Box<Request<B>>,
    serve: impl FnOnce(Box<Request<B>>) -> F,
) -> Result<Response<BoxBody>, E>
where
    F: std::future::Future<Output = Result<Response<BoxBody>, E>>,
{
    if let Some(reason) = link.refused(req.uri().path()) {
        return Ok(not_strict(reason));
    }
    let asks = strict::asks_upgrade(&req);
    let connect = req.method() == Method::CONNECT;
    let answer = serve(req).await;
    if asks {
        let switched = answer.as_ref().is_ok_and(|r| {
            r.status() == http::StatusCode::SWITCHING_PROTOCOLS
                || (connect && r.status().is_success())
        });
        link.answered(switched);
    }
    answer
}

/// latchkey's `400` for a request that [`strict`] refused, with its access line.
pub fn not_strict(reason: &str) -> Response<BoxBody> {
    let log = AccessLog {
        method: Method::from_bytes(b"-").unwrap_or_default(),
        status: 400,
        error: Some("bad_request"),
        ..AccessLog::default()
    };
    tracing::debug!(reason, "request refused: not strict HTTP/1.1");
    log.emit(Duration::ZERO);
    let mut response =
        ProxyError::BadRequest(format!("the request is not strict HTTP/1.1: {reason}"))
            .into_response();
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

/// A `Location` on the connection's own base URL, or on latchkey itself as the client reached
/// it (`reached_as`), in the gateway's `/{connection_id}/...` form, so that a redirect never
/// turns into a request through another connection.
fn gateway_location(
    headers: &mut http::HeaderMap,
    conn: &Connection,
    asked: &str,
    reached_as: Option<&ReachedAs>,
) {
    let Some(location) = headers.get(http::header::LOCATION) else {
        return;
    };
    let reached_as = reached_as.and_then(ReachedAs::authority);
    // Bytes past ASCII are read as UTF-8 (lossily) rather than skipped: a client may follow
    // such a Location too.
    let location = String::from_utf8_lossy(location.as_bytes()).into_owned();
    let Some(rewritten) = destination::gateway_location(
        &location,
        &conn.base,
        asked,
        conn.id.as_str(),
        reached_as.as_ref().map(Authority::as_str),
    ) else {
        return;
    };
    match http::HeaderValue::try_from(rewritten) {
        Ok(value) => {
            headers.insert(http::header::LOCATION, value);
        }
        // Not expected (the rewrite comes from a parsed URL), but a Location that could not be
        // rewritten is not passed on as it was: it may name another connection.
        Err(_) => {
            headers.remove(http::header::LOCATION);
        }
    }
}

/// `path` with every form of a connection's key in it replaced, as in answers.
fn unquoted(path: LogPath, scrubber: &Scrubber) -> LogPath {
    match scrubber.text(path.as_str()) {
        Cow::Borrowed(_) => path,
        Cow::Owned(masked) => LogPath::Masked(masked),
    }
}

/// Takes out of a request every header and every query parameter with `token` in its value
/// (as it is, percent-decoded, in base64 when the token is 12 bytes or longer, or inside
/// `Basic` credentials, as user name or password). An empty token is in everything: nothing
/// is done.
fn without_token(headers: &mut http::HeaderMap, path_and_query: &mut Cow<'_, str>, token: &str) {
    use base64::Engine as _;
    if token.is_empty() {
        return;
    }
    // The token's whole base64 groups (what does not depend on what follows it); none for a
    // token too short for them to say anything.
    let groups = if token.len() >= 12 {
        token.len() / 3 * 4
    } else {
        0
    };
    let encoded: Vec<String> = [
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(token),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token),
    ]
    .into_iter()
    .filter(|_| groups > 0)
    .map(|mut e| {
        e.truncate(groups);
        e
    })
    .collect();
    let holds = |value: &[u8]| {
        let has = |v: &[u8]| memchr::memmem::find(v, token.as_bytes()).is_some();
        if has(value)
            || encoded
                .iter()
                .any(|e| memchr::memmem::find(value, e.as_bytes()).is_some())
        {
            return true;
        }
        if value.contains(&b'%')
            && has(&percent_encoding::percent_decode(value).collect::<Vec<u8>>())
        {
            return true;
        }
        // `Basic base64(user:password)`, the token as either.
        let basic = value
            .get(..6)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"basic "));
        basic
            && base64::engine::general_purpose::STANDARD
                .decode(value.get(6..).unwrap_or_default().trim_ascii())
                .is_ok_and(|pair| has(&pair))
    };
    let holding: Vec<http::HeaderName> = headers
        .iter()
        .filter(|(_, v)| holds(v.as_bytes()))
        .map(|(n, _)| n.clone())
        .collect();
    for name in holding {
        headers.remove(name);
    }
    let Some((_, query)) = path_and_query.split_once('?') else {
        return;
    };
    // A pair's value percent-decoded once more than `holds` does: base64's `+`, `/` and `=`
    // are percent-encoded in a query.
    let holds = |pair: &str| {
        holds(pair.as_bytes())
            || (pair.contains('%')
                && holds(&percent_encoding::percent_decode_str(pair).collect::<Vec<u8>>()))
    };
    if query.split('&').any(holds) {
        *path_and_query = Cow::Owned(auth::without_query_pairs(path_and_query, holds));
    }
}

/// Which connection a request that named none uses, in PRODUCT.md's order: a
/// `latchkey.{id}` placeholder where the key goes (that the client may use), else the one
/// candidate (granted and covering the destination `what`); several is
/// `connection_ambiguous`, none `host_not_allowed`.
fn choose(
    named: Option<ConnectionId>,
    grant: Option<&Client>,
    candidates: &[ConnectionId],
    what: &str,
) -> Result<ConnectionId, ProxyError> {
    if let Some(id) = named {
        if let Some(client) = grant {
            if !client.may_use(id.as_str()) {
                return Err(ProxyError::ConnectionForbidden {
                    client: client.name.to_string(),
                    connection: id.to_string(),
                });
            }
        }
        return Ok(id);
    }
    match candidates {
        [one] => Ok(one.clone()),
        [] => Err(ProxyError::NotCovered(format!(
            "no connection this client may use covers {what}; name one as the proxy user name, or put latchkey.{{connection_id}} where the API key goes"
        ))),
        many => Err(ProxyError::ConnectionAmbiguous(format!(
            "connections {} all cover {what}: name one as the proxy user name, or put latchkey.{{connection_id}} where the API key goes",
            many.iter().map(ConnectionId::as_str).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The places of the catalog's credentials: each header and query parameter a connector sets
/// or strips.
fn token_places(catalog: &Catalog) -> TokenPlaces {
    let mut headers = Vec::new();
    let mut query = Vec::new();
    for connector in catalog.iter() {
        match &connector.inject {
            Inject::Header { header, .. } => headers.push(header.clone()),
            Inject::Query { param, .. } => query.push(param.clone()),
            Inject::Bearer { .. } | Inject::Basic { .. } => {}
        }
        headers.extend(connector.strip.iter().cloned());
    }
    TokenPlaces::new(headers, query)
}

/// The connection a `latchkey.{connection_id}` placeholder names where an SDK configured with
/// `api_key = "latchkey.stripe-prod"` puts its key: the whole token in one of the catalog's key
/// places (a header's value after its scheme word, either half of an `Authorization: Basic`
/// pair, a key query parameter's value). The same text anywhere else (a `Referer`, a trace
/// header, a callback URL in the query) names nothing. A token that starts with `latchkey.`
/// but is not followed by a connection ID alone is 400 `bad_connection_id`, not read as a
/// shorter ID; placeholders in two places that name two connections are 400
/// `connection_ambiguous`, not decided by which place is looked at first.
fn placeholder(
    places: &TokenPlaces,
    headers: &http::HeaderMap,
    query: Option<&str>,
) -> Result<Option<ConnectionId>, ProxyError> {
    let mut named: Option<ConnectionId> = None;
    for (token, _) in places.candidates(headers, query) {
        let Some(id) = token.expose().strip_prefix(PLACEHOLDER) else {
            continue;
        };
        let id = ConnectionId::parse(id).map_err(|_| {
            ProxyError::BadConnectionId(format!(
                "a {PLACEHOLDER}{{connection_id}} placeholder must hold a connection ID alone (letters, digits, - and _)"
            ))
        })?;
        match &named {
            None => named = Some(id),
            Some(first) if *first == id => {}
            Some(first) => {
                return Err(ProxyError::ConnectionAmbiguous(format!(
                    "placeholders name two connections, {first} and {id}: name one"
                )))
            }
        }
    }
    Ok(named)
}

/// What a placeholder starts with.
const PLACEHOLDER: &str = "latchkey.";

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

pin_project_lite::pin_project! {
    /// A client's request body without its trailers. They are never sent on: a trailer could
    /// carry a credential of the client's own (`Authorization`, the connector's header) past
    /// the strip, which sees only the head, and no client needs them (gRPC clients send none;
    /// the HTTP/1.1 exchange upstream never sent them on either).
    struct NoTrailers<B> {
        #[pin]
        inner: B,
    }
}

impl<B> NoTrailers<B> {
    fn new(inner: B) -> Self {
        NoTrailers { inner }
    }
}

impl<B: http_body::Body> http_body::Body for NoTrailers<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        loop {
            match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) if frame.is_trailers() => continue,
                other => return std::task::Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_taken_out_of_every_header_and_query_parameter_holding_it() {
        let token = "tok-0123456789";
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer tok-0123456789".parse().unwrap());
        headers.append("x-any", "kept".parse().unwrap());
        headers.append("x-any", "tok-0123456789".parse().unwrap());
        headers.insert("x-other", "kept".parse().unwrap());
        headers.insert("x-b64", "dG9rLTAxMjM0NTY3ODk=".parse().unwrap()); // "tok-0123456789"
        headers.insert("x-pct", "run%20tok%2D0123456789".parse().unwrap());
        headers.insert("x-basic", "Basic dG9rLTAxMjM0NTY3ODk6".parse().unwrap()); // "tok-0123456789:"
        let mut path = Cow::Borrowed(
            "/p?a=1&key=tok-0123456789&b=x%20tok%2D0123456789&c=3&d=dG9rLTAxMjM0NTY3ODk%3D\
             &e=dG9rLTAxMjM0NTY3ODk&f=Basic%20dG9rLTAxMjM0NTY3ODk6",
        );
        without_token(&mut headers, &mut path, token);
        assert_eq!(path, "/p?a=1&c=3");
        let names: Vec<_> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-other"]);

        // Nothing holding it: nothing changes, nothing is copied.
        let mut path = Cow::Borrowed("/p?a=1");
        without_token(&mut headers, &mut path, token);
        assert!(matches!(path, Cow::Borrowed("/p?a=1")));
        let mut path = Cow::Borrowed("/p?key=tok-0123456789");
        without_token(&mut headers, &mut path, token);
        assert_eq!(path, "/p");
        // An empty token is in everything, and takes nothing.
        let mut path = Cow::Borrowed("/p?a=1");
        without_token(&mut headers, &mut path, "");
        assert_eq!(path, "/p?a=1");
        assert_eq!(headers.len(), 1);
    }
}
