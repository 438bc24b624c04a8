//! What latchkey checks on a client's request before anything is sent: the connection ID
//! (`src/connection_id.rs`), phase 1 of the proxy (gateway path, forward-form URL against
//! `Host`, `Proxy-Authorization`), the destination checks of `src/destination.rs` (base URLs,
//! host allow-lists, gateway path escapes, `Location` rewriting) and client globs
//! (`src/auth.rs`).
//!
//! Input: one byte choosing the check (its low bits) and its options (the rest), then the check's
//! fields, one per line.
//!
//! Beyond "no panic":
//! - a connection ID parses exactly when it is 1 to 128 of `A-Z a-z 0-9 _ -` starting with a
//!   letter or digit, and comes back unchanged;
//! - a routed request names a valid ID; a forward-form request's `Host` agrees with its URL; a
//!   gateway path that passes the escape check stays under the base URL's path when a URL
//!   parser (WHATWG, as browsers and many servers read paths: `%2e` is a dot, `\` a slash)
//!   resolves it;
//! - a base URL prints as a URL that parses back to itself, and its host is allowed on its port;
//!   a host pattern normalizes to itself; an allowed host is allowed in upper case and
//!   normalized; a `*.suffix` pattern allows a name under the suffix but not the suffix;
//! - a rewritten `Location` is `/{id}` and a path, query or fragment, or an absolute URL on the
//!   base URL's origin, never a scheme-relative `//host`;
//! - a client glob matches exactly the connection IDs a plain matcher says it matches.

use latchkey::auth::Glob;
use latchkey::connection_id::ConnectionId;
use latchkey::destination::{
    gateway_location, normalize_host, normalize_host_pattern, path_escape, BaseUrl, HostAllowList,
    Passthrough,
};
use latchkey::proxy::fuzzing::route;

fn main() {
    afl::fuzz(true, |data: &[u8]| {
        let Some((&choice, rest)) = data.split_first() else {
            return;
        };
        let text = String::from_utf8_lossy(rest);
        let lines: Vec<&str> = text.split('\n').collect();
        match choice % 6 {
            0 => connection_id(&text),
            1 => request(rest, choice >> 3),
            2 => allow_list(&lines, choice >> 3),
            3 => gateway_path(&text),
            4 => location(&lines),
            _ => glob(&lines),
        }
    });
}

fn connection_id(s: &str) {
    let b = s.as_bytes();
    let valid = (1..=128).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_".contains(c));
    match ConnectionId::parse(s) {
        Ok(id) => {
            assert!(valid, "{s:?} parsed");
            assert_eq!(id.as_str(), s);
            assert_eq!(id.to_string(), s);
            assert_eq!(&*id.shared(), s);
        }
        Err(_) => assert!(!valid, "{s:?} refused"),
    }
}

/// Fields: the request target, `Host` (an empty line: none), `Proxy-Authorization` (the same).
/// Options: bit 0, HTTP/2; bit 1, a CONNECT.
fn request(raw: &[u8], options: u8) {
    let mut fields = raw.split(|b| *b == b'\n');
    let target = fields.next().unwrap_or_default();
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    let mut builder = http::Request::builder()
        .uri(uri)
        .version(if options & 1 == 1 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        })
        .method(if options & 2 == 2 {
            http::Method::CONNECT
        } else {
            http::Method::GET
        });
    for name in [http::header::HOST, http::header::PROXY_AUTHORIZATION] {
        match fields.next() {
            Some(v) if !v.is_empty() => match http::HeaderValue::from_bytes(v) {
                Ok(v) => builder = builder.header(name, v),
                Err(_) => return,
            },
            _ => {}
        }
    }
    let Ok(req) = builder.body(()) else {
        return;
    };
    let Ok(r) = route(&req) else {
        return;
    };
    if let Some(id) = &r.id {
        assert!(ConnectionId::is_valid(id), "routed to {id:?}");
    }
    match r.form {
        "gateway" => {
            let path = r
                .path_and_query
                .split(['?', '#'])
                .next()
                .unwrap_or_default();
            stays_under_base(path);
        }
        "forward" => {
            let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
            assert!(!authority.contains('@'), "user information passed");
            let Some((scheme, host, port)) = &r.requested else {
                panic!("forward form without a destination");
            };
            if let Some(named) = req.headers().get(http::header::HOST) {
                let named: http::uri::Authority = named
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("an unreadable Host passed"));
                let default = if *scheme == "https" { 443 } else { 80 };
                assert_eq!(normalize_host(named.host()), normalize_host(host));
                assert_eq!(named.port_u16().unwrap_or(default), port.unwrap_or(default));
            }
        }
        other => panic!("phase 1 routed a request to form {other:?}"),
    }
}

/// A gateway path that passes the escape check, resolved the way a WHATWG URL parser does,
/// stays under the base URL's path.
fn stays_under_base(path: &str) {
    if path_escape(path).is_some() || !(path.is_empty() || path.starts_with('/')) {
        return;
    }
    let Ok(url) = url::Url::parse(&format!("http://upstream.test/base{path}")) else {
        return;
    };
    let resolved = url.path();
    assert!(
        resolved == "/base" || resolved.starts_with("/base/"),
        "{path:?} resolves to {resolved:?}, out of /base"
    );
}

fn gateway_path(path: &str) {
    // A request target reaches latchkey as a URI: what does not parse as one never gets here.
    let Ok(pq) = http::uri::PathAndQuery::try_from(path) else {
        return;
    };
    if pq.as_str().starts_with('/') {
        stays_under_base(pq.path());
    }
}

/// Fields: a base URL, allowed-host entries, and last a host to ask about.
/// Options: the port asked about (one of a few).
fn allow_list(lines: &[&str], options: u8) {
    let Some((base, rest)) = lines.split_first() else {
        return;
    };
    let Ok(base) = BaseUrl::parse(base) else {
        return;
    };
    let shown = base.to_string();
    let again = BaseUrl::parse(&shown).unwrap_or_else(|e| panic!("{shown:?} does not parse: {e}"));
    assert_eq!(
        (
            again.scheme,
            &again.host,
            again.port,
            &again.path,
            &again.authority
        ),
        (
            base.scheme,
            &base.host,
            base.port,
            &base.path,
            &base.authority
        ),
        "{shown}"
    );
    let default = base.scheme.default_port();
    let mut hosts = HostAllowList::new(&base.host, base.port, default);
    assert!(hosts.allows_at(&base.host, base.port), "{shown}");
    assert!(hosts.allows(&base.host.to_ascii_uppercase()), "{shown}");

    let (query, entries) = rest.split_last().unwrap_or((&"", &[]));
    let mut passthrough = Passthrough::default();
    for entry in entries {
        let _ = passthrough.push(entry);
        if hosts.push(entry).is_err() {
            continue;
        }
        // An entry without a port is a pattern; it is allowed as written.
        let Ok(pattern) = normalize_host_pattern(entry) else {
            continue;
        };
        assert_eq!(
            normalize_host_pattern(&pattern).as_deref(),
            Ok(pattern.as_str()),
            "{entry:?} does not normalize to itself"
        );
        let mut alone = HostAllowList::new("latchkey-fuzz.invalid", default, default);
        assert!(alone.push(&pattern).is_ok(), "{pattern:?} refused");
        match pattern.strip_prefix("*.") {
            Some(suffix) => {
                assert!(alone.allows(&format!("x.{suffix}")), "{pattern:?}");
                assert!(!alone.allows(suffix), "{pattern:?} allows {suffix:?}");
            }
            None => {
                assert!(alone.allows(&pattern), "{pattern:?}");
                assert!(alone.allows(entry.trim()), "{entry:?}");
                assert!(
                    alone.allows_at(&pattern.to_ascii_uppercase(), default),
                    "{pattern:?}"
                );
            }
        }
    }
    let port = [default, base.port, 8443, 1][usize::from(options % 4)];
    let allowed = hosts.allows_at(query, port);
    assert_eq!(
        allowed,
        hosts.allows_at(&normalize_host(query), port),
        "{query:?}"
    );
    if allowed {
        assert!(
            hosts.allows_at(&query.to_ascii_uppercase(), port),
            "{query:?}"
        );
        assert!(hosts.allows(query), "{query:?}");
    }
    let _ = passthrough.covers(query, port);
}

/// Fields: a base URL, the `Location`, the path asked, the connection ID, and (optional) the
/// authority the client reached latchkey as.
fn location(lines: &[&str]) {
    let [base, location, asked, id, rest @ ..] = lines else {
        return;
    };
    let (Ok(base), true) = (BaseUrl::parse(base), ConnectionId::is_valid(id)) else {
        return;
    };
    let reached_as = rest.first().copied().filter(|a| !a.is_empty());
    let Some(out) = gateway_location(location, &base, asked, id, reached_as) else {
        return;
    };
    if let Some(rest) = out.strip_prefix('/') {
        let after = rest
            .strip_prefix(*id)
            .unwrap_or_else(|| panic!("{out:?} is not under /{id}"));
        assert!(
            after.is_empty() || after.starts_with(['/', '?', '#']),
            "{out:?} is not under /{id}/"
        );
    } else {
        let url = url::Url::parse(&out).unwrap_or_else(|_| panic!("{out:?} is not a URL"));
        assert_eq!(url.scheme(), base.scheme.as_str(), "{out:?}");
        assert_eq!(
            url.host_str().map(normalize_host).as_deref(),
            Some(&*base.host),
            "{out:?}"
        );
        assert_eq!(url.port_or_known_default(), Some(base.port), "{out:?}");
    }
}

fn glob(lines: &[&str]) {
    let [pattern, id, ..] = lines else {
        return;
    };
    // Globs are matched against connection IDs only (which hold no `*` or `?`).
    let (Ok(glob), true) = (Glob::parse(pattern), ConnectionId::is_valid(id)) else {
        return;
    };
    assert_eq!(
        glob.matches(id),
        reference_match(pattern.as_bytes(), id.as_bytes()),
        "{pattern:?} on {id:?}"
    );
    let plain: String = pattern
        .chars()
        .filter(|c| *c != '*')
        .map(|c| if c == '?' { 'a' } else { c })
        .collect();
    assert!(glob.matches(&plain), "{pattern:?} on {plain:?}");
}

/// `*` any run, `?` one byte: the plain definition, memoized so that it stays quick.
fn reference_match(p: &[u8], t: &[u8]) -> bool {
    // m[j]: whether p[..i] matches t[..j], row by row.
    let mut m = vec![false; t.len() + 1];
    m[0] = true;
    for &c in p {
        let mut next = vec![false; t.len() + 1];
        if c == b'*' {
            let mut any = false;
            for j in 0..=t.len() {
                any |= m[j];
                next[j] = any;
            }
        } else {
            for j in 1..=t.len() {
                next[j] = m[j - 1] && (c == b'?' || c == t[j - 1]);
            }
        }
        m = next;
    }
    m[t.len()]
}
