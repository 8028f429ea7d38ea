//! The command line: one file per subcommand.

pub mod boot;
pub mod break_glass;
pub mod doctor;
pub mod escrow;
pub mod install;
pub mod refresh_tls;
pub mod rejoin;
pub mod render;
pub mod rotate;
pub mod snapshot;
pub mod status;
pub mod watch;

use crate::config::{self, Config};
use crate::error::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "vault-bootstrap",
    version,
    about = "Turns a booted EC2 instance into a healthy member of a Vault/OpenBao Raft cluster",
    after_help = "Exit codes: see docs/operations.md \"Exit codes\" (78 config, 75 retriable, 65 TLS refused, ...)."
)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "VAULT_BOOTSTRAP_CONFIG",
        default_value = config::DEFAULT_PATH,
        value_name = "PATH"
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot path: IMDS, peers, TLS, vault.hcl, start the server, wait until it answers.
    Boot,
    /// Print the vault.hcl that `boot` would write; touches nothing.
    Render,
    /// A new root token from recovery keys (typed, or --from-escrow), printed once.
    BreakGlass {
        /// Take threshold-many keys from the escrow instead of stdin.
        #[arg(long)]
        from_escrow: bool,
        /// Print even when stdout is not a terminal.
        #[arg(long)]
        yes: bool,
    },
    /// Fetch and check the TLS objects again; swap them and reload the server when changed.
    RefreshTls,
    /// Repair this node: refresh TLS and config, move unknown raft data aside, restart, wait.
    Rejoin {
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Preflight checks, a PASS/FAIL line each; exit 0 only if all pass (else 1).
    Doctor,
    /// JSON: instance facts, peers, local health, raft role and voters (VAULT_TOKEN), escrow.
    Status,
    /// The recovery-key escrow in S3.
    #[command(subcommand)]
    Escrow(EscrowCommand),
    /// Raft snapshot of the cluster to S3 (the hourly timer runs this); `snapshot restore`.
    Snapshot(SnapshotArgs),
    /// After a compromise (operator role, VAULT_TOKEN): rekey the recovery key into a new
    /// escrow generation, rotate the keyring and the root key, replace the node credentials.
    /// Resumes an interrupted run.
    Rotate {
        /// Required: the old recovery keys stop working.
        #[arg(long)]
        yes: bool,
        /// Rotate only away from this generation: when it is already replaced, only finish
        /// what is unfinished (a repeat of the same request does not rotate twice).
        #[arg(long, value_name = "N")]
        from_generation: Option<u32>,
    },
    /// Long-running (its own unit): leave the cluster gracefully when the group terminates
    /// this instance (terminate hook), and reap raft peers whose instances are gone.
    Watch,
    /// Image build (Packer, as root): verify and install the server, the agent, the units.
    Install(install::InstallArgs),
}

#[derive(Debug, Subcommand)]
pub enum EscrowCommand {
    /// Check that every share and the marker are present and decrypt (prints counts only).
    Verify,
    /// Finish an escrow whose initializer is gone, from the copy of its init response in
    /// S3, then post-init, through the active node when this one is a standby (operator
    /// role).
    Finish {
        /// The initializer's instance id (default: the init lock's holder).
        #[arg(long, value_name = "INSTANCE_ID")]
        instance: Option<String>,
    },
    /// Print one recovery share (counting from 1) for its key holder.
    Reveal {
        #[arg(long, value_name = "N")]
        share: usize,
        /// Print even when stdout is not a terminal.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: Option<SnapshotCommand>,
    /// Do nothing (exit 0) unless this node is the active one: every node runs the timer,
    /// one snapshot per interval is taken, and `keep` means that many intervals.
    #[arg(long)]
    pub only_if_active: bool,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Restore the cluster from one of its snapshots (operator's VAULT_TOKEN; needs --yes).
    Restore {
        /// s3://bucket/key of a snapshot written by `vault-bootstrap snapshot`, under this
        /// cluster's prefix (`snapshot.bucket`/`snapshot.prefix`/<cluster>/).
        #[arg(long, value_name = "S3_URL")]
        from: String,
        /// Replace all of the cluster's data: required.
        #[arg(long)]
        yes: bool,
        /// Accept a snapshot outside this cluster's prefix (another cluster's data).
        #[arg(long)]
        foreign: bool,
        /// Restore through sys/storage/raft/snapshot-force, which skips the server's check
        /// that the snapshot was sealed by this cluster's seal. If it was not, the cluster
        /// cannot decrypt its data afterwards.
        #[arg(long)]
        force: bool,
    },
}

/// Runs the command; returns the process exit code on success.
pub async fn run(cli: Cli) -> Result<i32> {
    // install runs at image build time: there is no config.toml yet, nor should there be.
    if let Command::Install(args) = &cli.command {
        return install::run(args);
    }
    let cfg = Config::load(&cli.config)?;
    match cli.command {
        Command::Boot => boot::run(&cfg).await,
        Command::Render => render::run(&cfg).await,
        Command::Status => status::run(&cfg).await,
        Command::Watch => watch::run(&cfg).await,
        Command::Doctor => doctor::run(&cfg).await,
        Command::Rejoin { dry_run } => rejoin::run(&cfg, dry_run).await,
        Command::RefreshTls => refresh_tls::run(&cfg).await,
        Command::BreakGlass { from_escrow, yes } => break_glass::run(&cfg, from_escrow, yes).await,
        Command::Escrow(EscrowCommand::Verify) => escrow::verify(&cfg).await,
        Command::Escrow(EscrowCommand::Finish { instance }) => escrow::finish(&cfg, instance).await,
        Command::Escrow(EscrowCommand::Reveal { share, yes }) => {
            escrow::reveal(&cfg, share, yes).await
        }
        Command::Snapshot(SnapshotArgs {
            command: None,
            only_if_active,
        }) => snapshot::take(&cfg, only_if_active).await,
        Command::Snapshot(SnapshotArgs {
            command:
                Some(SnapshotCommand::Restore {
                    from,
                    yes,
                    foreign,
                    force,
                }),
            ..
        }) => {
            let how = snapshot::Restore {
                yes,
                foreign,
                force,
            };
            snapshot::restore(&cfg, &from, how).await
        }
        Command::Rotate {
            yes,
            from_generation,
        } => rotate::run(&cfg, yes, from_generation).await,
        Command::Install(args) => install::run(&args),
    }
}

/// Refuses to print `what` (a secret) unless stdout is a terminal or the operator said `--yes`:
/// a secret piped into a file or a log collector outlives the session.
pub(crate) fn refuse_unless_terminal(yes: bool, what: &str) -> crate::error::Result<()> {
    use std::io::IsTerminal;
    if yes || std::io::stdout().is_terminal() {
        return Ok(());
    }
    Err(crate::error::Error::Usage {
        message: format!(
            "refusing to print {what} to something that is not a terminal; pass --yes if you mean it"
        ),
    })
}
