//! `latchkey env` and `latchkey run`: put a program behind latchkey's tunnel form in one line.
//!
//! Both fetch latchkey's CA certificate from the admin listener (`GET /ca.pem`), write a CA
//! bundle (the system's roots plus latchkey's CA, so that hosts latchkey does not front still
//! verify), and set `HTTPS_PROXY` with the connection and the client token (from
//! `LATCHKEY_TOKEN` or a file) and the CA variables every client family reads. `env` prints the
//! lines for a shell; `run` runs a command with them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;

use latchkey::secret::Secret;

/// Where the system keeps its CA bundle, on the distributions latchkey runs on.
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

#[derive(Args)]
pub struct EnvArgs {
    /// The connection the program's requests use; without it, `_` (each request names its own
    /// with a `latchkey.{id}` placeholder key).
    #[arg(long, value_parser = connection_id)]
    connection: Option<String>,
    /// latchkey's proxy listener: `HOST:PORT`, or the same as an `http://` URL.
    #[arg(long, env = "LATCHKEY_PROXY", default_value = "127.0.0.1:8080", value_parser = listener)]
    proxy: String,
    /// latchkey's admin listener, where the CA certificate is fetched.
    #[arg(
        long,
        env = "LATCHKEY_API_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    admin: String,
    /// A file holding the client token (otherwise `LATCHKEY_TOKEN`, or none when latchkey runs
    /// open on loopback).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where to write the CA bundle.
    #[arg(long, default_value_os_t = default_bundle())]
    ca_bundle: PathBuf,
    /// Seconds to wait for the admin listener's answer before giving up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    env: EnvArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `--connection`: a connection ID, or `_` (each request names its own).
fn connection_id(given: &str) -> Result<String, String> {
    if given == "_" || latchkey::connection_id::ConnectionId::is_valid(given) {
        Ok(given.to_string())
    } else {
        Err(format!(
            "{given:?} is not a connection ID: 1 to {} letters, digits, - and _, starting with a letter or digit (or _ to name none)",
            latchkey::connection_id::ConnectionId::MAX_LEN
        ))
    }
}

/// `--proxy` as the `HOST:PORT` that goes after the user in the proxy URL: given as such or as
/// `http://HOST:PORT` (a trailing `/` allowed); anything else is refused, not printed into a
/// URL that no client can use.
fn listener(given: &str) -> Result<String, String> {
    let bare = match given.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "latchkey's proxy listener speaks http, not {scheme}: give HOST:PORT or http://HOST:PORT"
            ))
        }
        None => given,
    };
    let bare = bare.strip_suffix('/').unwrap_or(bare);
    match http::uri::Authority::try_from(bare) {
        Ok(a) if a.port().is_some() && !bare.contains('@') => Ok(bare.to_string()),
        _ => Err(format!(
            "{given:?} is not the proxy listener's HOST:PORT (or http://HOST:PORT)"
        )),
    }
}

/// Where the bundle goes without `--ca-bundle`: a directory of the user's own
/// (`$XDG_RUNTIME_DIR`, else `~/.cache/latchkey`), not a name in the shared `/tmp` that
/// another local user could have made first (and so own, and add a CA of theirs to).
fn default_bundle() -> PathBuf {
    let own = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|d| d.is_absolute())
                .map(|h| h.join(".cache").join("latchkey"))
        });
    match own {
        Some(dir) => dir.join("latchkey-ca-bundle.pem"),
        None => std::env::temp_dir().join("latchkey-ca-bundle.pem"),
    }
}

/// The variables that put a program behind latchkey.
async fn variables(args: &EnvArgs) -> anyhow::Result<Vec<(&'static str, String)>> {
    let token = match (&args.token_file, std::env::var("LATCHKEY_TOKEN")) {
        (Some(path), _) => Secret::from(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .trim()
                .to_string(),
        ),
        (None, Ok(t)) => Secret::from(t),
        (None, Err(_)) => Secret::default(),
    };
    if token.expose().contains(['@', '/', ':', '%', '\'']) {
        bail!("the client token holds a character a proxy URL cannot carry as it is (@ / : % ')");
    }
    let ca = fetch_ca(&args.admin, Duration::from_secs(args.timeout)).await?;
    write_bundle(&args.ca_bundle, &ca)?;
    let user = args.connection.as_deref().unwrap_or("_");
    Ok(lines(user, &token, &args.proxy, &args.ca_bundle))
}

/// The variables for proxy user `user` (a connection ID or `_`), its token, latchkey's proxy
/// listener and the CA bundle written there.
pub fn lines(
    user: &str,
    token: &Secret,
    proxy: &str,
    bundle: &Path,
) -> Vec<(&'static str, String)> {
    let proxy = format!("http://{user}:{}@{proxy}", token.expose());
    let bundle = bundle.display().to_string();
    vec![
        ("HTTPS_PROXY", proxy.clone()),
        ("https_proxy", proxy),
        ("SSL_CERT_FILE", bundle.clone()),
        ("REQUESTS_CA_BUNDLE", bundle.clone()),
        ("CURL_CA_BUNDLE", bundle.clone()),
        ("NODE_EXTRA_CA_CERTS", bundle.clone()),
        ("GIT_SSL_CAINFO", bundle),
    ]
}

async fn fetch_ca(admin: &str, timeout: Duration) -> anyhow::Result<String> {
    let url = format!("{}/ca.pem", admin.trim_end_matches('/'));
    let response = match crate::cli::admin_client(timeout)?.get(&url).send().await {
        Ok(r) => r,
        Err(e) => {
            let why = crate::cli::unreached(admin, &e, timeout);
            return Err(anyhow::Error::new(e).context(why));
        }
    };
    if !response.status().is_success() {
        bail!(
            "{url} answered {}: latchkey has no CA (make it with latchkey ca init)",
            response.status()
        );
    }
    let pem = response.text().await?;
    if !pem.contains("BEGIN CERTIFICATE") {
        bail!("{url} did not answer with a PEM certificate");
    }
    Ok(pem)
}

/// The system's roots followed by latchkey's CA.
pub fn write_bundle(path: &Path, ca: &str) -> anyhow::Result<()> {
    let mut bundle = SYSTEM_BUNDLES
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(ca);
    // Written to a new file of its own, then renamed over `path`: a file or symlink someone
    // else put at `path` is replaced, never written through (and in a sticky directory such
    // as /tmp, one another user owns makes this fail rather than be reused).
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut file = tempfile::Builder::new()
        .prefix(".latchkey-ca-bundle")
        .tempfile_in(&dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    {
        use std::io::Write as _;
        use std::os::unix::fs::PermissionsExt as _;
        file.write_all(bundle.as_bytes())?;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    file.persist(path)
        .map(|_| ())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `latchkey env`: `export` lines for a shell (`eval "$(latchkey env ...)"`).
pub async fn env(args: EnvArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for (name, value) in variables(&args).await? {
        writeln!(out, "export {name}='{value}'")?;
    }
    Ok(())
}

/// `latchkey run`: the command, with the variables set; exits as it exits.
pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let vars = variables(&args.env).await?;
    let (program, rest) = args
        .command
        .split_first()
        .context("give the command after --")?;
    let status = tokio::process::Command::new(program)
        .args(rest)
        .envs(vars)
        .status()
        .await
        .with_context(|| format!("cannot run {program}"))?;
    Ok(ExitCode::from(
        status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(1),
    ))
}

#[cfg(test)]
mod tests {
    use super::{listener, write_bundle};

    #[test]
    fn the_proxy_listener_is_taken_as_host_and_port_or_an_http_url() {
        for (given, taken) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("HTTP://latchkey.internal:3128/", "latchkey.internal:3128"),
            ("http://[::1]:8080", "[::1]:8080"),
        ] {
            assert_eq!(listener(given).as_deref(), Ok(taken), "{given}");
        }
        for given in [
            "https://127.0.0.1:8080",
            "127.0.0.1",
            "http://127.0.0.1:8080/path",
            "http://user:pw@127.0.0.1:8080",
            "",
        ] {
            let e = listener(given).unwrap_err();
            assert!(e.contains("HOST:PORT"), "{given}: {e}");
        }
    }

    /// The bundle replaces whatever is at its path (a symlink is not followed, a file someone
    /// else made is not written through), and is readable by every program, not writable.
    #[test]
    fn the_bundle_is_a_new_file_in_place_of_whatever_was_there() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere.pem");
        std::fs::write(&target, "theirs").unwrap();
        let path = dir.path().join("bundle.pem");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_bundle(&path, "-----BEGIN CERTIFICATE-----\nours\n").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "theirs");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("ours\n"));
        // No temporary file left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
