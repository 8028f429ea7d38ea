//! `vault-bootstrap install`: the image build step (see [`crate::install`]). Packer's shell
//! provisioner runs it as root; it prints one line per path and exits 0, or names what it
//! refused (65: SHA-256 mismatch or unusable archive, 66: a file missing, 71: useradd or
//! systemctl failed, 73: a path could not be written).

use crate::error::{exit, Error, Result};
use crate::install::{self, parse_sha256, Options, Release, ServerName};
use clap::{ArgGroup, Args};
use std::path::PathBuf;

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("release")
        .required(true)
        .args(["vault_binary", "vault_archive"])
))]
pub struct InstallArgs {
    /// Install into this staging root instead of the running system (tests, inspection).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,

    /// The server binary (`vault` or OpenBao's `bao`) as downloaded.
    #[arg(long, value_name = "PATH")]
    pub vault_binary: Option<PathBuf>,

    /// A release .zip holding `vault` (HashiCorp's) or `bao`.
    #[arg(long, value_name = "PATH")]
    pub vault_archive: Option<PathBuf>,

    /// The pinned SHA-256 of that file, as published in the release's SHA256SUMS. Checked
    /// before anything is installed.
    #[arg(long, env = "VAULT_SHA256", value_name = "HEX", value_parser = parse_sha256)]
    pub sha256: String,

    /// Installed name of the server binary [default: what the release holds].
    #[arg(long, value_enum, value_name = "NAME")]
    pub binary_name: Option<ServerName>,

    /// System user the server runs as (created if missing; its group likewise).
    #[arg(long, value_name = "NAME", default_value = "vault")]
    pub user: String,

    /// The agent binary to install [default: this executable].
    #[arg(long, value_name = "PATH")]
    pub agent_binary: Option<PathBuf>,
}

pub fn run(args: &InstallArgs) -> Result<i32> {
    let result = options(args).and_then(|opts| {
        let mut stdout = std::io::stdout().lock();
        install::install(&opts, &mut stdout).map(|_| ())
    });
    match result {
        Ok(()) => Ok(exit::OK),
        Err(e) => {
            if !crate::logging::stderr_gets_logs() {
                eprintln!("vault-bootstrap install: {e}");
            }
            Err(e)
        }
    }
}

fn options(args: &InstallArgs) -> Result<Options> {
    let release = match (&args.vault_binary, &args.vault_archive) {
        (Some(p), None) => Release::Binary(p.clone()),
        (None, Some(p)) => Release::Archive(p.clone()),
        // clap's "release" group admits exactly one.
        _ => {
            return Err(Error::Internal(
                "exactly one of --vault-binary and --vault-archive".into(),
            ))
        }
    };
    let agent_binary = match &args.agent_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| Error::Artifact {
            path: "/proc/self/exe".into(),
            problem: format!("cannot locate the running agent ({e}); pass --agent-binary"),
            missing: true,
        })?,
    };
    Ok(Options {
        root: args.root.clone(),
        release,
        sha256: args.sha256.clone(),
        binary_name: args.binary_name,
        user: args.user.clone(),
        agent_binary,
    })
}
