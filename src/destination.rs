//! Where a credential may go: a connection's base URL (scheme, host, port, path), the host
//! allow-list, and the address check made on the socket address that is actually dialled.
//!
//! The host check runs on names, before anything is resolved. The address check runs in the
//! upstream connector on every resolved address just before `connect`, so a literal IP written
//! in any form (`2130706433`, `[::ffff:127.0.0.1]`) and a name that resolves somewhere private
//! are judged by where the socket would really go.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// Where a request that named `scheme` and `port` goes for a connection whose base URL is
/// https (`base_https`) or not: over TLS whenever the base URL is (a credential never goes in
/// the clear), to the port named unless it is the named scheme's default, which stands for
/// the default port of the scheme it goes over. The proxy dials this; the host index matches
/// candidates on it.
pub fn sent_to(base_https: bool, scheme: Scheme, port: Option<u16>) -> (Scheme, u16) {
    let over = if base_https { Scheme::Https } else { scheme };
    let port = match port {
        Some(p) if p != scheme.default_port() => p,
        _ => over.default_port(),
    };
    (over, port)
}

/// A connection's base URL: scheme, host, port and a path prefix without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub scheme: Scheme,
    /// Lower case; IPv6 literals keep their brackets. Shared, for the access log.
    pub host: Arc<str>,
    pub port: u16,
    pub explicit_port: bool,
    pub path: String,
    /// `host` or `host:port` when the port is not the scheme's default, parsed once.
    pub authority: http::uri::Authority,
}

impl BaseUrl {
    /// Parses a base URL. Errors never quote it: a key pasted into a URL (as user information
    /// or a query parameter) must not come back in an answer or a log line.
    pub fn parse(s: &str) -> Result<BaseUrl, String> {
        let uri: http::Uri = s.parse().map_err(|_| "is not a URL".to_string())?;
        let scheme = match uri.scheme_str() {
            Some("https") => Scheme::Https,
            Some("http") => Scheme::Http,
            _ => return Err("must start with https:// or http://".into()),
        };
        let authority = uri.authority().ok_or("has no host")?;
        if authority.as_str().contains('@') {
            return Err(
                "must not carry user information (a key belongs in the connection's secret field)"
                    .into(),
            );
        }
        let host = authority.host().to_ascii_lowercase();
        if host.is_empty() {
            return Err("has no host".into());
        }
        if uri.query().is_some() || s.contains('#') {
            return Err(
                "must not have a query or fragment (a key belongs in the connection's secret field)"
                    .into(),
            );
        }
        let path = uri.path().trim_end_matches('/').to_string();
        let port = authority.port_u16().unwrap_or(scheme.default_port());
        Ok(BaseUrl {
            scheme,
            authority: http::uri::Authority::from_maybe_shared(bytes::Bytes::from(
                self::authority(&host, port, scheme),
            ))
            .map_err(|_| "has no valid host".to_string())?,
            host: Arc::from(host),
            port,
            explicit_port: authority.port_u16().is_some(),
            path,
        })
    }
}

pub fn authority(host: &str, port: u16, scheme: Scheme) -> String {
    if port == scheme.default_port() {
        host.to_string()
    } else {
        format!("{host}:{port}")
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme.as_str(),
            self.authority,
            self.path
        )
    }
}

/// The hosts one connection's credential may reach, each on its port: exact names (or IP
/// literals) and `*.suffix` patterns, all lower case without a trailing dot. An entry without a
/// port means the base URL scheme's port; the base URL's own host is on the base URL's port.
#[derive(Debug, Clone, Default)]
pub struct HostAllowList {
    entries: Vec<HostEntry>,
    /// The port of an entry that names none (443 for an https base URL, 80 for http).
    default_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HostEntry {
    pattern: String,
    port: Option<u16>,
    /// `pattern` or `pattern:port`, as shown in messages and the admin API.
    shown: String,
}

impl HostAllowList {
    /// A list holding the base URL's host on its port; entries added later without a port
    /// mean `default_port`.
    pub fn new(base_host: &str, base_port: u16, default_port: u16) -> Self {
        let pattern = normalize_host(base_host);
        let shown = if base_port == default_port {
            pattern.clone()
        } else {
            format!("{pattern}:{base_port}")
        };
        HostAllowList {
            entries: vec![HostEntry {
                pattern,
                port: Some(base_port),
                shown,
            }],
            default_port,
        }
    }

    /// Adds a host or `*.suffix` pattern, either with `:port`, checking its shape.
    pub fn push(&mut self, entry: &str) -> Result<(), String> {
        let (pattern, port) = split_host_port(entry.trim())?;
        let pattern = normalize_host_pattern(pattern)?;
        let shown = match port {
            Some(p) => format!("{pattern}:{p}"),
            None => pattern.clone(),
        };
        let entry = HostEntry {
            pattern,
            port,
            shown,
        };
        if !self.entries.contains(&entry) {
            self.entries.push(entry);
        }
        Ok(())
    }

    /// Whether `host` (as written in a URL, IPv6 in brackets allowed) is on the list, on some
    /// port.
    pub fn allows(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.entries
            .iter()
            .any(|e| pattern_matches(&e.pattern, &host))
    }

    /// Whether `host` is on the list on `port`.
    pub fn allows_at(&self, host: &str, port: u16) -> bool {
        let host = normalize_host(host);
        self.entries.iter().any(|e| {
            e.port.unwrap_or(self.default_port) == port && pattern_matches(&e.pattern, &host)
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.shown.as_str())
    }

    /// The entries of this list that `other` does not cover (a host on a port, or a
    /// `*.suffix` pattern on a port, that `other` allows no part of is not covered), as shown:
    /// where a credential held to `other` could not go and one held to this list could.
    pub fn beyond<'a>(&'a self, other: &HostAllowList) -> Vec<&'a str> {
        self.entries
            .iter()
            .filter(|e| {
                let port = e.port.unwrap_or(self.default_port);
                !other.entries.iter().any(|o| {
                    o.port.unwrap_or(other.default_port) == port
                        && match (e.pattern.strip_prefix("*."), o.pattern.strip_prefix("*.")) {
                            (None, _) => pattern_matches(&o.pattern, &e.pattern),
                            // `*.a.b` within `*.b`; a pattern within an exact host never.
                            (Some(inner), Some(_)) => {
                                o.pattern == e.pattern || pattern_matches(&o.pattern, inner)
                            }
                            (Some(_), None) => false,
                        }
                })
            })
            .map(|e| e.shown.as_str())
            .collect()
    }
}

fn pattern_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            let label_end = host.len().saturating_sub(suffix.len() + 1);
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[label_end] == b'.'
                // What stands for `*` is one or more labels, none of them empty (`..sub.test`
                // is not a host name under `sub.test`).
                && host.as_bytes()[..label_end]
                    .split(|b| *b == b'.')
                    .all(|label| !label.is_empty())
        }
        None => pattern == host,
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address; the port 1 to 65535.
fn split_host_port(entry: &str) -> Result<(&str, Option<u16>), String> {
    let port_of = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{entry:?} has a port that is not 1 to 65535"))
    };
    if entry.starts_with('[') {
        let close = entry
            .find(']')
            .ok_or_else(|| format!("{entry:?} opens a bracket it does not close"))?;
        let (host, rest) = entry.split_at(close + 1);
        return match rest.strip_prefix(':') {
            Some(p) => Ok((host, Some(port_of(p)?))),
            None if rest.is_empty() => Ok((host, None)),
            None => Err(format!("{entry:?} is not a host or host:port")),
        };
    }
    if entry.parse::<Ipv6Addr>().is_ok() {
        return Ok((entry, None));
    }
    match entry.rsplit_once(':') {
        Some((host, p)) => Ok((host, Some(port_of(p)?))),
        None => Ok((entry, None)),
    }
}

/// `proxy.passthrough`: hosts (and `*.suffix` patterns) whose CONNECTs are spliced without TLS
/// termination and without a credential, each on port 443 or on the port its entry names.
#[derive(Debug, Clone, Default)]
pub struct Passthrough {
    entries: Vec<(HostAllowList, u16)>,
}

impl Passthrough {
    /// Adds `host`, `*.suffix`, or either with `:port`.
    pub fn push(&mut self, entry: &str) -> Result<(), String> {
        let (pattern, port) = match entry.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(':') && !host.is_empty() => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{entry:?} has a port that is not 1 to 65535"))?;
                (host, port)
            }
            _ => (entry, 443),
        };
        let mut hosts = HostAllowList::default();
        hosts.push(pattern)?;
        self.entries.push((hosts, port));
        Ok(())
    }

    /// Whether a CONNECT to `host` and `port` is spliced.
    pub fn covers(&self, host: &str, port: u16) -> bool {
        self.entries
            .iter()
            .any(|(hosts, p)| *p == port && hosts.allows(host))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How many times [`path_escape`] percent-decodes a path looking for a dot segment. A server
/// or a proxy behind the upstream that decodes once more than it should climbs on `%252e%252e`;
/// one that decodes over and over is not worth following further: a path still encoded after
/// this many rounds is refused.
const MAX_DECODES: usize = 4;

/// Why a gateway path could leave the base URL's path, `None` for a path that stays inside.
///
/// A `.` or `..` segment is looked for as every server on the way might read the path: as
/// written, then percent-decoded again and again (`%2e%2e`, `%252e%252e`), up to
/// [`MAX_DECODES`] times; with an encoded slash or backslash (`%2f`, `%5c`) and a backslash as
/// segment boundaries (`..%2fadmin`); with the path parameters Tomcat and Spring drop from a
/// segment before resolving it (`..;x=1`, `%2e%2e%3b`). The escapes some servers read as a dot
/// or a slash although no standard does, overlong UTF-8 (`%c0%ae`) and IIS's `%u002e`, are
/// refused wherever they appear. An encoded slash inside a segment name (`group%2Fproject`, as
/// GitLab's API takes) is fine.
pub fn path_escape(path: &str) -> Option<&'static str> {
    // Most paths hold neither a dot nor an escape: nothing to look at. A `;` alone cannot
    // make a dot segment: with no dot and no escape there is no dot to hide behind it.
    if !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return None;
    }
    let mut current: Cow<'_, [u8]> = Cow::Borrowed(path.as_bytes());
    for _ in 0..=MAX_DECODES {
        if has_dot_segment(&current) {
            return Some("a `.` or `..` segment");
        }
        if has_overlong_utf8(&current) {
            return Some("an overlong UTF-8 sequence");
        }
        if has_iis_unicode_escape(&current) {
            return Some("a `%u` escape");
        }
        let decoded: Cow<'_, [u8]> = percent_encoding::percent_decode(&current).into();
        if *decoded == *current {
            return None;
        }
        current = Cow::Owned(decoded.into_owned());
    }
    Some("percent-encoding nested too deep")
}

/// Whether a segment of `path` (split at `/` and `\`) is `.` or `..` once what follows a `;`
/// (path parameters) or a NUL is dropped.
fn has_dot_segment(path: &[u8]) -> bool {
    path.split(|&b| b == b'/' || b == b'\\').any(|segment| {
        let name = segment
            .split(|&b| b == b';' || b == 0)
            .next()
            .unwrap_or_default();
        name == b"." || name == b".."
    })
}

/// Whether `bytes` hold a UTF-8 lead byte that can only start an overlong form: `C0` and `C1`
/// (two bytes for an ASCII character), `E0` then `80`-`9F`, `F0` then `80`-`8F`.
fn has_overlong_utf8(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, &b)| {
        let next = bytes.get(i + 1).copied().unwrap_or(0);
        matches!(b, 0xC0 | 0xC1)
            || (b == 0xE0 && (0x80..=0x9F).contains(&next))
            || (b == 0xF0 && (0x80..=0x8F).contains(&next))
    })
}

/// Whether `bytes` hold `%u` and four hex digits, IIS's escape for a UTF-16 code unit.
fn has_iis_unicode_escape(bytes: &[u8]) -> bool {
    bytes.windows(6).any(|w| {
        w[0] == b'%' && w[1].eq_ignore_ascii_case(&b'u') && w[2..].iter().all(u8::is_ascii_hexdigit)
    })
}

/// A `Location` answered to a gateway-form request, as the client must see it (PRODUCT.md
/// section 4, step 7). The client resolves a relative `Location` against the gateway URL, so
/// `/other-conn/x` from an upstream would send its next request through another connection.
/// `location` is resolved against the upstream URL that was asked (`request_path`, a path and
/// query); on the base URL's origin and under its path it becomes `/{id}/...`; on that origin
/// but outside the path, the upstream's absolute URL (which a client reaches without latchkey,
/// so without the key). A Location elsewhere is left as it is: `None`.
///
/// `reached_as` is the authority the client used to reach latchkey (its `Host` or
/// `:authority`). A Location on that authority, or on a loopback or unspecified address at
/// its port (`localhost:8080` when the client came to `127.0.0.1:8080`), would take a
/// following client to latchkey itself, through whichever connection its path names: it is
/// read as the path, query and fragment it carries, as though the upstream had sent them
/// alone, and so it too ends under `/{id}/...` or on the upstream's origin, never `None`.
pub fn gateway_location(
    location: &str,
    base: &BaseUrl,
    request_path: &str,
    id: &str,
    reached_as: Option<&str>,
) -> Option<String> {
    let asked = url::Url::parse(&format!(
        "{}://{}{}",
        base.scheme.as_str(),
        base.authority,
        request_path
    ))
    .ok()?;
    let mut target = asked.join(location).ok()?;
    let gateway = reached_as.and_then(|a| url::Url::parse(&format!("http://{a}/")).ok());
    if gateway.is_some_and(|g| names_gateway(&target, &g)) {
        // Set part by part, not joined: a path such as `//elsewhere/x` must stay a path.
        let mut carried = asked.clone();
        carried.set_path(target.path());
        carried.set_query(target.query());
        carried.set_fragment(target.fragment());
        target = carried;
    }
    let same_origin = target.scheme() == base.scheme.as_str()
        && target.host_str().map(normalize_host).as_deref() == Some(&*base.host)
        && target.port_or_known_default() == Some(base.port);
    if !same_origin {
        return None;
    }
    let path = target.path();
    let rest = match path.strip_prefix(base.path.as_str()) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => return Some(target.to_string()),
    };
    let mut out = format!("/{id}{rest}");
    if let Some(q) = target.query() {
        out.push('?');
        out.push_str(q);
    }
    if let Some(f) = target.fragment() {
        out.push('#');
        out.push_str(f);
    }
    Some(out)
}

/// Whether a client following `target` reaches the gateway it reached as `gateway`: the same
/// port, and the same host or one that is the client's own machine (loopback, or `0.0.0.0`
/// and `::`, which connect to it).
fn names_gateway(target: &url::Url, gateway: &url::Url) -> bool {
    if target.port_or_known_default() != gateway.port_or_known_default() {
        return false;
    }
    let own_machine = match target.host() {
        Some(url::Host::Domain(d)) => {
            let d = normalize_host(d);
            d == "localhost" || d.ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback() || ip.is_unspecified(),
        Some(url::Host::Ipv6(ip)) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_unspecified())
        }
        None => false,
    };
    own_machine
        || (target.host_str().is_some()
            && target.host_str().map(normalize_host) == gateway.host_str().map(normalize_host))
}

/// Lower case, no trailing dot, IPv6 literals in brackets.
pub fn normalize_host(host: &str) -> String {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    if !h.starts_with('[') && h.parse::<Ipv6Addr>().is_ok() {
        format!("[{h}]")
    } else {
        h
    }
}

/// Checks and normalizes an allowed-host entry: a DNS name, an IP literal, or `*.` and a name
/// under a registrable domain: never `*.` and a public suffix (`*.com`, `*.co.uk`), a single
/// label, or something that ends like an IP address (`*.0.0.1`).
pub fn normalize_host_pattern(pattern: &str) -> Result<String, String> {
    let p = pattern.trim();
    let (wild, name) = match p.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, p),
    };
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    let ok = if bare.parse::<IpAddr>().is_ok() {
        !wild
    } else {
        !name.is_empty()
            && name.len() <= 253
            && name.trim_end_matches('.').split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
    };
    if !ok {
        return Err(format!(
            "{pattern:?} is not a host name, an IP address or a *.domain pattern"
        ));
    }
    if !wild {
        return Ok(normalize_host(name));
    }
    let name = normalize_host(name);
    let last = name.rsplit('.').next().unwrap_or_default();
    let public_suffix = psl::suffix(name.as_bytes())
        .is_some_and(|s| s.as_bytes().len() == name.len() && s.typ() == Some(psl::Type::Icann));
    if !name.contains('.') || last.bytes().all(|b| b.is_ascii_digit()) || public_suffix {
        return Err(format!(
            "{pattern:?} is too wide: a wildcard must be under a registrable domain (*.example.com), never a public suffix or an address"
        ));
    }
    Ok(format!("*.{name}"))
}

/// Why an address may not be dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    pub ip: IpAddr,
    pub range: &'static str,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is a {} address; allow it with proxy.allow_private_destinations",
            self.ip, self.range
        )
    }
}

/// Ranges that are never dialled unless the configuration allows them, with the words used to
/// explain a refusal. Cloud metadata endpoints (169.254.169.254, fd00:ec2::254,
/// 100.100.100.200) fall inside the link-local, unique-local and shared ranges.
const BLOCKED_V4: &[(Ipv4Addr, u8, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "this-network"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        "shared (carrier-grade NAT)",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback"),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local (cloud metadata)",
    ),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private"),
    (Ipv4Addr::new(192, 0, 0, 0), 24, "IETF protocol"),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private"),
    (Ipv4Addr::new(198, 18, 0, 0), 15, "benchmarking"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved"),
];

const BLOCKED_V6: &[(Ipv6Addr, u8, &str)] = &[
    (Ipv6Addr::UNSPECIFIED, 128, "unspecified"),
    (Ipv6Addr::LOCALHOST, 128, "loopback"),
    (Ipv6Addr::new(0x0100, 0, 0, 0, 0, 0, 0, 0), 64, "discard"),
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        "unique-local (private)",
    ),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "link-local"),
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10, "site-local"),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, "multicast"),
];

/// The address check, with the configuration's explicit allowances.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn new(allow: Vec<IpNet>) -> Self {
        AddressPolicy { allow }
    }

    /// Checks one resolved address.
    pub fn check(&self, ip: IpAddr) -> Result<(), Blocked> {
        let ip = canonical(ip);
        let Some(range) = blocked_range(ip) else {
            return Ok(());
        };
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        Err(Blocked { ip, range })
    }
}

/// IPv4 addresses carried inside IPv6 ones are judged as IPv4: mapped (`::ffff:a.b.c.d`),
/// compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`).
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified() {
        return IpAddr::V4(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(tail);
    }
    if s[0] == 0x2002 {
        return IpAddr::V4(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    ip
}

fn blocked_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_broadcast() {
                return Some("broadcast");
            }
            let bits = u32::from(v4);
            BLOCKED_V4.iter().find_map(|(net, len, name)| {
                let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                (bits & mask == u32::from(*net) & mask).then_some(*name)
            })
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            BLOCKED_V6.iter().find_map(|(net, len, name)| {
                let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                (bits & mask == u128::from(*net) & mask).then_some(*name)
            })
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn what_one_host_list_allows_beyond_another() {
        let list = |base: &str, port: u16, extra: &[&str]| {
            let mut l = HostAllowList::new(base, port, 443);
            for e in extra {
                l.push(e).unwrap();
            }
            l
        };
        let before = list(
            "api.stripe.com",
            443,
            &["*.stripe.com", "files.example.com:8443"],
        );
        // The same, a subset, a host inside a pattern, a narrower pattern: nothing new.
        for after in [
            list("api.stripe.com", 443, &[]),
            list("uploads.stripe.com", 443, &["files.example.com:8443"]),
            list("api.stripe.com", 443, &["*.eu.stripe.com"]),
        ] {
            assert!(
                after.beyond(&before).is_empty(),
                "{:?}",
                after.iter().collect::<Vec<_>>()
            );
        }
        // Another host, another port, a wider pattern, the pattern's own apex.
        for (after, new) in [
            (list("evil.example", 443, &[]), "evil.example"),
            (list("api.stripe.com", 8443, &[]), "api.stripe.com:8443"),
            (
                list("api.stripe.com", 443, &["*.example.com"]),
                "*.example.com",
            ),
            (list("stripe.com", 443, &[]), "stripe.com"),
            (
                list("api.stripe.com", 443, &["files.example.com"]),
                "files.example.com",
            ),
        ] {
            assert_eq!(after.beyond(&before), vec![new]);
        }
    }
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_private_and_special_ranges() {
        let p = AddressPolicy::default();
        for bad in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.5.4",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(p.check(ip(bad)).is_err(), "{bad} should be blocked");
        }
        for good in [
            "93.184.216.34",
            "1.1.1.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert!(p.check(ip(good)).is_ok(), "{good} should pass");
        }
        let e = p.check(ip("::ffff:127.0.0.1")).unwrap_err();
        assert_eq!(e.ip, ip("127.0.0.1"));
        assert_eq!(e.range, "loopback");
    }

    #[test]
    fn explicit_allowances() {
        let p = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(p.check(ip("127.0.0.2")).is_ok());
        assert!(p.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(p.check(ip("10.0.0.1")).is_err());
        // Allowing loopback does not allow metadata.
        assert!(p.check(ip("169.254.169.254")).is_err());
    }

    #[test]
    fn host_lists() {
        let mut l = HostAllowList::new("API.Stripe.com.", 443, 443);
        l.push("files.stripe.com").unwrap();
        l.push("*.example.com").unwrap();
        l.push("::1").unwrap();
        l.push("uploads.example.org:8443").unwrap();
        l.push("[::2]:9000").unwrap();
        assert!(l.allows("api.stripe.com"));
        assert!(l.allows("API.STRIPE.COM."));
        assert!(l.allows("files.stripe.com"));
        assert!(l.allows("a.example.com"));
        assert!(l.allows("a.b.example.com"));
        assert!(!l.allows("example.com"));
        assert!(!l.allows("evilexample.com"));
        // What stands for `*` has no empty label.
        assert!(!l.allows(".example.com"));
        assert!(!l.allows("..example.com"));
        assert!(!l.allows("a..example.com"));
        assert!(!l.allows(".a.example.com"));
        assert!(!l.allows("stripe.com"));
        assert!(!l.allows("api.stripe.com.evil.com"));
        assert!(l.allows("[::1]"));
        assert!(l.allows_at("api.stripe.com", 443));
        assert!(!l.allows_at("api.stripe.com", 8443));
        assert!(l.allows_at("a.example.com", 443));
        assert!(!l.allows_at("a.example.com", 80));
        assert!(l.allows_at("uploads.example.org", 8443));
        assert!(!l.allows_at("uploads.example.org", 443));
        assert!(l.allows_at("[::2]", 9000));
        assert!(l.allows_at("[::1]", 443));
        assert_eq!(
            l.iter().collect::<Vec<_>>(),
            [
                "api.stripe.com",
                "files.stripe.com",
                "*.example.com",
                "[::1]",
                "uploads.example.org:8443",
                "[::2]:9000"
            ]
        );
        // The base URL's own port, and only it, on its host.
        let l = HostAllowList::new("127.0.0.1", 18081, 80);
        assert!(l.allows_at("127.0.0.1", 18081));
        assert!(!l.allows_at("127.0.0.1", 80));
        assert_eq!(l.iter().collect::<Vec<_>>(), ["127.0.0.1:18081"]);
        for bad in [
            "",
            "a b",
            "*.*.x",
            "http://x",
            "x/y",
            "*.1.2.3.4",
            "*.com",
            "*.co.uk",
            "*.0.0.1",
            "*.internal",
            "x.com:0",
            "x.com:99999",
            "[::1",
            "[::1]x",
        ] {
            let mut l = HostAllowList::default();
            assert!(l.push(bad).is_err(), "{bad:?}");
        }
        // A private-section suffix is a registrable domain's place: *.myshopify.com is fine.
        assert!(normalize_host_pattern("*.myshopify.com").is_ok());
    }

    #[test]
    fn gateway_paths_cannot_climb() {
        for bad in [
            "/../x",
            "/a/..",
            "/%2e%2e/x",
            "/.%2E/x",
            "/%2E./x",
            "/./x",
            "/a%2F..",
            "/..%2fx",
            "/a%5c..%5cb",
            "/a\\..\\b",
            // Decoded twice or more by someone behind the upstream.
            "/%252e%252e/admin",
            "/..%252fadmin",
            "/.%252E/x",
            "/%25252e%25252e/admin",
            "/..%255cadmin",
            "/%%32%65%%32%65/admin",
            // Path parameters dropped before the segment is resolved.
            "/..;/admin",
            "/..;x=1/admin",
            "/.;/x",
            "/%2e%2e;/admin",
            "/..%3b/admin",
            "/..%253bx/admin",
            "/a/..;",
            "/..%00/admin",
            // Overlong UTF-8 and IIS `%u`, anywhere.
            "/%c0%ae%c0%ae/admin",
            "/%C0%AE%C0%AE/admin",
            "/%e0%80%ae%e0%80%ae/admin",
            "/..%c0%afadmin",
            "/%f0%80%80%ae",
            "/%u002e%u002e/admin",
            "/..%U2215admin",
            "/%25u002e",
            // Nested deeper than anyone should decode.
            "/%2525252525252e",
        ] {
            assert!(path_escape(bad).is_some(), "{bad:?}");
        }
        for good in [
            "/",
            "",
            "/v1/charges",
            "/a.b/..c/...",
            "/x/.well-known",
            "/%2e%2e%2e",
            "/projects/group%2Fproject",
            "/a%5cb",
            "/files/100%25",
            "/search/a%2520b",
            "/a;b/c;v=1",
            "/..a;/b",
            "/%e2%82%ac",
            "/%c3%a9t%c3%a9",
            "/%uzzzz",
        ] {
            assert_eq!(path_escape(good), None, "{good:?}");
        }
    }

    #[test]
    fn gateway_locations_stay_on_their_connection() {
        let api = BaseUrl::parse("http://127.0.0.1:8081/api").unwrap();
        let at = "/api/a/b?key=x";
        let cases = [
            ("/api/v2/x?y=1", Some("/c1/v2/x?y=1")),
            ("/api", Some("/c1")),
            ("next", Some("/c1/a/next")),
            ("?page=2", Some("/c1/a/b?page=2")),
            ("http://127.0.0.1:8081/api/z#f", Some("/c1/z#f")),
            ("/other-conn/x", Some("http://127.0.0.1:8081/other-conn/x")),
            (
                "../../other-conn/x",
                Some("http://127.0.0.1:8081/other-conn/x"),
            ),
            ("/apix", Some("http://127.0.0.1:8081/apix")),
            ("//127.0.0.1:8081/api/n", Some("/c1/n")),
            ("https://127.0.0.1:8081/api/z", None),
            ("https://elsewhere.example/x", None),
            ("http://127.0.0.1:9999/api/z", None),
        ];
        for (location, want) in cases {
            assert_eq!(
                gateway_location(location, &api, at, "c1", Some("127.0.0.1:3128")).as_deref(),
                want,
                "{location}"
            );
        }
        let root = BaseUrl::parse("https://api.example.com").unwrap();
        assert_eq!(
            gateway_location("/other-conn/x", &root, "/v1", "c1", None).as_deref(),
            Some("/c1/other-conn/x")
        );
    }

    #[test]
    fn gateway_locations_naming_latchkey_stay_on_their_connection() {
        let root = BaseUrl::parse("https://api.example.com").unwrap();
        let api = BaseUrl::parse("https://api.example.com/api").unwrap();
        let at = "/api/a/b";
        for reached in ["127.0.0.1:3128", "LatchKey.Internal:3128"] {
            for (location, want_root, want_api) in [
                (
                    "http://{me}/other-conn/x",
                    "/c1/other-conn/x",
                    "https://api.example.com/other-conn/x",
                ),
                (
                    "//{me}/other-conn/x?q=1#f",
                    "/c1/other-conn/x?q=1#f",
                    "https://api.example.com/other-conn/x?q=1#f",
                ),
                (
                    "/\\{me}/other-conn/x",
                    "/c1/other-conn/x",
                    "https://api.example.com/other-conn/x",
                ),
                ("http://{me}/api/n", "/c1/api/n", "/c1/n"),
                (
                    "http://localhost:3128/other-conn/x",
                    "/c1/other-conn/x",
                    "https://api.example.com/other-conn/x",
                ),
                (
                    "http://127.0.0.2:3128/o",
                    "/c1/o",
                    "https://api.example.com/o",
                ),
                (
                    "http://2130706433:3128/o",
                    "/c1/o",
                    "https://api.example.com/o",
                ),
                (
                    "http://0.0.0.0:3128/o",
                    "/c1/o",
                    "https://api.example.com/o",
                ),
                ("http://[::1]:3128/o", "/c1/o", "https://api.example.com/o"),
                (
                    "http://[::ffff:127.0.0.1]:3128/o",
                    "/c1/o",
                    "https://api.example.com/o",
                ),
                (
                    "http://{me}//evil.example/x",
                    "/c1//evil.example/x",
                    "https://api.example.com//evil.example/x",
                ),
                (
                    "http://{me}/api/%2e%2e/other-conn",
                    "/c1/other-conn",
                    "https://api.example.com/other-conn",
                ),
            ] {
                let location = location.replace("{me}", reached);
                assert_eq!(
                    gateway_location(&location, &root, "/v1", "c1", Some(reached)).as_deref(),
                    Some(want_root),
                    "{reached} {location}"
                );
                assert_eq!(
                    gateway_location(&location, &api, at, "c1", Some(reached)).as_deref(),
                    Some(want_api),
                    "{reached} {location} under /api"
                );
            }
        }
        // Another port, or another host that is not the client's own machine: not latchkey.
        for location in [
            "http://127.0.0.1:9999/x",
            "https://127.0.0.1/x",
            "http://elsewhere.example:3128/x",
        ] {
            assert_eq!(
                gateway_location(location, &root, "/v1", "c1", Some("127.0.0.1:3128")),
                None,
                "{location}"
            );
        }
        // A Host without a port is port 80, the gateway listener speaking plain HTTP.
        assert_eq!(
            gateway_location(
                "http://latchkey/other/x",
                &root,
                "/v1",
                "c1",
                Some("latchkey")
            )
            .as_deref(),
            Some("/c1/other/x")
        );
    }

    #[test]
    fn base_urls() {
        let b = BaseUrl::parse("https://API.example.com:8443/v1/").unwrap();
        assert_eq!(&*b.host, "api.example.com");
        assert_eq!(b.port, 8443);
        assert_eq!(b.path, "/v1");
        assert_eq!(b.to_string(), "https://api.example.com:8443/v1");
        assert_eq!(&*BaseUrl::parse("http://[::1]/").unwrap().host, "[::1]");
        for bad in [
            "ftp://x",
            "https://",
            "https://u:p@x.com",
            "https://x.com/?a=1",
            "x.com",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad:?}");
        }
    }
}
