//! `latchkey ca init` and `latchkey ca export`: the tunnel form's CA, kept in two PEM files
//! that `tls.ca_cert` and `tls.ca_key` name. The key file is written readable by its owner only
//! and never printed.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};

use latchkey::ca::Ca;

#[derive(Args)]
pub struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create latchkey's CA: a new key and certificate, written to two new files.
    Init {
        /// Where the certificate goes (PEM; give it to clients to trust).
        #[arg(long)]
        cert: PathBuf,
        /// Where the private key goes (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "latchkey CA")]
        name: String,
    },
    /// Print the CA's certificate (PEM), for clients to trust.
    Export {
        /// The certificate file `ca init` wrote (`tls.ca_cert`).
        #[arg(long)]
        cert: PathBuf,
    },
}

pub fn run(args: CaArgs) -> anyhow::Result<()> {
    match args.command {
        CaCommand::Init { cert, key, name } => init(&cert, &key, &name),
        CaCommand::Export { cert } => {
            let pem = std::fs::read_to_string(&cert)
                .with_context(|| format!("cannot read {}", cert.display()))?;
            if !pem.contains("BEGIN CERTIFICATE") {
                bail!("{} holds no PEM certificate", cert.display());
            }
            std::io::stdout().write_all(pem.as_bytes())?;
            Ok(())
        }
    }
}

fn init(cert: &Path, key: &Path, name: &str) -> anyhow::Result<()> {
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
