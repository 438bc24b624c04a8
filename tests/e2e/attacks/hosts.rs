//! PRODUCT.md 10.1: the credential reaches only the connection's hosts, on their ports; the
//! absolute URI, `Host`, the CONNECT authority and the SNI agree; a redirect is passed back,
//! never followed, and never re-targets another connection; a gateway path cannot climb out of
//! the base URL's path. What `destination`, `hardening` and `tunnel` already try (other hosts
//! and ports, URL/Host disagreement in forward form, SNI and inner `Host` mismatches, `..`,
//! `%2e%2e`, `..%2f`, `Location: /other-conn/...`) is not repeated. Attacks tried here:
//!
//! - gateway path climbing, double-encoded: `%252e%252e/`, `..%252f`, `%25252e` (a server or a
//!   proxy behind the upstream that decodes twice climbs);
//! - gateway path climbing with path parameters: `..;/`, `.;/`, `..;x=1/`, `%2e%2e;/` (Tomcat
//!   and Spring drop `;...` from a segment, then resolve `..`);
//! - gateway path climbing with overlong UTF-8 and IIS `%u` dots: `%c0%ae%c0%ae`,
//!   `%e0%80%ae`, `%u002e%u002e`, `..%c0%af`;
//! - gateway path climbing the forms already refused, spelled the ways not yet tried:
//!   backslashes (`..%5c`, `%5c..%5c`), a dot segment last (`/a/..`, `/..`, `/%2e%2e?x`), deep
//!   (`../../../../`), after an empty segment (`//../`), and over h2 (`:path`);
//! - inside a tunnel, an absolute-form request whose `Host` names another host, over TLS and
//!   in plain HTTP; over h2, a `host` header other than `:authority`;
//! - a tunnel handshake with no SNI, or an IP address as SNI, for a named CONNECT host;
//! - URL-parser confusions in forward-form targets and CONNECT authorities (`\@`, `#@`, `?@`,
//!   `%40`, userinfo) meant to reach a second host the connection does not name;
//! - gateway redirects that a following client would resolve onto another connection:
//!   protocol-relative and absolute Locations on the upstream's origin, trailing-dot and
//!   upper-case spellings of it, encoded dot segments, and Locations naming latchkey itself;
//! - 301, 302, 303, 307 and 308 (GET and POST) to an allowed host, in every form: passed back,
//!   never followed;
//! - ports spelled with leading zeros or past 65535, meant to reach another port.

use super::*;

/// A gateway request for `path` (exact bytes); the answer.
async fn gateway(lk: &Latchkey, path: &str) -> Option<Answer> {
    raw(
        lk.proxy,
        format!("GET {path} HTTP/1.1\r\nHost: latchkey\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// Each path is refused with 400 (latchkey's `bad_request`, or the HTTP parser's own 400 for
/// bytes it will not read) and nothing reaches the upstream.
async fn assert_no_climb(lk: &Latchkey, up: &EchoServer, paths: &[&str]) {
    let mut climbed = Vec::new();
    for path in paths {
        let before = up.requests();
        let got = gateway(lk, path).await;
        let refused = got.as_ref().is_none_or(|a| a.status == 400);
        if !refused || up.requests() != before {
            let uri = got.as_ref().map(|a| a.json()["uri"].clone());
            climbed.push(format!(
                "{path} -> {:?} (upstream asked for {uri:?})",
                got.map(|a| a.status)
            ));
        }
    }
    assert!(
        climbed.is_empty(),
        "paths that went upstream:\n{}",
        climbed.join("\n")
    );
}

/// latchkey in front of an echo upstream, connection `climb` on its `/api` path.
async fn climbing() -> (Bao, EchoServer, Latchkey) {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "climb", &format!("http://{}/api", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    (bao, up, lk)
}

#[tokio::test]
async fn a_gateway_path_cannot_climb_with_double_encoded_dots() {
    let (_bao, up, lk) = climbing().await;
    assert_no_climb(
        &lk,
        &up,
        &[
            "/climb/%252e%252e/admin",
            "/climb/%252E%252E/admin",
            "/climb/..%252fadmin",
            "/climb/%252e%252e%252fadmin",
            "/climb/.%252e/admin",
            "/climb/%25252e%25252e/admin",
            "/climb/..%255cadmin",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_gateway_path_cannot_climb_with_path_parameters_on_a_dot_segment() {
    let (_bao, up, lk) = climbing().await;
    assert_no_climb(
        &lk,
        &up,
        &[
            "/climb/..;/admin",
            "/climb/..;x=1/admin",
            "/climb/.;/admin",
            "/climb/%2e%2e;/admin",
            "/climb/..%3b/admin",
            "/climb/a/..;",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_gateway_path_cannot_climb_with_overlong_utf8_or_iis_unicode_dots() {
    let (_bao, up, lk) = climbing().await;
    assert_no_climb(
        &lk,
        &up,
        &[
            "/climb/%c0%ae%c0%ae/admin",
            "/climb/%C0%AE%C0%AE/admin",
            "/climb/%e0%80%ae%e0%80%ae/admin",
            "/climb/..%c0%afadmin",
            "/climb/%u002e%u002e/admin",
            "/climb/..%u2215admin",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_gateway_path_cannot_climb_with_backslashes_last_segments_or_over_h2() {
    let (_bao, up, lk) = climbing().await;
    assert_no_climb(
        &lk,
        &up,
        &[
            "/climb/..%5cadmin",
            "/climb/%5c..%5cadmin",
            "/climb/%2e%2e%5Cadmin",
            "/climb/..\\admin",
            "/climb/a/..",
            "/climb/..",
            "/climb/%2e%2e",
            "/climb/%2E%2E?x=1",
            "/climb/.%2e",
            "/climb/../../../../etc/passwd",
            "/climb//../admin",
            "/climb/a/./../../admin",
        ],
    )
    .await;

    // Over h2 (prior knowledge on the plain listener): `:path` as it is.
    for path in ["/climb/../admin", "/climb/%2e%2e/admin", "/climb/a/.."] {
        let io = TcpStream::connect(lk.proxy).await.unwrap();
        let req = http::Request::get(format!("http://latchkey{path}"))
            .body(())
            .unwrap();
        let got = h2_request(io, req, None, None).await;
        assert!(
            got.as_ref().is_err() || got.as_ref().is_ok_and(|a| a.status == 400),
            "h2 {path}: {got:?}"
        );
    }
    assert_eq!(up.requests(), 0);
}

/// A tunnel world: connection `t` to the HTTPS upstream (`https://localhost:Q`), which the
/// tunnel names as `localhost:Q`.
async fn tunnel_world() -> World {
    World::start(Opts::loopback(), |bao, _, secure| {
        put_bearer(bao, "t", secure);
    })
    .await
}

#[tokio::test]
async fn inside_a_tunnel_an_absolute_uri_and_its_host_header_must_agree() {
    let w = tunnel_world().await;
    let authority = w.secure_authority();
    let mut served = Vec::new();
    for form in [Form::Tunnel, Form::PlainTunnel] {
        for (target, host) in [
            // The URI names the CONNECT host, the Host header another one.
            (format!("https://{authority}/x"), "evil.example".to_string()),
            (
                format!("http://{authority}/x"),
                "evil.example:443".to_string(),
            ),
            // And the reverse.
            ("https://evil.example/x".to_string(), authority.clone()),
        ] {
            let s = open_tunnel(&w.lk, &connect_head(&authority, Some(("t", ""))))
                .await
                .unwrap();
            let request =
                format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            let got = if form == Form::Tunnel {
                let mut tls = tls_client(s, "localhost", &[b"http/1.1"]).await.unwrap();
                tls.write_all(request.as_bytes()).await.unwrap();
                read_answer(&mut tls, &mut Vec::new(), false).await
            } else {
                let mut s = s;
                s.write_all(request.as_bytes()).await.unwrap();
                read_answer(&mut s, &mut Vec::new(), false).await
            };
            let refused = got.as_ref().is_some_and(|a| {
                matches!(a.status, 400 | 421) && a.header("latchkey-error").is_some()
            });
            if !refused {
                served.push(format!(
                    "{form:?}: URI {target} with Host {host}: {:?}",
                    got.map(|a| a.status)
                ));
            }
        }
    }
    assert!(
        served.is_empty(),
        "served, not refused:\n{}",
        served.join("\n")
    );
    assert_eq!(w.secure.requests(), 0);
}

#[tokio::test]
async fn inside_an_h2_tunnel_authority_and_host_must_agree() {
    let w = tunnel_world().await;
    let authority = w.secure_authority();
    let mut served = Vec::new();
    // `:authority` the CONNECT host, a `host` header another; then the reverse.
    for (uri, host) in [
        (format!("https://{authority}/x"), "evil.example"),
        ("https://evil.example/x".to_string(), authority.as_str()),
    ] {
        let req = http::Request::get(&uri)
            .header("host", host)
            .body(())
            .unwrap();
        let got = h2_in_tunnel(&w.lk, &authority, "t", req, None, None).await;
        let refused = got
            .as_ref()
            .is_ok_and(|a| matches!(a.status, 400 | 421) && a.latchkey_error().is_some())
            || got.is_err();
        if !refused {
            served.push(format!(
                ":authority {uri} with host {host}: {:?}",
                got.map(|a| a.status)
            ));
        }
    }
    assert!(
        served.is_empty(),
        "served, not refused:\n{}",
        served.join("\n")
    );
    assert_eq!(w.secure.requests(), 0);
}

#[tokio::test]
async fn a_tunnel_handshake_without_the_connect_host_as_sni_is_421() {
    let w = tunnel_world().await;
    let authority = w.secure_authority();
    // An IP address as the server name: rustls sends no SNI at all.
    for sni in ["127.0.0.1", "localhost.evil.example", "xlocalhost"] {
        let s = open_tunnel(&w.lk, &connect_head(&authority, Some(("t", ""))))
            .await
            .unwrap();
        let mut tls = tls_client(s, sni, &[b"http/1.1"]).await.unwrap();
        tls.write_all(
            format!("GET /x HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let got = read_answer(&mut tls, &mut Vec::new(), false).await;
        assert_refused(&got, 421, "host_mismatch", &format!("SNI {sni}"));
    }
    assert_eq!(w.secure.requests(), 0);
}

#[tokio::test]
async fn url_parser_confusions_never_reach_a_host_the_connection_does_not_name() {
    let bao = Bao::start().await;
    let up = echo().await;
    // Loopback, so dialable: only the connection's host list stands in the way.
    let other = EchoServer::start("127.0.0.2:0".parse().unwrap(), None)
        .await
        .unwrap();
    put_bearer(&bao, "conf", &format!("http://{}", up.addr()));
    let ca = Ca::init().await;
    let lk = Latchkey::start(&bao, with_ca(Opts::loopback(), &ca)).await;
    let (a, b) = (up.addr().to_string(), other.addr().to_string());
    let auth = format!("Proxy-Authorization: {}\r\n", basic("conf", ""));

    for target in [
        format!("http://{a}\\@{b}/x"),
        format!("http://{b}#@{a}/x"),
        format!("http://{b}?@{a}/x"),
        format!("http://{a}%40{b}/x"),
        format!("http://{b}%2f@{a}/x"),
        format!("http://{b}\\{a}/x"),
        format!("http://{b}/{a}/x"),
        format!("http://{a}:{}/x", other.addr().port()),
        format!("http://{a}.{b}/x"),
    ] {
        // Host as the target's own authority would be; then as the allowed one.
        let authority = target
            .trim_start_matches("http://")
            .split(['/', '?', '#'])
            .next()
            .unwrap()
            .to_string();
        for host in [authority.as_str(), a.as_str()] {
            let request =
                format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
            let _ = raw(lk.proxy, request.as_bytes()).await;
        }
    }
    for target in [
        format!("{a}@{b}"),
        format!("user@{b}"),
        format!("{b}#@{a}"),
        format!("{a}\\@{b}"),
        format!("{b}/{a}"),
        format!("{b}%2f{a}"),
    ] {
        if let Ok(mut s) = open_tunnel(&lk, &connect_head(&target, Some(("conf", "")))).await {
            let host = target.clone();
            s.write_all(
                format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let _ = read_answer(&mut s, &mut Vec::new(), false).await;
        }
    }
    assert_eq!(
        other.requests(),
        0,
        "a request reached the host the connection does not name"
    );
}

#[tokio::test]
async fn a_gateway_redirect_never_lands_a_following_client_on_another_connection() {
    let bao = Bao::start().await;
    let up = echo().await;
    let origin = format!("http://{}", up.addr());
    let p = up.addr().port();
    put_bearer(&bao, "home", &origin);
    put_bearer(&bao, "home-api", &format!("{origin}/api"));
    put_bearer(&bao, "other-conn", &origin);
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let me = lk.proxy;

    let mut landed = Vec::new();
    for (id, to) in [
        ("home", format!("//127.0.0.1:{p}/other-conn/x")),
        ("home", format!("http://127.0.0.1:{p}/other-conn/x")),
        ("home", format!("HTTP://127.0.0.1.:{p}/other-conn/x")),
        ("home", format!("http://localhost:{p}/other-conn/x")),
        ("home-api", "/api/%2e%2e/other-conn/x".to_string()),
        ("home-api", "./../../other-conn/x".to_string()),
        ("home-api", "/api/..%2fother-conn/x".to_string()),
        // latchkey's own address: a client following it asks latchkey for another connection.
        ("home", format!("http://{me}/other-conn/x")),
        ("home", format!("//{me}/other-conn/x")),
        ("home", format!("/\\{me}/other-conn/x")),
        (
            "home",
            format!("http://localhost:{}/other-conn/x", me.port()),
        ),
    ] {
        let asked = format!("/{id}/a/redirect");
        let got = raw(
            lk.proxy,
            format!("GET {asked}?to={to} HTTP/1.1\r\nHost: {me}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(got.status, 302, "{to}: {got:#?}");
        let location = got.header("location").unwrap_or_default().to_string();
        // How a following client (WHATWG URL rules, as reqwest and browsers) resolves it.
        let base = url::Url::parse(&format!("http://{me}{asked}")).unwrap();
        let Ok(next) = base.join(&location) else {
            continue;
        };
        let on_latchkey = next.port_or_known_default() == Some(me.port())
            && matches!(next.host_str(), Some("127.0.0.1" | "localhost"));
        if on_latchkey && !next.path().starts_with(&format!("/{id}/")) {
            landed.push(format!("{to} -> Location {location} -> {next}"));
        }
    }
    assert!(
        landed.is_empty(),
        "redirects that send a following client through another connection:\n{}",
        landed.join("\n")
    );
}

#[tokio::test]
async fn redirects_of_every_status_are_passed_back_unfollowed_in_every_form() {
    let up = ScriptedUpstream::start(None, |parts| {
        let path = parts.uri.path();
        let code = path
            .rsplit('/')
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(200);
        let to = parts
            .uri
            .query()
            .and_then(|q| q.strip_prefix("to="))
            .unwrap_or("/")
            .to_string();
        Scripted::new(code).header("location", &to)
    })
    .await;
    let target = EchoServer::start("127.0.0.2:0".parse().unwrap(), None)
        .await
        .unwrap();
    let bao = Bao::start().await;
    // The redirect target is one of the connection's own hosts: following it would be allowed,
    // so only not following keeps it from being asked.
    put_json(
        &bao,
        "redir",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("http://{}", up.addr)),
            ("allowed_hosts", &target.addr().to_string()),
            ("api_key", "redir_every_status_key"),
        ],
    )
    .await;
    let ca = Ca::init().await;
    let lk = Latchkey::start(&bao, with_ca(Opts::loopback(), &ca)).await;
    let to = format!("http://{}/stolen", target.addr());
    let authority = up.addr.to_string();
    let mut asked = 0;
    for form in [Form::Gateway, Form::Forward, Form::PlainTunnel] {
        for code in [301, 302, 303, 307, 308] {
            for method in ["GET", "POST"] {
                let path = format!("/r/{code}?to={to}");
                let req = Req {
                    id: "redir",
                    token: "",
                    method,
                    path: &path,
                    headers: "",
                    body: if method == "POST" { b"payload" } else { b"" },
                };
                let got = send(&lk, form, &authority, &req).await.unwrap();
                asked += 1;
                assert_eq!(got.status, code, "{form:?} {method} {code}: {got:#?}");
                assert_eq!(got.header("location"), Some(to.as_str()), "{form:?} {code}");
            }
        }
    }
    assert_eq!(up.requests(), asked);
    assert_eq!(target.requests(), 0, "a redirect was followed");
}

#[tokio::test]
async fn ports_spelled_oddly_are_no_way_to_another_port() {
    let bao = Bao::start().await;
    let up = echo().await;
    let other = echo().await;
    put_bearer(&bao, "port", &format!("http://{}", up.addr()));
    let ca = Ca::init().await;
    let lk = Latchkey::start(&bao, with_ca(Opts::loopback(), &ca)).await;
    let q = other.addr().port();
    for authority in [
        format!("127.0.0.1:0{q}"),
        format!("127.0.0.1:00{q}"),
        format!("127.0.0.1:{}", u32::from(q) + 65536),
        format!("127.0.0.1:{}", u32::from(q) + 131072),
        format!("127.0.0.1:+{q}"),
        format!("127.0.0.1:{q}."),
    ] {
        for form in [Form::Forward, Form::PlainTunnel] {
            let _ = send(&lk, form, &authority, &Req::get("port", "/x")).await;
        }
    }
    assert_eq!(other.requests(), 0, "the key went to another port");
}
