//! Real clients and real third-party upstreams: Python `requests` configured only through
//! `HTTP_PROXY` (an unmodified client), curl through its `http_proxy` variable, reqwest with a
//! proxy, against httpbin (gunicorn) and nginx over TLS with h2.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

const TOKEN: &str = "clients-test-token-123456";

fn clients_toml() -> String {
    format!(
        "[[clients]]\nname = \"runner\"\ntoken_sha256 = \"{}\"\nconnections = [\"httpbin-*\", \"nginx\"]\n",
        latchkey::auth::sha256_hex(TOKEN)
    )
}

/// httpbin under gunicorn on a free port; killed on drop.
pub(crate) struct Httpbin {
    _child: Service,
    pub(crate) port: u16,
}

impl Httpbin {
    pub(crate) async fn start() -> Httpbin {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "gunicorn", "-w", "1", "-b"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("httpbin:app")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gunicorn and httpbin are needed: pip install httpbin gunicorn");
        let h = Httpbin {
            _child: Service(child),
            port,
        };
        let client = http();
        wait_until("httpbin to answer", Duration::from_secs(30), || async {
            let r = client
                .get(format!("http://127.0.0.1:{port}/get"))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        h
    }
}

/// OpenBao, httpbin and latchkey, with connection `name` (`connector`, key `key`) on httpbin
/// at the returned base URL; the client token must never show in latchkey's output.
async fn on_httpbin(name: &str, connector: &str, key: &str) -> (Bao, Httpbin, String, Latchkey) {
    on_httpbin_with(name, connector, key, Opts::loopback()).await
}

async fn on_httpbin_with(
    name: &str,
    connector: &str,
    key: &str,
    opts: Opts,
) -> (Bao, Httpbin, String, Latchkey) {
    let bao = Bao::start().await;
    let hb = Httpbin::start().await;
    let base = format!("http://127.0.0.1:{}", hb.port);
    bao.put(
        name,
        &[
            ("connector", connector),
            ("base_url", &base),
            ("api_key", key),
        ],
    );
    let lk = Latchkey::start(&bao, opts.extra(&clients_toml())).await;
    lk.forbid(TOKEN);
    (bao, hb, base, lk)
}

#[tokio::test]
async fn python_requests_through_http_proxy_to_httpbin() {
    let (_bao, _hb, base, lk) =
        on_httpbin("httpbin-header", "generic-header", "hb_header_key_42").await;

    // An unmodified client: only HTTP_PROXY says where latchkey is and which connection to use.
    let proxy = format!("http://httpbin-header:{TOKEN}@{}", lk.proxy);
    let script = format!(
        "import requests, json\n\
         r = requests.get('{base}/headers', headers={{'X-Api-Key': 'client-forged'}})\n\
         print(json.dumps({{'status': r.status_code, 'headers': r.json()['headers']}}))"
    );
    let out = python(&script, &[("HTTP_PROXY", &proxy), ("NO_PROXY", "")]).await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], 200);
    // httpbin echoes what it received; the key comes back as the connection's placeholder
    // (PRODUCT.md section 4, step 7), which only our key would have become: the client's
    // `client-forged` did not reach httpbin, the key did.
    assert_eq!(v["headers"]["X-Api-Key"], "latchkey.httpbin-header");
    assert!(v["headers"].get("Proxy-Authorization").is_none());

    // Gateway form from requests, with the token as a bearer proxy credential.
    let script = format!(
        "import requests\n\
         r = requests.get('http://{}/httpbin-header/anything/x?y=1', headers={{'Proxy-Authorization': 'Bearer {TOKEN}'}})\n\
         print(r.status_code, r.json()['headers']['X-Api-Key'], r.json()['url'])",
        lk.proxy
    );
    let out = python(&script, &[]).await;
    assert_eq!(
        out.trim(),
        format!("200 latchkey.httpbin-header {base}/anything/x?y=1")
    );
}

#[tokio::test]
async fn curl_with_http_proxy_variable_and_reqwest_with_a_proxy() {
    let (_bao, _hb, base, lk) =
        on_httpbin("httpbin-bearer", "generic-bearer", "hb_bearer_key_43").await;

    let proxy = format!("http://httpbin-bearer:{TOKEN}@{}", lk.proxy);
    let out = tokio::process::Command::new("curl")
        .args(["-s", &format!("{base}/bearer")])
        .env("http_proxy", &proxy)
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["authenticated"], true, "{v}");
    assert_eq!(v["token"], "latchkey.httpbin-bearer");

    let client = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(lk.url(""))
                .unwrap()
                .basic_auth("httpbin-bearer", TOKEN),
        )
        .build()
        .unwrap();
    let v: serde_json::Value = client
        .get(format!("{base}/headers"))
        .header("authorization", "Bearer forged")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["headers"]["Authorization"],
        "Bearer latchkey.httpbin-bearer"
    );
}

fn nginx_program() -> std::path::PathBuf {
    find_program("nginx")
        .or_else(|| Some("/usr/sbin/nginx".into()).filter(|p: &std::path::PathBuf| p.is_file()))
        .expect("nginx is needed (Debian package nginx)")
}

#[tokio::test]
async fn nginx_over_tls_with_h2_as_the_upstream() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue(&["localhost"]);
    let cert = write_file(dir.path(), "cert.pem", &cert);
    let key = write_file(dir.path(), "key.pem", &key);
    let port = free_port();
    let d = dir.path().display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/b;\n  proxy_temp_path {d}/p;\n\
           fastcgi_temp_path {d}/f;\n  uwsgi_temp_path {d}/u;\n  scgi_temp_path {d}/s;\n\
           server {{\n    listen 127.0.0.1:{port} ssl http2;\n    ssl_certificate {};\n    ssl_certificate_key {};\n\
             location / {{ default_type text/plain; return 200 \"auth=$http_authorization proto=$server_protocol uri=$request_uri\"; }}\n\
           }}\n}}\n",
        cert.display(),
        key.display()
    );
    let conf = write_file(dir.path(), "nginx.conf", &conf);
    let _nginx = Service(
        Command::new(nginx_program())
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let probe = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    wait_until("nginx to answer", Duration::from_secs(30), || async {
        probe
            .get(format!("https://localhost:{port}/"))
            .send()
            .await
            .ok()
            .map(drop)
    })
    .await;

    bao.put(
        "nginx",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("https://localhost:{port}/v2")),
            ("api_key", "nginx_key_44"),
        ],
    );
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().root(&ca.pem_path).extra(&clients_toml()),
    )
    .await;
    lk.forbid(TOKEN);
    let bearer = format!("Bearer {TOKEN}");
    let r = http()
        .get(lk.url("/nginx/items?page=2"))
        .header("proxy-authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert_eq!(
        text,
        "auth=Bearer latchkey.nginx proto=HTTP/2.0 uri=/v2/items?page=2"
    );
}

/// What latchkey logs (at `trace`) when a quiet client connection lets go of hyper's
/// connection and buffers between turns (`proxy.idle_release`, src/release.rs).
const RESTED: &str = "a quiet client connection let go of its HTTP machinery";

/// What latchkey's own HTTP/1.1 server logs (at `trace`) when a quiet client connection lets
/// go of its buffers between requests (`proxy.http1_server = "latchkey"`, src/downstream.rs).
const OWN_RESTED: &str = "a quiet client connection let go of its buffers";

/// A keep-alive client connection that rests (a second with nothing to do: its HTTP machinery
/// is let go, the socket stays open) goes on as before with a real client, Python's
/// `http.client`, which never reconnects on its own: the same socket after each rest, no
/// `Connection: close`, a 200 KB body sent after one, and two pipelined requests after the next
/// answered in order.
#[tokio::test]
async fn a_keep_alive_connection_goes_on_as_before_after_it_rests() {
    keep_alive_across_rests("hyper", RESTED).await;
}

/// The same with latchkey's own HTTP/1.1 server, which lets go of its buffers after a quiet
/// second too.
#[tokio::test]
async fn a_keep_alive_connection_goes_on_as_before_after_it_rests_with_latchkeys_server() {
    keep_alive_across_rests("latchkey", OWN_RESTED).await;
}

async fn keep_alive_across_rests(server: &str, rested: &str) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    let opts = Opts::loopback().proxy(&format!("http1_server = {server:?}"));
    let (_bao, _hb, base, lk) =
        on_httpbin_with("httpbin-header", "generic-header", "hb_header_key_42", opts).await;
    let script = format!(
        "import http.client, json, sys\n\
         c = http.client.HTTPConnection('{host}', {port}, timeout=30)\n\
         auth = {{'Proxy-Authorization': 'Bearer {TOKEN}'}}\n\
         def call(method, path, body=None):\n\
         \x20   c.request(method, '/httpbin-header' + path, body=body, headers=auth)\n\
         \x20   r = c.getresponse()\n\
         \x20   return r.status, r.getheader('Connection'), json.loads(r.read())\n\
         def rest():\n\
         \x20   print('rest', flush=True)\n\
         \x20   sys.stdin.readline()\n\
         out = {{}}\n\
         st, conn, _ = call('GET', '/get')\n\
         sock = c.sock\n\
         out['first'] = [st, conn]\n\
         rest()\n\
         st, conn, body = call('POST', '/anything', b'x' * 200000)\n\
         out['body'] = [st, conn, len(body['data']), c.sock is sock]\n\
         rest()\n\
         two = b''.join(b'GET /httpbin-header/anything/' + p + b' HTTP/1.1\\r\\nHost: x\\r\\nProxy-Authorization: Bearer {TOKEN}\\r\\n\\r\\n' for p in (b'a', b'b'))\n\
         c.sock.sendall(two)\n\
         class Kept:\n\
         \x20   def __init__(self, f): self.f = f\n\
         \x20   def __getattr__(self, name): return getattr(self.f, name)\n\
         \x20   def close(self): pass\n\
         class Sock:\n\
         \x20   def __init__(self, f): self.f = Kept(f)\n\
         \x20   def makefile(self, *a, **k): return self.f\n\
         f = c.sock.makefile('rb')\n\
         out['pipelined'] = []\n\
         for _ in range(2):\n\
         \x20   r = http.client.HTTPResponse(Sock(f))\n\
         \x20   r.begin()\n\
         \x20   out['pipelined'].append([r.status, r.getheader('Connection'), json.loads(r.read())['url']])\n\
         print(json.dumps(out), flush=True)\n",
        host = lk.proxy.ip(),
        port = lk.proxy.port(),
    );
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 is needed");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut rests = 0;
    let out = loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the client went quiet")
            .unwrap()
            .unwrap_or_else(|| panic!("the client ended early:\n{}", lk.output()));
        if line != "rest" {
            break line;
        }
        // The client waits until latchkey has let this connection's machinery go.
        rests += 1;
        wait_until(
            "the connection to rest",
            Duration::from_secs(30),
            || async { (lk.output().matches(rested).count() >= rests).then_some(()) },
        )
        .await;
        stdin.write_all(b"\n").await.unwrap();
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["first"], serde_json::json!([200, null]), "{v}");
    assert_eq!(
        v["body"],
        serde_json::json!([200, null, 200000, true]),
        "{v}"
    );
    let urls: Vec<_> = v["pipelined"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r[0], 200, "{v}");
            assert_eq!(r[1], serde_json::Value::Null, "{v}");
            r[2].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        urls,
        [format!("{base}/anything/a"), format!("{base}/anything/b")],
        "{v}"
    );
    // Two rests, each on this one connection, and the machinery let go only then.
    assert_eq!(lk.output().matches(rested).count(), 2);
}
