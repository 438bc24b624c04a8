//! `latchkey ca init` and `latchkey ca export`: the tunnel form's CA.
//!
//! Where it is kept: with `--cert FILE --key FILE`, in those two PEM files (what `tls.ca_cert`
//! and `tls.ca_key` then name; the key file readable by its owner only). Otherwise in Vault, at
//! `{mount}/latchkey/ca`, reached as `latchkey serve` reaches it: the configuration given with
//! `--config` (or `LATCHKEY_CONFIG`), else `VAULT_ADDR`, `VAULT_TOKEN` and the mount `secret`.
//! Every latchkey on that Vault without CA files uses that one CA. `init` never replaces a CA
//! and never prints the key; `export` prints the certificate only.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};

use latchkey::ca::Ca;
use latchkey::config::{CaFiles, Config};
use latchkey::vault::{Vault, VaultError};

#[derive(Args)]
pub struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create latchkey's CA: a new key and certificate, stored in Vault (`{mount}/latchkey/ca`)
    /// or, with --cert and --key, written to two new files. Never replaces an existing CA.
    Init {
        /// Where the certificate goes (PEM; give it to clients to trust). With --key: files
        /// instead of Vault.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Where the private key goes (PEM, mode 0600). With --cert: files instead of Vault.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        #[command(flatten)]
        vault: VaultArgs,
        /// The CA's common name.
        #[arg(long, default_value = "latchkey CA")]
        name: String,
    },
    /// Print the CA's certificate (PEM), for clients to trust: from --cert, or from where the
    /// configuration keeps the CA (Vault's `{mount}/latchkey/ca`, or `tls.ca_cert`).
    Export {
        /// The certificate file `ca init --cert` wrote (`tls.ca_cert`).
        #[arg(long)]
        cert: Option<PathBuf>,
        #[command(flatten)]
        vault: VaultArgs,
    },
}

#[derive(Args)]
struct VaultArgs {
    /// latchkey's configuration file, for its `[vault]` table (and `[tls]` CA files). Without
    /// it: VAULT_ADDR, VAULT_TOKEN and the mount `secret`.
    #[arg(long, short, env = "LATCHKEY_CONFIG")]
    config: Option<PathBuf>,
}

pub async fn run(args: CaArgs) -> anyhow::Result<()> {
    match args.command {
        CaCommand::Init {
            cert: Some(cert),
            key: Some(key),
            name,
            ..
        } => init_files(&cert, &key, &name),
        CaCommand::Init { vault, name, .. } => match store(&vault)? {
            Store::Files(files) => bail!(
                "the configuration keeps the CA in files (tls.ca_cert = {}, tls.ca_key = {}) that \
                 exist already; latchkey ca init never replaces a CA",
                files.cert.display(),
                files.key.display()
            ),
            Store::Vault(vault) => init_vault(&vault, &name).await,
        },
        CaCommand::Export {
            cert: Some(cert), ..
        } => export_file(&cert),
        CaCommand::Export { vault, .. } => match store(&vault)? {
            Store::Files(files) => export_file(&files.cert),
            Store::Vault(vault) => export_vault(&vault).await,
        },
    }
}

/// Where the configuration keeps the CA.
enum Store {
    Files(CaFiles),
    Vault(Vault),
}

fn store(args: &VaultArgs) -> anyhow::Result<Store> {
    let config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        None => {
            if std::env::var_os("VAULT_TOKEN").is_none() {
                bail!(
                    "no Vault token: set VAULT_TOKEN (and VAULT_ADDR), or give --config FILE \
                     (latchkey's configuration, for its [vault] table), or --cert FILE --key \
                     FILE to keep the CA in files"
                );
            }
            Config::parse("", &latchkey::config::ProcessEnv)
                .map_err(|e| anyhow::anyhow!("the environment: {e}"))?
        }
    };
    if let Some(files) = config.tls.ca {
        return Ok(Store::Files(files));
    }
    let vault = Vault::new(&config.vault).map_err(|e| {
        anyhow::anyhow!(
            "cannot use Vault at {}: {e}",
            config.vault.addresses.join(", ")
        )
    })?;
    Ok(Store::Vault(vault))
}

async fn init_vault(vault: &Vault, name: &str) -> anyhow::Result<()> {
    let place = format!("{} in Vault at {}", vault.ca_location(), vault.address());
    let ca = Ca::generate(name).map_err(|e| anyhow::anyhow!("cannot create the CA: {e}"))?;
    match vault.create_ca(&ca).await {
        Ok(()) => {}
        Err(VaultError::CasMismatch) => bail!(
            "latchkey's CA already exists at {place}; latchkey ca init never replaces a CA \
             (latchkey ca export prints its certificate)"
        ),
        Err(e) => bail!("cannot store the CA at {place}: {e}"),
    }
    let _ = writeln!(
        std::io::stderr(),
        "stored latchkey's CA ({name:?}) at {place}; every latchkey on this Vault without \
         tls.ca_cert uses it from its next start. Have clients trust its certificate: \
         latchkey ca export, or GET /ca.pem on the admin listener"
    );
    Ok(())
}

async fn export_vault(vault: &Vault) -> anyhow::Result<()> {
    let place = format!("{} in Vault at {}", vault.ca_location(), vault.address());
    let record = match vault.read_ca().await {
        Ok(Some(record)) => record,
        Ok(None) => bail!("there is no CA at {place}: make it with latchkey ca init"),
        Err(e) => bail!("cannot read the CA at {place}: {e}"),
    };
    let pem = record
        .cert_pem()
        .and_then(|pem| Ca::certificate_pem(pem).map_err(|e| e.to_string()))
        .map_err(|reason| anyhow::anyhow!("the CA at {place} is unusable: {reason}"))?;
    std::io::stdout().write_all(pem.as_bytes())?;
    Ok(())
}

fn export_file(cert: &Path) -> anyhow::Result<()> {
    let pem =
        std::fs::read_to_string(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    // Checked, then printed as it is: one certificate and nothing else.
    Ca::certificate_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
    std::io::stdout().write_all(pem.as_bytes())?;
    Ok(())
}

fn init_files(cert: &Path, key: &Path, name: &str) -> anyhow::Result<()> {
    for path in [cert, key] {
        if path.exists() {
            bail!(
                "{} exists; latchkey ca init never replaces a CA",
                path.display()
            );
        }
    }
    let ca = Ca::generate(name).map_err(|e| anyhow::anyhow!("cannot create the CA: {e}"))?;
    let key_pem = ca.key_pem();
    write_new(key, key_pem.expose().as_bytes(), 0o600)?;
    write_new(cert, ca.cert_pem().as_bytes(), 0o644)?;
    let _ = writeln!(
        std::io::stderr(),
        "wrote {} and {}; set tls.ca_cert and tls.ca_key to them, and have clients trust {}",
        cert.display(),
        key.display(),
        cert.display()
    );
    Ok(())
}

/// Creates `path` (failing if it exists) with `mode`, and writes `bytes` to it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}
