//! Issue item 2 and PRODUCT.md 10.1, 10.2: the credential reaches only the connection's hosts.
//! A forward-form request to another host, or whose URL and `Host` disagree, is refused; loopback,
//! metadata and other special addresses are refused after resolution on the address actually
//! dialled, whatever literal form names them; a redirect goes back to the client, never followed.
//! Each refusal is checked at the upstreams too: they receive nothing.

use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// An answer read off a raw TCP exchange with latchkey.
#[derive(Debug)]
pub(crate) struct Raw {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Raw {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&echo_text(&self.body)).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends `request` exactly as written (it must ask for `Connection: close`) and reads the
/// answer to the end. For requests no client library would write as-is: numeric host forms,
/// disagreeing or repeated `Host` headers.
pub(crate) async fn raw(lk: &Latchkey, request: &str) -> Raw {
    let mut stream = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut buf))
        .await
        .expect("latchkey did not finish its answer within 30 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete answer: {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = echo_text(&if chunked {
        dechunk(body)
    } else {
        body.to_string()
    });
    Raw {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A forward-form request for `url` with the given `Host` header (none if `None`), on
/// connection `id`.
pub(crate) fn forward_request(url: &str, host: Option<&str>, id: &str) -> String {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{id}:x"));
    let host = host.map_or(String::new(), |h| format!("Host: {h}\r\n"));
    format!(
        "GET {url} HTTP/1.1\r\n{host}Proxy-Authorization: Basic {auth}\r\nConnection: close\r\n\r\n"
    )
}

/// A forward-form request whose `Host` agrees with the URL's authority.
fn forward_to(authority: &str, path: &str, id: &str) -> String {
    forward_request(&format!("http://{authority}{path}"), Some(authority), id)
}

/// The value of a response header in curl -i output (the last response's), by name.
fn curl_header(text: &str, name: &str) -> Option<String> {
    let head = text.rsplit("HTTP/").next().unwrap_or_default();
    head.lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
}

/// Checks a latchkey refusal in curl -i output: status, `Latchkey-Error` and the JSON body.
fn assert_refused_curl(status: u16, text: &str, want_status: u16, code: &str, what: &str) {
    assert_eq!(status, want_status, "{what}: {text}");
    assert_eq!(
        curl_header(text, "latchkey-error").as_deref(),
        Some(code),
        "{what}: {text}"
    );
    assert_eq!(body_json(text)["error"]["code"], code, "{what}: {text}");
}

fn assert_refused_raw(r: &Raw, want_status: u16, code: &str, what: &str) {
    assert_eq!(r.status, want_status, "{what}: {r:?}");
    assert_eq!(r.header("latchkey-error"), Some(code), "{what}: {r:?}");
    assert_eq!(r.json()["error"]["code"], code, "{what}: {r:?}");
}

fn assert_refused(r: &Echoed, want_status: u16, code: &str, what: &str) {
    assert_eq!(r.status, want_status, "{what}: {:?}", r.json);
    assert_eq!(
        r.latchkey_error.as_deref(),
        Some(code),
        "{what}: {:?}",
        r.json
    );
    assert_eq!(r.error_code(), Some(code), "{what}: {:?}", r.json);
}

/// An upstream on 127.0.0.2: loopback, so dialable under `Opts::loopback()`, but another host.
async fn echo_on_127_0_0_2() -> EchoServer {
    EchoServer::start("127.0.0.2:0".parse().unwrap(), None)
        .await
        .unwrap()
}

#[tokio::test]
async fn forward_form_to_a_host_outside_the_connection_is_refused() {
    let bao = Bao::start().await;
    let up = echo().await;
    let up2 = echo_on_127_0_0_2().await;
    let key = put_bearer(&bao, "dest", &format!("http://{}", up.addr()));
    // 127.0.0.0/8 is allowed: only the connection's host list stands between the request and
    // the second upstream.
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    let (status, text) = curl(&[
        "-x",
        &lk.url(""),
        "--proxy-user",
        "dest:x",
        &format!("http://{}/steal", up2.addr()),
    ])
    .await;
    assert_refused_curl(status, &text, 403, "host_not_allowed", "curl to 127.0.0.2");
    assert!(!text.contains(&key));

    // Python requests, the way HTTP_PROXY clients send it.
    let out = python(
        "import os, requests\n\
         r = requests.get(os.environ['URL'], proxies={'http': os.environ['PROXY']})\n\
         print(r.status_code, r.headers.get('latchkey-error'))\n",
        &[
            ("PROXY", &format!("http://dest:x@{}", lk.proxy)),
            ("URL", &format!("http://{}/py", up2.addr())),
            ("NO_PROXY", ""),
        ],
    )
    .await;
    assert_eq!(out.trim(), "403 host_not_allowed");

    // The same socket under another name is another host; so are names that merely contain
    // the allowed one, and names that cannot even be resolved (checked before any lookup).
    let port = up.addr().port();
    for authority in [
        format!("localhost:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("evil.example:{port}"),
        format!("evil127.0.0.1:{port}"),
    ] {
        let r = raw(&lk, &forward_to(&authority, "/steal", "dest")).await;
        assert_refused_raw(&r, 403, "host_not_allowed", &authority);
    }
    // User information in the URL does not change which host it names.
    let r = raw(
        &lk,
        &forward_request(
            &format!("http://{}@{}/steal", up.addr(), up2.addr()),
            Some(&up2.addr().to_string()),
            "dest",
        ),
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("latchkey-error"), Some("bad_request"));

    assert_eq!(up2.requests(), 0);
    assert_eq!(up.requests(), 0);

    // The connection itself works: the refusals above were about the host.
    let (status, text) = curl(&[
        "-x",
        &lk.url(""),
        "--proxy-user",
        "dest:x",
        &format!("http://{}/ok", up.addr()),
    ])
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(up.requests(), 1);
    assert_eq!(up2.requests(), 0);
}

/// Issue 10: the key went to any port of an allowed host (OpenBao's, latchkey's own admin
/// port, any service sharing the host). A credential goes to a host and port the connection
/// names: the base URL's port on its host, an allowed host's own port, else the scheme's.
#[tokio::test]
async fn the_key_goes_to_no_other_port_of_an_allowed_host() {
    let bao = Bao::start().await;
    let up = echo().await;
    let other = echo().await;
    let up2 = echo_on_127_0_0_2().await;
    let key = put_bearer(&bao, "ports", &format!("http://{}", up.addr()));
    bao.put(
        "ports2",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("http://{}", up.addr())),
            // No port: the scheme's, 80; so not the echo's.
            ("allowed_hosts", "127.0.0.2"),
            ("api_key", "ports2_key_0123"),
        ],
    );
    bao.put(
        "ports3",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("http://{}", up.addr())),
            ("allowed_hosts", &format!("127.0.0.2:{}", up2.addr().port())),
            ("api_key", "ports3_key_0123"),
        ],
    );
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    for (target, id) in [
        (other.addr().to_string(), "ports"),
        (format!("127.0.0.1:{}", lk.admin.port()), "ports"),
        (format!("127.0.0.1:{}", lk.proxy.port()), "ports"),
        (up2.addr().to_string(), "ports2"),
    ] {
        let r = raw(&lk, &forward_to(&target, "/steal", id)).await;
        assert_refused_raw(&r, 403, "host_not_allowed", &target);
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(&target),
            "{r:?}"
        );
        assert!(!format!("{r:?}").contains(&key));
    }
    assert_eq!(other.requests() + up2.requests() + up.requests(), 0);

    // Its own port, and an allowed host on the port its entry names, work.
    let r = raw(&lk, &forward_to(&up.addr().to_string(), "/ok", "ports")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = raw(&lk, &forward_to(&up2.addr().to_string(), "/ok", "ports3")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.requests() + up2.requests(), 2);
}

/// Issue 10: a trailing-dot IP (`127.0.0.1.`) passed the host check as 127.0.0.1, then was
/// looked up in DNS as a name and failed. It is the same host, checked and dialled as such.
#[tokio::test]
async fn a_trailing_dot_ip_is_checked_and_dialled_as_that_ip() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "dot", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let port = up.addr().port();
    let r = raw(&lk, &forward_to(&format!("127.0.0.1.:{port}"), "/x", "dot")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains(&format!("Bearer {key}")), "{r:?}");
    assert_eq!(up.requests(), 1);
    // And it is held to the port like any spelling of the host.
    let r = raw(
        &lk,
        &forward_to(&format!("127.0.0.1.:{}", lk.admin.port()), "/x", "dot"),
    )
    .await;
    assert_refused_raw(&r, 403, "host_not_allowed", "the admin port");
}

/// Issue 10: `allowed_hosts` accepted `*.com` and `*.0.0.1`. A wildcard is under a registrable
/// domain; a stored connection with a wider one cannot be used.
#[tokio::test]
async fn a_wildcard_over_a_public_suffix_or_an_address_is_refused() {
    let bao = Bao::start().await;
    let up = echo().await;
    for (i, wide) in ["*.com", "*.co.uk", "*.0.0.1"].iter().enumerate() {
        bao.put(
            &format!("wide-{i}"),
            &[
                ("connector", "generic-bearer"),
                ("base_url", &format!("http://{}", up.addr())),
                ("allowed_hosts", wide),
                ("api_key", "wide_key_0123"),
            ],
        );
    }
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    for i in 0..3 {
        let r = gateway_get(&lk, &format!("/wide-{i}/x"), &[]).await;
        assert_refused(&r, 500, "connection_invalid", &format!("wide-{i}"));
        let message = r.json["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("allowed_hosts"), "{message}");
    }
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn absolute_uri_and_host_header_that_disagree_are_refused() {
    let bao = Bao::start().await;
    let up = echo().await;
    let up2 = echo_on_127_0_0_2().await;
    // Both hosts are the connection's: only the disagreement can refuse these requests.
    bao.put(
        "agree",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("http://{}", up.addr())),
            ("allowed_hosts", &format!("127.0.0.2:{}", up2.addr().port())),
            ("api_key", "agree_key_0123"),
        ],
    );
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let a1 = up.addr().to_string();
    let a2 = up2.addr().to_string();
    let p1 = up.addr().port();

    // curl with its Host header replaced.
    for (url, host) in [(&a1, &a2), (&a2, &a1)] {
        let (status, text) = curl(&[
            "-x",
            &lk.url(""),
            "--proxy-user",
            "agree:x",
            "-H",
            &format!("Host: {host}"),
            &format!("http://{url}/x"),
        ])
        .await;
        assert_refused_curl(
            status,
            &text,
            400,
            "bad_request",
            &format!("URL {url}, Host {host}"),
        );
    }

    // Raw: other host, other port, port left out (so the default), two Host headers.
    for (url, host) in [
        (format!("http://{a1}/x"), format!("evil.example:{p1}")),
        (format!("http://{a1}/x"), format!("127.0.0.1:{}", p1 ^ 1)),
        (format!("http://{a1}/x"), "127.0.0.1".to_string()),
        (format!("http://{a1}/x"), format!("{a1}\r\nHost: {a2}")),
        (format!("http://{a1}/x"), format!("{a2}\r\nHost: {a1}")),
    ] {
        let r = raw(&lk, &forward_request(&url, Some(&host), "agree")).await;
        assert_refused_raw(&r, 400, "bad_request", &format!("URL {url}, Host {host:?}"));
    }
    assert_eq!(up.requests(), 0);
    assert_eq!(up2.requests(), 0);

    // When they agree, the same requests go through.
    let r = raw(&lk, &forward_to(&a1, "/ok", "agree")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = raw(&lk, &forward_to(&a2, "/ok", "agree")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.requests(), 1);
    assert_eq!(up2.requests(), 1);
}

#[tokio::test]
async fn loopback_by_ip_or_by_name_is_blocked_unless_allowed() {
    let bao = Bao::start().await;
    let up = echo().await;
    let port = up.addr().port();
    put_bearer(&bao, "by-ip", &format!("http://127.0.0.1:{port}"));
    put_bearer(&bao, "by-name", &format!("http://localhost:{port}"));

    {
        let lk = Latchkey::start(&bao, Opts::default()).await;
        for id in ["by-ip", "by-name"] {
            let r = gateway_get(&lk, &format!("/{id}/x"), &[]).await;
            assert_refused(&r, 403, "destination_blocked", id);
        }
        let r = raw(
            &lk,
            &forward_to(&format!("127.0.0.1:{port}"), "/x", "by-ip"),
        )
        .await;
        assert_refused_raw(&r, 403, "destination_blocked", "forward 127.0.0.1");
        let r = raw(
            &lk,
            &forward_to(&format!("localhost:{port}"), "/x", "by-name"),
        )
        .await;
        assert_refused_raw(&r, 403, "destination_blocked", "forward localhost");
        assert_eq!(up.requests(), 0);
    }

    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    for id in ["by-ip", "by-name"] {
        let r = gateway_get(&lk, &format!("/{id}/x"), &[]).await;
        assert_eq!(r.status, 200, "{id}: {:?}", r.json);
    }
    assert_eq!(up.requests(), 2);
}

/// Numeric spellings of 127.0.0.1 that name resolvers accept.
const LOOPBACK_FORMS: [&str; 5] = [
    "2130706433",
    "127.1",
    "[::ffff:127.0.0.1]",
    "0x7f.0.0.1",
    "0177.0.0.1",
];

#[tokio::test]
async fn numeric_and_mapped_spellings_of_loopback_are_blocked() {
    let bao = Bao::start().await;
    let up = echo().await;
    let port = up.addr().port();
    // Forward form: a connection whose allowed hosts hold the odd spellings.
    bao.put(
        "forms",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("http://127.0.0.1:{port}")),
            (
                "allowed_hosts",
                &LOOPBACK_FORMS.map(|f| format!("{f}:{port}")).join(","),
            ),
            ("api_key", "forms_key_0123"),
        ],
    );
    // Gateway form: base URLs written with them.
    let mut gateway_ids = Vec::new();
    for (i, form) in LOOPBACK_FORMS.iter().enumerate() {
        let id = format!("form-{i}");
        put_bearer(&bao, &id, &format!("http://{form}:{port}"));
        gateway_ids.push((id, *form));
    }

    {
        let lk = Latchkey::start(&bao, Opts::default()).await;
        for form in LOOPBACK_FORMS {
            let r = raw(&lk, &forward_to(&format!("{form}:{port}"), "/x", "forms")).await;
            assert_refused_raw(&r, 403, "destination_blocked", &format!("forward {form}"));
        }
        for (id, form) in &gateway_ids {
            let r = gateway_get(&lk, &format!("/{id}/x"), &[]).await;
            assert_refused(&r, 403, "destination_blocked", &format!("base_url {form}"));
        }
        assert_eq!(up.requests(), 0);
    }

    // With loopback allowed the same requests reach the upstream: every spelling really does
    // lead to 127.0.0.1, so the refusals above were the address check.
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    for form in LOOPBACK_FORMS {
        let r = raw(&lk, &forward_to(&format!("{form}:{port}"), "/x", "forms")).await;
        assert_eq!(r.status, 200, "forward {form}: {r:?}");
    }
    for (id, form) in &gateway_ids {
        let r = gateway_get(&lk, &format!("/{id}/x"), &[]).await;
        assert_eq!(r.status, 200, "base_url {form}: {:?}", r.json);
    }
    assert_eq!(up.requests(), 2 * LOOPBACK_FORMS.len() as u64);
}

#[tokio::test]
async fn metadata_and_other_special_addresses_are_blocked_even_with_loopback_allowed() {
    let bao = Bao::start().await;
    let up = echo().await;
    let port = up.addr().port();
    // (host as written, what it is)
    let specials = [
        ("169.254.169.254", "cloud metadata"),
        ("2852039166", "169.254.169.254 as one number"),
        ("[::ffff:169.254.169.254]", "metadata, IPv4-mapped"),
        ("[::ffff:a9fe:a9fe]", "metadata, IPv4-mapped in hex"),
        ("[fd00:ec2::254]", "AWS IPv6 metadata"),
        ("100.100.100.200", "Alibaba metadata"),
        ("10.0.0.1", "private"),
        ("192.168.0.1", "private"),
        ("[::1]", "IPv6 loopback (not in 127.0.0.0/8)"),
        // 0.0.0.0 reaches the local host's listeners: the echo upstream is on this port.
        ("0.0.0.0", "this network"),
    ];
    let mut ids = Vec::new();
    for (i, (host, _)) in specials.iter().enumerate() {
        let id = format!("special-{i}");
        put_bearer(&bao, &id, &format!("http://{host}:{port}"));
        ids.push(id);
    }
    let hosts: Vec<String> = specials
        .iter()
        .map(|(h, _)| format!("{h}:{port}"))
        .collect();
    bao.put(
        "meta-forward",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("http://127.0.0.1:{port}")),
            ("allowed_hosts", &hosts.join(",")),
            ("api_key", "meta_forward_key_0123"),
        ],
    );
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    // Without the check these would connect (0.0.0.0 reaches the echo) or fail as 502/504;
    // refused at the address, they answer 403 destination_blocked.
    for ((host, what), id) in specials.iter().zip(&ids) {
        let r = gateway_get(&lk, &format!("/{id}/latest/meta-data/"), &[]).await;
        assert_refused(
            &r,
            403,
            "destination_blocked",
            &format!("base_url {host} ({what})"),
        );
        let r = raw(
            &lk,
            &forward_to(
                &format!("{host}:{port}"),
                "/latest/meta-data/",
                "meta-forward",
            ),
        )
        .await;
        assert_refused_raw(
            &r,
            403,
            "destination_blocked",
            &format!("forward {host} ({what})"),
        );
    }
    assert_eq!(up.requests(), 0);
    // The allowance itself works.
    let r = raw(
        &lk,
        &forward_to(&format!("127.0.0.1:{port}"), "/ok", "meta-forward"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn redirects_are_passed_back_to_the_client_never_followed() {
    let bao = Bao::start().await;
    let up = echo().await;
    let up2 = echo_on_127_0_0_2().await;
    // The redirect target is even one of the connection's hosts, and dialable.
    bao.put(
        "redir",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("http://{}", up.addr())),
            ("allowed_hosts", &format!("127.0.0.2:{}", up2.addr().port())),
            ("api_key", "redir_key_0123"),
        ],
    );
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let target = format!("http://{}/x", up2.addr());

    // Gateway form, with a client that does not follow redirects itself.
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client
        .get(lk.url(&format!("/redir/redirect?to={target}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    assert_eq!(resp.headers()["location"], target.as_str());
    assert!(resp.headers().get("latchkey-error").is_none());
    assert_eq!(up.requests(), 1);

    // Forward form (curl without -L).
    let (status, text) = curl(&[
        "-x",
        &lk.url(""),
        "--proxy-user",
        "redir:x",
        &format!("http://{}/redirect?to={target}", up.addr()),
    ])
    .await;
    assert_eq!(status, 302, "{text}");
    assert_eq!(
        curl_header(&text, "location").as_deref(),
        Some(target.as_str())
    );
    assert_eq!(up.requests(), 2);

    // A redirect back to the same upstream is not followed either; its Location is put in
    // the gateway's form, so that the client's next request stays on this connection
    // (`hardening::a_relative_redirect_never_switches_connections`).
    let resp = client
        .get(lk.url("/redir/redirect?to=/elsewhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    assert_eq!(resp.headers()["location"], "/redir/elsewhere");
    assert_eq!(up.requests(), 3);

    assert_eq!(up2.requests(), 0);
}
