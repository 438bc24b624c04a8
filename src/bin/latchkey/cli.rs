//! `latchkey connections ...`: the connection lifecycle from a terminal, over the admin API.
//!
//! Secret values are read from standard input or a hidden prompt, never from the command line,
//! where they would land in shell history and in every `ps` listing. The admin token comes from
//! `LATCHKEY_API_TOKEN` or `--token-file`, for the same reason.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use latchkey::secret::Secret;

#[derive(Args)]
pub struct ConnectionsArgs {
    /// The admin listener's URL.
    #[arg(
        long,
        env = "LATCHKEY_API_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    pub url: String,
    /// A file holding the admin token (otherwise LATCHKEY_API_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for the admin API's answer (an add or verify waits for the service's
    /// own answer, up to `proxy.request_timeout`) before giving up with exit status 2.
    #[arg(long, global = true, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: ConnectionsCommand,
}

/// A client for latchkey's admin listener: direct (never through a proxy the environment
/// names, which may be latchkey itself), giving up on a listener that accepts and does not
/// answer after `timeout` (and on one that does not accept after 10 s at most).
pub fn admin_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .timeout(timeout)
        .build()
}

/// What a failed call to the admin listener at `url` says: no answer in time, or no reaching it.
pub fn unreached(url: &str, e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        format!(
            "the admin listener at {url} did not answer within {}s",
            timeout.as_secs()
        )
    } else {
        format!("cannot reach the admin listener at {url}")
    }
}

#[derive(Subcommand)]
pub enum ConnectionsCommand {
    /// Add a connection. Secret fields are read from standard input or a hidden prompt.
    Add(AddArgs),
    /// List connections.
    List,
    /// Show one connection (secret fields show only that they are set).
    Show { id: String },
    /// Change a connection's name, environment, base URL, hosts, expiry or non-secret fields
    /// (its key: `rotate`). A change of environment or base URL is verified with the stored key.
    Edit(EditArgs),
    /// Rotate a connection's key in place; the new key is verified first.
    Rotate {
        id: String,
        /// The secret field to replace (default: every secret field of the connector), read
        /// from a prompt or standard input; or `NAME=VALUE` for a field the credential is made
        /// with beside the secret (Twilio's `account_sid`), replaced in the same write.
        #[arg(long = "field")]
        fields: Vec<String>,
    },
    /// Run the verification call again and record the result.
    Verify { id: String },
    /// Delete a connection and all its versions.
    Delete { id: String },
    /// List the connectors of the catalog.
    Connectors,
}

// The arguments of `connections add` (no doc comment: the variant's is the command's help).
#[derive(Args)]
pub struct AddArgs {
    /// The connection's ID: what requests name it by (letters, digits, `-` and `_`).
    id: String,
    /// The connector: how the key is sent, and where (`latchkey connections connectors`).
    #[arg(long)]
    connector: String,
    #[command(flatten)]
    described: Described,
    /// Save without the verification call (the connection is `unverified`).
    #[arg(long)]
    no_verify: bool,
}

/// What `add` sets and `edit` changes, besides the key.
#[derive(Args)]
struct Described {
    /// A name for people.
    #[arg(long)]
    name: Option<String>,
    /// Which of the service's environments (`production`, `sandbox`, ...) the key is for: a
    /// key or base URL of another one is refused, where the connector can tell.
    #[arg(long)]
    environment: Option<String>,
    /// Where requests go, for a connector without a fixed one (or to override it).
    #[arg(long)]
    base_url: Option<String>,
    /// An extra host the credential may reach (repeatable; `edit` replaces the stored list).
    #[arg(long = "allowed-host")]
    allowed_hosts: Vec<String>,
    /// When the key dies (RFC 3339).
    #[arg(long)]
    expires_at: Option<String>,
    /// A non-secret field, `name=value` (repeatable).
    #[arg(long = "field", value_parser = parse_pair)]
    fields: Vec<(String, String)>,
}

// The arguments of `connections edit`.
#[derive(Args)]
pub struct EditArgs {
    /// The connection to change.
    id: String,
    #[command(flatten)]
    described: Described,
    /// Remove what is stored under a key: `name`, `environment`, `base_url`, `allowed_hosts`,
    /// `expires_at`, or a non-secret field's name (repeatable).
    #[arg(long = "clear")]
    clear: Vec<String>,
    /// Save a change of environment or base URL without the verification call.
    #[arg(long)]
    no_verify: bool,
}

/// The keys of a connection that `edit --clear` removes by their own name; any other name is a
/// connector field's.
const RESERVED: [&str; 5] = [
    "name",
    "environment",
    "base_url",
    "allowed_hosts",
    "expires_at",
];

fn parse_pair(s: &str) -> Result<(String, String), String> {
    // The error does not quote the argument: a secret pasted by mistake stays unrepeated.
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "expected name=value".to_string())
}

struct Api {
    url: String,
    token: Secret,
    http: reqwest::Client,
    timeout: Duration,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url.trim_end_matches('/')))
            .bearer_auth(self.token.expose());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let why = unreached(&self.url, &e, self.timeout);
                return Err(anyhow::Error::new(e).context(why));
            }
        };
        let status = resp.status().as_u16();
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => {
                let why = unreached(&self.url, &e, self.timeout);
                return Err(anyhow::Error::new(e).context(why));
            }
        };
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }
}

/// Runs one `connections` command; returns the process exit code.
pub async fn run(args: ConnectionsArgs) -> anyhow::Result<u8> {
    let timeout = Duration::from_secs(args.timeout);
    let api = Api {
        url: args.url.clone(),
        token: admin_token(args.token_file.as_deref())?,
        http: admin_client(timeout)?,
        timeout,
    };
    let json_out = args.json;
    let (status, value) = match args.command {
        ConnectionsCommand::Add(add_args) => add(&api, add_args).await?,
        ConnectionsCommand::List => {
            api.call(reqwest::Method::GET, "/v1/connections", None)
                .await?
        }
        ConnectionsCommand::Show { id } => {
            let id = checked_id(&id)?;
            api.call(reqwest::Method::GET, &format!("/v1/connections/{id}"), None)
                .await?
        }
        ConnectionsCommand::Edit(edit_args) => edit(&api, edit_args).await?,
        ConnectionsCommand::Rotate { id, fields } => rotate(&api, checked_id(&id)?, fields).await?,
        ConnectionsCommand::Verify { id } => {
            let id = checked_id(&id)?;
            api.call(
                reqwest::Method::POST,
                &format!("/v1/connections/{id}/verify"),
                None,
            )
            .await?
        }
        ConnectionsCommand::Delete { id } => {
            let id = checked_id(&id)?;
            api.call(
                reqwest::Method::DELETE,
                &format!("/v1/connections/{id}"),
                None,
            )
            .await?
        }
        ConnectionsCommand::Connectors => {
            api.call(reqwest::Method::GET, "/v1/connectors", None)
                .await?
        }
    };
    report(json_out, status, &value)
}

/// A connection ID as the API takes it, checked here: it goes into the URL's path, where
/// `a/../b` would name another connection or endpoint.
fn checked_id(id: &str) -> anyhow::Result<&str> {
    latchkey::connection_id::ConnectionId::parse(id)
        .map_err(|e| anyhow!("bad connection ID: {e}"))?;
    Ok(id)
}

/// The admin token, from `--token-file` or else `LATCHKEY_API_TOKEN`; never empty.
fn admin_token(token_file: Option<&Path>) -> anyhow::Result<Secret> {
    let token = admin_token_as_given(token_file)?;
    if token.expose().trim().is_empty() {
        bail!("the admin token is empty: set LATCHKEY_API_TOKEN or pass --token-file");
    }
    Ok(token)
}

fn admin_token_as_given(token_file: Option<&Path>) -> anyhow::Result<Secret> {
    Ok(match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Secret::new(text.trim())
        }
        None => Secret::from(std::env::var("LATCHKEY_API_TOKEN").map_err(|_| {
            anyhow!("the admin token is needed: set LATCHKEY_API_TOKEN or pass --token-file")
        })?),
    })
}

/// `connections add`: non-secret fields from the command line, secret ones read, then POSTed.
async fn add(api: &Api, args: AddArgs) -> anyhow::Result<(u16, Value)> {
    let AddArgs {
        id,
        connector,
        described:
            Described {
                name,
                environment,
                base_url,
                allowed_hosts,
                expires_at,
                fields,
            },
        no_verify,
    } = args;
    let catalog = connector_of(api, &connector).await?;
    let secret_names: Vec<String> = secret_fields(&catalog);
    let mut all: BTreeMap<String, Value> = BTreeMap::new();
    for (k, v) in fields {
        if secret_names.contains(&k) {
            bail!("{k} is secret: it is read from standard input or a prompt, never from the command line");
        }
        all.insert(k, Value::String(v));
    }
    let secrets = read_secrets(&secret_names, &catalog)?;
    for (k, v) in &secrets {
        all.insert(k.clone(), Value::String(v.expose().to_string()));
    }
    let body = json!({
        "id": id, "connector": connector, "name": name, "environment": environment,
        "base_url": base_url, "allowed_hosts": allowed_hosts, "expires_at": expires_at,
        "fields": all, "verify": !no_verify,
    });
    let r = api
        .call(reqwest::Method::POST, "/v1/connections", Some(&body))
        .await;
    drop(body);
    r
}

/// `connections rotate`: the named secret fields (default: all of them) read anew and PUT.
async fn rotate(api: &Api, id: &str, fields: Vec<String>) -> anyhow::Result<(u16, Value)> {
    let (connector, catalog) = match connector_of_connection(api, id).await? {
        Ok(found) => found,
        Err(answer) => return Ok(answer),
    };
    let mut names = secret_fields(&catalog);
    // `NAME=VALUE`: a field of the credential beside the secret, not secret itself (the API
    // refuses one that is neither).
    let (given, fields): (Vec<String>, Vec<String>) =
        fields.into_iter().partition(|f| f.contains('='));
    if !fields.is_empty() {
        if let Some(bad) = fields.iter().find(|f| !names.contains(f)) {
            bail!(
                "{bad} is not a secret field of {connector} (its secret fields: {}; give a field the credential is made with as NAME=VALUE)",
                names.join(", ")
            );
        }
        names = fields;
    }
    let secret = secret_fields(&catalog);
    let mut beside = serde_json::Map::new();
    for pair in given {
        let (name, value) = pair.split_once('=').unwrap_or((&pair, ""));
        if secret.iter().any(|n| n == name) {
            bail!("{name} is secret: it is read from a prompt or standard input, never from the command line");
        }
        beside.insert(name.to_string(), Value::String(value.to_string()));
    }
    let secrets = read_secrets(&names, &catalog)?;
    let mut map: serde_json::Map<String, Value> = secrets
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.expose().to_string())))
        .collect();
    map.extend(beside);
    let body = json!({ "fields": map });
    let r = api
        .call(
            reqwest::Method::PUT,
            &format!("/v1/connections/{id}/secret"),
            Some(&body),
        )
        .await;
    drop(body);
    r
}

/// `connections edit`: a PATCH of what the flags name, and nothing else. A secret field is not
/// taken from the command line (`rotate` reads it from a prompt or standard input).
async fn edit(api: &Api, args: EditArgs) -> anyhow::Result<(u16, Value)> {
    let id = checked_id(&args.id)?;
    let Described {
        name,
        environment,
        base_url,
        allowed_hosts,
        expires_at,
        fields: given,
    } = args.described;
    let mut patch = serde_json::Map::new();
    let mut fields = serde_json::Map::new();
    let mut set = |key: &str, value: Option<String>| {
        if let Some(v) = value {
            patch.insert(key.to_string(), Value::String(v));
        }
    };
    set("name", name);
    set("environment", environment);
    set("base_url", base_url);
    set("expires_at", expires_at);
    if !allowed_hosts.is_empty() {
        patch.insert("allowed_hosts".into(), json!(allowed_hosts));
    }
    for (name, value) in given {
        fields.insert(name, Value::String(value));
    }
    for key in &args.clear {
        let target = if RESERVED.contains(&key.as_str()) {
            &mut patch
        } else {
            &mut fields
        };
        if target.insert(key.clone(), Value::Null).is_some() {
            bail!("--clear {key} and a new value for {key}: give one of them");
        }
    }
    if patch.is_empty() && fields.is_empty() {
        bail!(
            "nothing to change: give --name, --environment, --base-url, --allowed-host, --expires-at, --field or --clear"
        );
    }
    if !fields.is_empty() {
        let secret = match connector_of_connection(api, id).await? {
            Ok((_, catalog)) => secret_fields(&catalog),
            Err(answer) => return Ok(answer),
        };
        if let Some(name) = fields.keys().find(|n| secret.contains(n)) {
            bail!("{name} is secret: change it with `latchkey connections rotate {id}`, which reads it from a prompt or standard input, never from the command line");
        }
        patch.insert("fields".into(), Value::Object(fields));
    }
    let moves = patch.contains_key("environment") || patch.contains_key("base_url");
    if moves && !args.no_verify {
        patch.insert("verify".into(), Value::Bool(true));
    }
    api.call(
        reqwest::Method::PATCH,
        &format!("/v1/connections/{id}"),
        Some(&Value::Object(patch)),
    )
    .await
}

/// Prints the API's answer and turns it into the exit code.
fn report(json_out: bool, status: u16, value: &Value) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    // Every answer of the admin API but a 204 is a JSON object: anything else came from
    // another server (`--url` naming the wrong port, a proxy's error page).
    if status != 204 && !value.is_object() {
        writeln!(
            out,
            "error ({status}): {}",
            not_the_api(&format!("{:?}", printable(value)))
        )?;
        return Ok(1);
    }
    if json_out {
        writeln!(out, "{}", serde_json::to_string_pretty(value)?)?;
    } else {
        // Text stored in Vault may hold terminal escapes: shown escaped, never run.
        print_human(&mut out, status, &printable(value))?;
    }
    // A verification that ran but did not pass is a failure too (`verify x && deploy`).
    let refused = value["verification"]["passed"] == Value::Bool(false);
    Ok(if (200..300).contains(&status) && !refused {
        0
    } else {
        1
    })
}

/// Says that an answer is not the admin API's, with the start of what came instead.
fn not_the_api(body: &str) -> String {
    let start: String = body.chars().take(120).collect();
    format!(
        "this is not an answer of latchkey's admin API (is the URL its admin listener?); it began {start}"
    )
}

/// The connector of connection `id`, by ID and as the catalog has it (which says what fields
/// are secret); or, when there is no such connection, the API's answer, to report as it is.
async fn connector_of_connection(
    api: &Api,
    id: &str,
) -> anyhow::Result<Result<(String, Value), (u16, Value)>> {
    let (status, current) = api
        .call(reqwest::Method::GET, &format!("/v1/connections/{id}"), None)
        .await?;
    if status != 200 {
        return Ok(Err((status, current)));
    }
    let connector = current["connection"]["connector"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let catalog = connector_of(api, &connector).await?;
    Ok(Ok((connector, catalog)))
}

async fn connector_of(api: &Api, id: &str) -> anyhow::Result<Value> {
    let (status, v) = api
        .call(reqwest::Method::GET, "/v1/connectors", None)
        .await?;
    if status != 200 {
        match v["error"]["message"].as_str() {
            Some(message) => bail!("the admin API answered {status}: {message}"),
            None => bail!(
                "the answer was {status}: {}",
                not_the_api(&format!("{:?}", printable(&v)))
            ),
        }
    }
    v["connectors"]
        .as_array()
        .and_then(|list| list.iter().find(|c| c["id"] == id).cloned())
        .ok_or_else(|| {
            anyhow!(
                "no connector {id:?} in the catalog (latchkey connections connectors lists them)"
            )
        })
}

fn secret_fields(connector: &Value) -> Vec<String> {
    connector["fields"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .filter(|f| f["secret"] == true)
                .filter_map(|f| f["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Secret values: a hidden prompt per field on a terminal; otherwise standard input, taken
/// whole for a single field or as `name=value` lines for several.
fn read_secrets(names: &[String], connector: &Value) -> anyhow::Result<Vec<(String, Secret)>> {
    let label = |name: &str| {
        connector["fields"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["name"] == name))
            .and_then(|f| f["label"].as_str())
            .unwrap_or(name)
            .to_string()
    };
    if std::io::stdin().is_terminal() {
        let mut out = Vec::new();
        for name in names {
            let value = rpassword::prompt_password(format!("{} ({name}): ", label(name)))
                .context("reading the secret from the terminal")?;
            out.push((name.clone(), Secret::from(value)));
        }
        return Ok(out);
    }
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let input = Secret::from(input);
    if input.expose().trim().is_empty() {
        bail!(
            "standard input is empty: it must hold the new value of {}",
            names.join(", ")
        );
    }
    if names.len() == 1 {
        // Sent as it came: the API trims what a paste leaves around it and says so.
        return Ok(vec![(names[0].clone(), input)]);
    }
    let mut out = Vec::new();
    for line in input.expose().lines().filter(|l| !l.trim().is_empty()) {
        let (k, v) = line.split_once('=').ok_or_else(|| {
            anyhow!(
                "standard input must hold name=value lines for {}",
                names.join(", ")
            )
        })?;
        if !names.iter().any(|n| n == k.trim()) {
            bail!(
                "{} is not one of the secret fields {}",
                k.trim(),
                names.join(", ")
            );
        }
        out.push((k.trim().to_string(), Secret::new(v)));
    }
    Ok(out)
}

/// `value` with every control character in its strings written as an escape (`\u{1b}`).
fn printable(value: &Value) -> Value {
    match value {
        Value::String(s) if s.chars().any(char::is_control) => Value::String(
            s.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_unicode().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(printable).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    (
                        k.chars().filter(|c| !c.is_control()).collect(),
                        printable(v),
                    )
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The API's answer as text: an error, a list, or one connection with what came with it.
fn print_human(out: &mut impl Write, status: u16, v: &Value) -> std::io::Result<()> {
    if let Some(err) = v.get("error") {
        return print_error(out, status, err);
    }
    if status == 204 {
        return writeln!(out, "deleted");
    }
    if let Some(list) = v["connections"].as_array() {
        return print_connection_list(out, list);
    }
    if let Some(list) = v["connectors"].as_array() {
        return print_connector_list(out, list);
    }
    if let Some(c) = v.get("connection") {
        print_connection(out, c)?;
    }
    for n in v["notices"].as_array().into_iter().flatten() {
        writeln!(out, "notice       {}", n.as_str().unwrap_or(""))?;
    }
    if let Some(ver) = v.get("verification").filter(|x| !x.is_null()) {
        print_verification(out, ver)?;
    }
    Ok(())
}

/// An `error` answer, with the field it concerns and the verification that refused the key.
fn print_error(out: &mut impl Write, status: u16, err: &Value) -> std::io::Result<()> {
    writeln!(
        out,
        "error ({status}): {}",
        err["message"]
            .as_str()
            .unwrap_or("(the answer gave no message)")
    )?;
    if let Some(f) = err["field"].as_str() {
        writeln!(out, "  field: {f}")?;
    }
    if let Some(ver) = err.get("verification") {
        print_verification(out, ver)?;
    }
    Ok(())
}

/// `connections list`: one row per connection under a header.
fn print_connection_list(out: &mut impl Write, list: &[Value]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<32} {:<16} {:<12} {:<10} NAME",
        "ID", "CONNECTOR", "ENVIRONMENT", "STATUS"
    )?;
    for c in list {
        writeln!(
            out,
            "{:<32} {:<16} {:<12} {:<10} {}",
            c["id"].as_str().unwrap_or(""),
            c["connector"].as_str().unwrap_or(""),
            c["environment"].as_str().unwrap_or("-"),
            c["status"].as_str().unwrap_or(""),
            c["name"].as_str().unwrap_or("")
        )?;
    }
    Ok(())
}

/// `connections connectors`: ID and name of each.
fn print_connector_list(out: &mut impl Write, list: &[Value]) -> std::io::Result<()> {
    for c in list {
        writeln!(
            out,
            "{:<20} {}",
            c["id"].as_str().unwrap_or(""),
            c["name"].as_str().unwrap_or("")
        )?;
    }
    Ok(())
}

/// One connection: its settings, its fields (secret ones only as "(set)") and its warnings.
fn print_connection(out: &mut impl Write, c: &Value) -> std::io::Result<()> {
    for key in [
        "id",
        "connector",
        "name",
        "environment",
        "base_url",
        "status",
        "version",
        "verified_at",
        "last_error",
        "expires_at",
    ] {
        match &c[key] {
            Value::Null => {}
            Value::String(s) => writeln!(out, "{key:<12} {s}")?,
            other => writeln!(out, "{key:<12} {other}")?,
        }
    }
    if let Some(fields) = c["fields"].as_object() {
        for (k, f) in fields {
            let shown = if f.get("set").is_some() {
                "(set)".to_string()
            } else {
                f.as_str().unwrap_or("").to_string()
            };
            writeln!(out, "field        {k} = {shown}")?;
        }
    }
    // Why an `invalid` connection cannot be used: the field and the reason.
    if let Some(problem) = c["problem"].as_object() {
        writeln!(
            out,
            "problem      {}: {}",
            problem
                .get("field")
                .and_then(Value::as_str)
                .unwrap_or("(connection)"),
            problem.get("message").and_then(Value::as_str).unwrap_or("")
        )?;
    }
    for w in c["warnings"].as_array().into_iter().flatten() {
        writeln!(out, "warning      {}", w.as_str().unwrap_or(""))?;
    }
    Ok(())
}

fn print_verification(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    writeln!(
        out,
        "verification {}: {}",
        v["outcome"].as_str().unwrap_or(""),
        v["message"].as_str().unwrap_or("")
    )?;
    if let Some(h) = v["hint"].as_str() {
        writeln!(out, "hint         {h}")?;
    }
    Ok(())
}
