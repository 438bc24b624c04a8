//! PRODUCT.md section 1, "where the client token may come from": in gateway form the client
//! token may arrive where the connector's credential goes (`Authorization: Bearer`, the
//! connector's header, a Basic password, the query parameter), so that an SDK with no way to
//! add a header needs only its base URL set to latchkey's and its API key set to the client
//! token. The token is removed from that place, wherever it was, and only latchkey's credential
//! reaches the service.

use base64::Engine as _;

use crate::errors::client_toml;
use crate::support::*;

const TOKEN: &str = "tp-client-token-5a4b3c2d1e";
const OTHER_TOKEN: &str = "tp-other-client-token-77aa";

/// Everything the upstream saw of a request, as one text to search for the token.
fn seen(r: &Echoed) -> String {
    r.json.to_string()
}

struct Setup {
    lk: Latchkey,
    up: EchoServer,
    stripe_key: String,
    anthropic_key: String,
    maps_key: String,
    twilio_token: String,
    _bao: Bao,
}

async fn setup() -> Setup {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    let tag = free_port();
    let stripe_key = format!("sk_test_tp{tag}stripe");
    let anthropic_key = format!("sk-ant-tp{tag}anthropic");
    let maps_key = format!("AIzaTp{tag}maps");
    let twilio_token = format!("tp{tag}twiliotoken");
    bao.put(
        "tp-stripe",
        &[
            ("connector", "stripe"),
            ("base_url", &base),
            ("api_key", &stripe_key),
        ],
    );
    bao.put(
        "tp-anthropic",
        &[
            ("connector", "anthropic"),
            ("base_url", &base),
            ("api_key", &anthropic_key),
        ],
    );
    bao.put(
        "tp-maps",
        &[
            ("connector", "google-maps"),
            ("base_url", &base),
            ("api_key", &maps_key),
        ],
    );
    bao.put(
        "tp-twilio",
        &[
            ("connector", "twilio"),
            ("base_url", &base),
            ("account_sid", "AC0123456789abcdef0123456789abcdef"),
            ("auth_token", &twilio_token),
        ],
    );
    let clients = format!(
        "{}{}",
        client_toml("sdk-runner", TOKEN, &["tp-*"]),
        client_toml("elsewhere", OTHER_TOKEN, &["billing-*"])
    );
    let lk = Latchkey::start(&bao, Opts::loopback().extra(&clients)).await;
    lk.forbid(TOKEN);
    lk.forbid(OTHER_TOKEN);
    Setup {
        lk,
        up,
        stripe_key,
        anthropic_key,
        maps_key,
        twilio_token,
        _bao: bao,
    }
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test]
async fn the_client_token_as_the_api_key_authenticates_and_only_our_key_goes_on() {
    let s = setup().await;
    let bearer = format!("Bearer {TOKEN}");
    let twilio_basic = basic("AC0123456789abcdef0123456789abcdef", TOKEN);

    // Bearer (the Stripe, OpenAI ... SDKs), from reqwest.
    let r = gateway_get(
        &s.lk,
        "/tp-stripe/v1/charges",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {}", s.stripe_key))
    );
    assert!(!seen(&r).contains(TOKEN), "{}", seen(&r));

    // The connector's own header (the Anthropic SDK's x-api-key), from curl.
    let (status, text) = curl(&[
        "-H",
        &format!("x-api-key: {TOKEN}"),
        &s.lk.url("/tp-anthropic/v1/messages"),
    ])
    .await;
    assert_eq!(status, 200, "{text}");
    let json = body_json(&text);
    let r = Echoed {
        status,
        json,
        latchkey_error: None,
    };
    assert_eq!(r.header("x-api-key"), Some(s.anthropic_key.clone()));
    assert_eq!(r.header("authorization"), None);
    assert!(!seen(&r).contains(TOKEN), "{}", seen(&r));

    // The query parameter (google-maps' `key`), from Python requests; the other parameters stay.
    let out = python(
        "import os, requests\n\
         s = requests.Session()\n\
         s.trust_env = False\n\
         r = s.get(os.environ['URL'], params={'address': 'x y', 'key': os.environ['TOKEN']})\n\
         print(r.status_code)\n\
         print(r.text)\n",
        &[
            ("URL", &s.lk.url("/tp-maps/maps/api/geocode/json")),
            ("TOKEN", TOKEN),
        ],
    )
    .await;
    let (status, body) = out.split_once('\n').unwrap();
    assert_eq!(status, "200", "{out}");
    let r = Echoed {
        status: 200,
        json: serde_json::from_str(body.trim()).unwrap(),
        latchkey_error: None,
    };
    let uri = r.uri().to_string();
    assert!(uri.contains("address=x+y"), "{uri}");
    assert_eq!(uri.matches("key=").count(), 1, "{uri}");
    assert!(uri.contains(&format!("key={}", s.maps_key)), "{uri}");
    assert!(!seen(&r).contains(TOKEN), "{}", seen(&r));

    // A Basic password (Twilio's auth token).
    let r = gateway_get(
        &s.lk,
        "/tp-twilio/2010-04-01/Accounts.json",
        &[("authorization", &twilio_basic)],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(
        r.header("authorization"),
        Some(basic("AC0123456789abcdef0123456789abcdef", &s.twilio_token))
    );
    assert!(!seen(&r).contains(TOKEN), "{}", seen(&r));

    // A Basic user name, as clients that send their key as `key:` do (Stripe's, curl -u).
    let r = gateway_get(
        &s.lk,
        "/tp-stripe/v1/charges",
        &[("authorization", &basic(TOKEN, ""))],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {}", s.stripe_key))
    );
    assert!(!seen(&r).contains(TOKEN), "{}", seen(&r));
    assert_eq!(s.up.requests(), 5);

    let lines = s.lk.access_lines(5, |l| l["status"] == 200).await;
    assert!(
        lines.iter().all(|l| l["client"] == "sdk-runner"),
        "{lines:?}"
    );
}

/// A token sent where this connector does not put its key is still the client's token, and is
/// removed from there: it does not travel on under a header the service ignores.
#[tokio::test]
async fn the_token_is_removed_from_whichever_credential_place_it_came_in() {
    let s = setup().await;
    let r = gateway_get(
        &s.lk,
        "/tp-stripe/v1/charges",
        &[("x-api-key", TOKEN), ("x-trace", "kept")],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.header("x-api-key"), None, "{:?}", r.json);
    assert_eq!(r.header("x-trace").as_deref(), Some("kept"));
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {}", s.stripe_key))
    );
    assert!(!seen(&r).contains(TOKEN), "{}", seen(&r));
}

#[tokio::test]
async fn a_wrong_or_foreign_token_in_the_key_place_is_refused_and_nothing_is_sent() {
    let s = setup().await;
    // Not a client token: 407, as with no token at all.
    let r = gateway_get(
        &s.lk,
        "/tp-stripe/v1/charges",
        &[("authorization", "Bearer sk_live_not-a-client-token")],
    )
    .await;
    assert_eq!(r.status, 407, "{:?}", r.json);
    assert_eq!(r.latchkey_error.as_deref(), Some("proxy_auth_required"));
    let message = r.json["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("where the API key goes"), "{message}");

    // Another client's token: that client may not use this connection.
    let r = gateway_get(
        &s.lk,
        "/tp-stripe/v1/charges",
        &[("authorization", &format!("Bearer {OTHER_TOKEN}"))],
    )
    .await;
    assert_eq!(r.status, 403, "{:?}", r.json);
    assert_eq!(r.latchkey_error.as_deref(), Some("connection_forbidden"));
    assert_eq!(s.up.requests(), 0);
}

/// `Proxy-Authorization` still comes first: with it, what sits in the key's place is the
/// client's own (an SDK's placeholder) and is replaced as always.
#[tokio::test]
async fn proxy_authorization_comes_first() {
    let s = setup().await;
    let r = gateway_get(
        &s.lk,
        "/tp-stripe/v1/charges",
        &[
            ("proxy-authorization", &format!("Bearer {TOKEN}")),
            ("authorization", "Bearer sk_test_placeholder"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {}", s.stripe_key))
    );
    assert!(!seen(&r).contains("placeholder"), "{}", seen(&r));
}

/// However the client authenticated, a client token in a place where keys go is latchkey's and
/// is taken out: a workflow that sends `Proxy-Authorization` and also gives its SDK the token
/// as the API key sends nothing of it upstream, in the gateway and the forward form.
#[tokio::test]
async fn a_client_token_is_taken_out_however_the_client_authenticated() {
    let s = setup().await;
    let bearer = format!("Bearer {TOKEN}");
    let r = gateway_get(
        &s.lk,
        &format!("/tp-anthropic/v1/messages?key={TOKEN}&kept=1"),
        &[
            ("proxy-authorization", &bearer),
            ("authorization", &bearer),
            ("x-goog-api-key", TOKEN),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.header("x-api-key"), Some(s.anthropic_key.clone()));
    assert_eq!(r.uri(), "/v1/messages?kept=1");
    assert!(!seen(&r).contains(TOKEN), "{}", seen(&r));

    // Authenticated by the token where the key goes: taken out of everywhere else too.
    let r = gateway_get(
        &s.lk,
        &format!("/tp-anthropic/v1/messages?foo={TOKEN}&kept=1"),
        &[
            ("x-api-key", TOKEN),
            ("x-debug", &format!("run {TOKEN}")),
            ("cookie", &format!("sess={TOKEN}")),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.header("x-api-key"), Some(s.anthropic_key.clone()));
    assert_eq!(r.uri(), "/v1/messages?kept=1");
    assert!(!seen(&r).contains(TOKEN), "{}", seen(&r));

    // Forward form: the token in Proxy-Authorization's Basic password, and again in the
    // request's own places.
    let addr = s.up.addr();
    let (status, text) = curl(&[
        "-x",
        &format!("http://{}", s.lk.proxy),
        "--proxy-user",
        &format!("tp-anthropic:{TOKEN}"),
        "-H",
        &format!("authorization: {bearer}"),
        "-H",
        &format!("x-goog-api-key: {TOKEN}"),
        &format!("http://{addr}/v1/messages?key={TOKEN}"),
    ])
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains(TOKEN), "{text}");
    let json = body_json(&text);
    assert_eq!(json["uri"], "/v1/messages", "{json}");
    assert_eq!(s.up.requests(), 3);
}
