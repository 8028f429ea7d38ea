//! The agent's one error type and the exit code each cause maps to.
//!
//! Every variant names the thing that is wrong (config key, S3 object, address, path) and
//! carries enough context for the operator to act. Exit codes follow sysexits(3) so that
//! `RestartPreventExitStatus=` in the unit and scripts can tell causes apart; the table is
//! documented in the docs/operations.md ("Exit codes") and must stay in sync with [`Error::exit_code`].

use std::path::PathBuf;

/// Documented exit codes (sysexits style).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The command line was used wrongly (a guard such as `--yes` or `VAULT_TOKEN` missing).
    pub const USAGE: i32 = 64;
    /// TLS material (or other fetched data) is present but unusable; a release file
    /// whose SHA-256 is not the pinned one.
    pub const DATAERR: i32 = 65;
    /// A required input does not exist: config file, S3 bucket or object.
    pub const NOINPUT: i32 = 66;
    /// The Vault server could not run: its port is taken or it exited.
    pub const UNAVAILABLE: i32 = 69;
    /// An internal error: a bug in the agent.
    pub const SOFTWARE: i32 = 70;
    /// The operating system refused something: spawn, signal, systemctl.
    pub const OSERR: i32 = 71;
    /// A required program is missing: the Vault binary.
    pub const OSFILE: i32 = 72;
    /// A file could not be written.
    pub const CANTCREAT: i32 = 73;
    /// A retriable environment failure: IMDS, AWS or Vault not answering (yet).
    pub const TEMPFAIL: i32 = 75;
    /// A remote spoke a protocol the agent refuses: e.g. IMDS without IMDSv2.
    pub const PROTOCOL: i32 = 76;
    /// AWS denied access (IAM policy, bucket policy, KMS key policy).
    pub const NOPERM: i32 = 77;
    /// The configuration is invalid (also: the operator CA it names is the cluster CA).
    pub const CONFIG: i32 = 78;
    /// Recovery keys could not be escrowed and verified. The KMS-encrypted copy stays in
    /// `agent.state_dir`; the next `boot` resumes. Never ignore this one.
    pub const ESCROW: i32 = 80;
    /// This node's server serves another cluster than the one the escrow marker records
    /// (raft data from a second initialization): never reported ready.
    pub const FOREIGN_CLUSTER: i32 = 81;
    /// This node did not become a healthy raft voter within `lifecycle.launch_timeout_secs`:
    /// its launch hook was completed with ABANDON, and the group replaces the instance.
    pub const ABANDONED: i32 = 82;
}

/// How an AWS call failed, as far as the operator's next step is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsFailure {
    /// IAM or a resource policy said no.
    Denied,
    /// The bucket, object, key or alias does not exist.
    NotFound,
    /// Throttling, 5xx, timeouts, connection failures: worth retrying.
    Transient,
    /// Anything else (validation errors, unexpected answers).
    Other,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config file {path} not found: create it (see docs/configuration.md) or point --config / VAULT_BOOTSTRAP_CONFIG at it")]
    ConfigMissing { path: PathBuf },

    #[error("cannot read config file {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("invalid config file {path}: {message}")]
    ConfigParse { path: PathBuf, message: String },

    #[error("invalid config file {path}: key `{key}`: {message}")]
    ConfigInvalid {
        path: PathBuf,
        key: String,
        message: String,
    },

    #[error("IMDS {what}: {message}")]
    Imds {
        what: String,
        message: String,
        /// false when retrying cannot help (IMDSv2 refused, v1-only endpoint).
        retriable: bool,
        protocol: bool,
    },

    #[error("AWS {operation} on {resource} failed: {message}")]
    Aws {
        operation: &'static str,
        resource: String,
        failure: AwsFailure,
        message: String,
    },

    #[error("peer discovery: {message}")]
    Discovery { message: String },

    #[error("TLS material refused ({object}): {problem}; upload a valid set to the resources bucket and run boot again (nothing was written)")]
    Tls { object: String, problem: String },

    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },

    #[error("Vault binary {path} {problem}: install it (see docs/operations.md \"Building the AMI\") or fix `vault.binary`")]
    BinaryMissing { path: PathBuf, problem: String },

    #[error("SHA-256 of {path} is {actual}, expected {expected}: not the pinned release (corrupt or tampered download); nothing was installed")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("{path}: {problem}; nothing was installed")]
    Artifact {
        path: PathBuf,
        problem: String,
        /// true: the file does not exist (NOINPUT); false: it is unusable (DATAERR).
        missing: bool,
    },

    #[error("address {addr} is already in use: another process listens on the Vault {what} port; stop it or change `vault.{what}_port`")]
    PortInUse { addr: String, what: &'static str },

    #[error("the Vault server exited before it answered: {status}; see its log lines above")]
    ServerExited { status: String },

    #[error("the Vault server at {url} did not answer sys/health within {waited_secs} s (last: {last}); check `journalctl -u vault` and the listener/TLS settings")]
    HealthTimeout {
        url: String,
        waited_secs: u64,
        last: String,
    },

    #[error("{command} failed: {message}")]
    Command { command: String, message: String },

    #[error("escrow: {message}")]
    Escrow { message: String },

    #[error("init: {message}")]
    Init { message: String, retriable: bool },

    #[error("cluster identity: {message}")]
    ForeignCluster { message: String },

    #[error("Vault API {call} at {url}: {message}")]
    VaultApi {
        call: String,
        url: String,
        message: String,
    },

    #[error("refused: {message}")]
    Refused { message: String },

    /// The operator CA cannot be trusted for administrator logins (it is the cluster CA).
    #[error("operator CA {object} (access.operator_ca_key) refused: {problem}; upload a CA of its own for the operators' client certificates and point access.operator_ca_key at it, then run boot again (operator login was not configured, the root token is kept)")]
    OperatorCa { object: String, problem: String },

    /// An operator command's guard is missing (e.g. `--yes` when stdout is not a terminal).
    #[error("{message}")]
    Usage { message: String },

    /// Something a command needs locally does not exist (e.g. the CA before any boot).
    #[error("{message}")]
    NoInput { message: String },

    /// Another vault-bootstrap command holds this node's lock (see `node_lock`).
    #[error("another vault-bootstrap command ({holder}) is changing this node and did not finish within {waited_secs} s: nothing was changed; run this again when it is done")]
    NodeBusy { holder: String, waited_secs: u64 },
    /// A snapshot or restore failed; `exit` is the code of its root cause.
    #[error("snapshot: {message}")]
    Snapshot { message: String, exit: i32 },

    /// A lifecycle step (launch hook, graceful leave, reaping) failed; `exit` is the code
    /// of its root cause.
    #[error("lifecycle: {message}")]
    Lifecycle { message: String, exit: i32 },

    /// A rotation step failed; `exit` is the code of its root cause. What was done stays
    /// done, and a second run resumes.
    #[error("rotation: {message}; run `vault-bootstrap rotate` again to resume (docs/operations.md \"After a compromise\")")]
    Rotation { message: String, exit: i32 },

    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The documented exit code for this cause.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::ConfigMissing { .. } => exit::NOINPUT,
            Error::ConfigRead { .. } => exit::NOINPUT,
            Error::ConfigParse { .. } | Error::ConfigInvalid { .. } => exit::CONFIG,
            Error::Imds { protocol: true, .. } => exit::PROTOCOL,
            Error::Imds { .. } => exit::TEMPFAIL,
            Error::Aws { failure, .. } => match failure {
                AwsFailure::Denied => exit::NOPERM,
                AwsFailure::NotFound => exit::NOINPUT,
                AwsFailure::Transient => exit::TEMPFAIL,
                AwsFailure::Other => exit::UNAVAILABLE,
            },
            Error::Discovery { .. } => exit::TEMPFAIL,
            Error::Tls { .. } => exit::DATAERR,
            Error::Write { .. } => exit::CANTCREAT,
            Error::BinaryMissing { .. } => exit::OSFILE,
            Error::Checksum { .. } => exit::DATAERR,
            Error::Artifact { missing: true, .. } => exit::NOINPUT,
            Error::Artifact { .. } => exit::DATAERR,
            Error::PortInUse { .. } | Error::ServerExited { .. } => exit::UNAVAILABLE,
            Error::HealthTimeout { .. } => exit::TEMPFAIL,
            Error::Command { .. } => exit::OSERR,
            Error::Escrow { .. } => exit::ESCROW,
            Error::ForeignCluster { .. } => exit::FOREIGN_CLUSTER,
            Error::Init {
                retriable: true, ..
            } => exit::TEMPFAIL,
            // Not an escrow failure (those are `Error::Escrow`): a Vault API step after
            // init refused, or an S3 object that is not what the agent wrote.
            Error::Init { .. } => exit::UNAVAILABLE,
            Error::VaultApi { .. } => exit::UNAVAILABLE,
            Error::Refused { .. } => exit::TEMPFAIL,
            // What to trust is configuration (which object the config names); retrying the
            // same object cannot help, so systemd must not restart on it.
            Error::OperatorCa { .. } => exit::CONFIG,
            Error::Usage { .. } => exit::USAGE,
            Error::NoInput { .. } => exit::NOINPUT,
            Error::NodeBusy { .. } => exit::TEMPFAIL,
            Error::Snapshot { exit, .. } => *exit,
            Error::Lifecycle { exit, .. } => *exit,
            Error::Rotation { exit, .. } => *exit,
            Error::Internal(_) => exit::SOFTWARE,
        }
    }

    /// Whether a retry of the same step may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Imds { retriable, .. } => *retriable,
            Error::Aws { failure, .. } => *failure == AwsFailure::Transient,
            Error::Init { retriable, .. } => *retriable,
            _ => false,
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Write {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
