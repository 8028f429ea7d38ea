//! The agent's configuration: a TOML file (`/etc/vault-bootstrap/config.toml` by default).
//!
//! The key names are a public contract: add keys, rename none. Unknown keys are an error that
//! names the key and the file, because a misspelled key silently falling back to a default is
//! how production clusters end up with the wrong seal or bucket. AWS endpoints, region and
//! credentials are deliberately absent: they come from the SDK's standard chain.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/vault-bootstrap/config.toml";

/// The tag AWS puts on every instance of an Auto Scaling group: its name.
pub const ASG_TAG: &str = "aws:autoscaling:groupName";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub cluster: ClusterConfig,
    pub tls: TlsConfig,
    pub seal: SealConfig,
    #[serde(default)]
    pub vault: VaultConfig,
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub init: InitConfig,
    #[serde(default)]
    pub access: AccessConfig,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
}

/// Upper bound of `lifecycle.launch_timeout_secs` (see `Config::validate`).
pub const MAX_LAUNCH_TIMEOUT_SECS: u64 = 1800;
/// Upper bound of `lifecycle.heartbeat_secs`.
pub const MAX_HEARTBEAT_SECS: u64 = 3600;

/// ASG lifecycle hooks, graceful leave and evidence-based reaping (`vault-bootstrap watch`,
/// docs/operations.md "Rolling upgrades"). Without hooks named, `boot` and `watch` complete
/// none; reaping works with or without them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// The group's launch hook (`autoscaling:EC2_INSTANCE_LAUNCHING`): `boot` completes it
    /// with CONTINUE once this node is a healthy voter, ABANDON past `launch_timeout_secs`.
    pub launch_hook: Option<String>,
    /// The group's terminate hook (`autoscaling:EC2_INSTANCE_TERMINATING`): `watch` leaves
    /// the cluster gracefully, then completes it.
    pub terminate_hook: Option<String>,
    /// The Auto Scaling group. Default: this instance's value of `cluster.tag_key` when that
    /// is `aws:autoscaling:groupName` (the tag AWS puts on the group's instances).
    pub group: Option<String>,
    /// RecordLifecycleActionHeartbeat interval while a hook waits on this node; keep it well
    /// under the hook's HeartbeatTimeout.
    pub heartbeat_secs: u64,
    /// Bound on a new node becoming a healthy voter before its launch hook is ABANDONed
    /// (the group then replaces the instance and an instance refresh stops).
    pub launch_timeout_secs: u64,
    /// Bound on a graceful leave waiting until its removal keeps quorum; past it the node
    /// stops its server without removing itself (reaping removes it once EC2 reports it
    /// terminated) and completes the hook.
    pub leave_timeout_secs: u64,
    /// How often `watch` reaps raft peers whose instances EC2 reports terminated or absent.
    pub watch_interval_secs: u64,
    /// Whether `watch` (and `boot`) reap such peers at all; autopilot's
    /// `cleanup_dead_servers`, when turned on, is a backstop either way.
    pub reap: bool,
    /// CIDR blocks the lifecycle AppRole may log in from and use tokens from. Default:
    /// `snapshot.bound_cidrs`, else the addresses known at init. A rolling upgrade brings
    /// new addresses: production names the group's subnets here.
    pub bound_cidrs: Vec<String>,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            launch_hook: None,
            terminate_hook: None,
            group: None,
            // AWS's default HeartbeatTimeout is 3600 s; a minute keeps far from any sane one.
            heartbeat_secs: 60,
            // A join, stabilization (autopilot's 10 s) and promotion take well under a
            // minute; fifteen cover a slow snapshot install on a large store.
            launch_timeout_secs: 900,
            // An hour: one replacement's launch and its promotion fit many times over.
            leave_timeout_secs: 3600,
            // Reaping within half a minute of the evidence, at one DescribeInstances a node.
            watch_interval_secs: 30,
            reap: true,
            bound_cidrs: Vec::new(),
        }
    }
}

impl LifecycleConfig {
    /// Whether any hook is configured.
    pub fn hooks(&self) -> bool {
        self.launch_hook.is_some() || self.terminate_hook.is_some()
    }
}

/// Raft snapshots to S3 (`vault-bootstrap snapshot`, run by its timer; the interval is the
/// timer's `OnCalendar=`, not a key here).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Default: the escrow bucket.
    pub bucket: Option<String>,
    /// Snapshots go under `<prefix>/<cluster>/`.
    pub prefix: String,
    /// How many of the most recent snapshots to keep; older ones are deleted.
    pub keep: u32,
    /// Bound on streaming one snapshot from the server (and on a restore's upload to it).
    pub timeout_secs: u64,
    /// CIDR blocks the snapshot AppRole may log in from and use its tokens from
    /// (`secret_id_bound_cidrs`, `token_bound_cidrs`). Empty: the addresses of the instances
    /// discovered when post-init provisions the role, each as a /32. Production should name
    /// the VPC's (or the group's subnets') CIDR: an instance that replaces one of those
    /// later has a new address, and the role cannot be rebound once the root token is gone.
    pub bound_cidrs: Vec<String>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            bucket: None,
            prefix: "vault-bootstrap-snapshots".into(),
            // Two days of hourly snapshots.
            keep: 48,
            // A raft snapshot of a few GB streams in minutes inside a VPC; ten leave margin.
            timeout_secs: 600,
            bound_cidrs: Vec::new(),
        }
    }
}

/// How operators log in once the root token is gone, configured right after init.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// S3 key (in `tls.bucket`) of the operator CA: client certificates it signed log in
    /// through `cert` auth with the admin policy. Must not be the cluster CA.
    pub operator_ca_key: Option<String>,
    /// The common names (globs allowed, as `allowed_common_names` takes them) of the
    /// operators' client certificates; required with `operator_ca_key`.
    pub operator_common_names: Vec<String>,
    /// Name of the admin policy (what operators need: sys, raft, policies, auth, mounts).
    pub admin_policy: Option<String>,
    /// IAM role ARNs whose sessions log in through AWS IAM auth (when the server has it).
    pub aws_role_arns: Vec<String>,
    /// STS endpoint for AWS auth (VPC endpoint); without it the server calls the public one.
    pub aws_sts_endpoint: Option<String>,
    pub aws_sts_region: Option<String>,
    pub aws_iam_endpoint: Option<String>,
    /// Value clients must send in `X-Vault-AWS-IAM-Server-ID`.
    pub aws_iam_server_id_header_value: Option<String>,
    /// OpenBao: register the external AWS auth plugin (a file in `vault.plugin_directory`)
    /// under this pinned SHA-256 before enabling it. Unset: use a built-in `aws` method.
    pub aws_plugin_sha256: Option<String>,
    /// The plugin's file name in `vault.plugin_directory`.
    pub aws_plugin_command: Option<String>,
}

impl AccessConfig {
    pub fn policy_name(&self) -> &str {
        self.admin_policy
            .as_deref()
            .unwrap_or("vault-bootstrap-admin")
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Peers are the pending/running instances sharing this tag's value.
    pub tag_key: String,
    /// Default: this instance's own value of `tag_key`.
    pub tag_value: Option<String>,
    /// Discovery retries until at least this many instances (self included) are visible.
    pub min_peers: usize,
    /// Bound on that retry loop.
    pub discovery_timeout_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            tag_key: "aws:autoscaling:groupName".into(),
            tag_value: None,
            min_peers: 1,
            // Bottlerocket's boot agents use a 300 s outer deadline for the same reason: an ASG
            // launches its instances within a minute or two of each other.
            discovery_timeout_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub bucket: String,
    #[serde(default = "default_cert_key")]
    pub cert_key: String,
    #[serde(default = "default_key_key")]
    pub key_key: String,
    #[serde(default = "default_ca_key")]
    pub ca_key: String,
    /// Expected SAN of the server certificate, and `leader_tls_servername` for retry_join.
    #[serde(default)]
    pub server_name: Option<String>,
    /// `refresh-tls` (and `boot`) warn when the certificate expires in fewer days.
    #[serde(default = "default_expiry_warning_days")]
    pub expiry_warning_days: u32,
}

fn default_expiry_warning_days() -> u32 {
    30
}

fn default_cert_key() -> String {
    "tls/server.pem".into()
}
fn default_key_key() -> String {
    "tls/server.key".into()
}
fn default_ca_key() -> String {
    "tls/ca.pem".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SealConfig {
    pub kms_key_id: String,
    /// KMS endpoint for the seal (VPC endpoint; tests point it at moto).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region of the KMS key; default: this instance's region.
    #[serde(default)]
    pub region: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LauncherKind {
    /// `systemctl start` the unit (production).
    Systemd,
    /// Spawn the server as the agent's child (tests, containers).
    Exec,
}

/// Which server the binary is: they differ in a few settings (audit devices).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// Ask the binary (`<binary> version`).
    Auto,
    /// HashiCorp Vault.
    Vault,
    /// OpenBao.
    Openbao,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VaultConfig {
    pub binary: PathBuf,
    /// `auto`, `vault` or `openbao`.
    pub flavor: Flavor,
    pub config_file: PathBuf,
    pub data_dir: PathBuf,
    pub tls_dir: PathBuf,
    /// `0.0.0.0`, any IP, or `private-ip` (this instance's local-ipv4).
    pub bind_address: String,
    pub api_port: u16,
    pub cluster_port: u16,
    pub performance_multiplier: u8,
    pub launcher: LauncherKind,
    pub unit: String,
    pub user: String,
    /// Bound on waiting for the API to answer `sys/health` after start.
    pub health_timeout_secs: u64,
    /// `telemetry.prometheus_retention_time`.
    pub prometheus_retention: String,
    /// `plugin_directory` of the server (external plugins, e.g. OpenBao's AWS auth).
    pub plugin_directory: Option<PathBuf>,
    pub ui: bool,
}

impl Default for VaultConfig {
    fn default() -> Self {
        VaultConfig {
            binary: "/usr/local/bin/vault".into(),
            flavor: Flavor::Auto,
            config_file: "/etc/vault.d/vault.hcl".into(),
            data_dir: "/opt/vault/data".into(),
            tls_dir: "/opt/vault/tls".into(),
            bind_address: "0.0.0.0".into(),
            api_port: 8200,
            cluster_port: 8201,
            performance_multiplier: 1,
            launcher: LauncherKind::Systemd,
            unit: "vault.service".into(),
            user: "vault".into(),
            // A server that cannot reach KMS exits and is restarted by systemd; two minutes
            // covers several such restarts before the agent gives up.
            health_timeout_secs: 120,
            prometheus_retention: "24h".into(),
            plugin_directory: None,
            ui: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    /// Bound on the retry loop around IMDS (it can be briefly down early in boot).
    pub imds_timeout_secs: u64,
    /// Bound on waiting for `InService` while the instance sits in a warm pool; 0 = no bound
    /// (a warm-pool instance is stopped by the ASG while it waits, and boots again later).
    pub warm_pool_timeout_secs: u64,
    /// Bound on retrying transient S3/EC2 failures of one step (throttling, 5xx, timeouts).
    pub aws_timeout_secs: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            state_dir: "/var/lib/vault-bootstrap".into(),
            imds_timeout_secs: 120,
            warm_pool_timeout_secs: 0,
            aws_timeout_secs: 120,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InitConfig {
    /// Whether `boot` may initialize a new cluster at all.
    pub enabled: bool,
    pub recovery_shares: u8,
    pub recovery_threshold: u8,
    /// Default: `tls.bucket`.
    pub escrow_bucket: Option<String>,
    /// Objects go under `<escrow_prefix>/<cluster tag value>/`.
    pub escrow_prefix: String,
    /// KMS key for the escrow; default: `seal.kms_key_id`. A separate key whose Decrypt is
    /// granted only to key holders is better.
    pub escrow_kms_key_id: Option<String>,
    /// One public key per key holder (`s3://bucket/key` or a file path); Vault then
    /// PGP-encrypts each share itself.
    pub recovery_pgp_keys: Vec<String>,
    pub revoke_root_token: bool,
    pub audit_file_path: PathBuf,
    /// Voters the cluster should have; autopilot's `min_quorum`.
    pub expected_size: u8,
    /// Whether autopilot removes voters it has not heard from for
    /// `dead_server_last_contact_threshold`, whatever their instance's state. Off by
    /// default: a voter that is only partitioned or stopped would be removed while it lives
    /// and, back, serve from a store the cluster no longer counts. The agent removes only
    /// peers whose instances EC2 reports terminated or absent (a leave, a reaping).
    pub cleanup_dead_servers: bool,
    /// With `cleanup_dead_servers`, autopilot removes a server silent this long (`1m` or
    /// more).
    pub dead_server_last_contact_threshold: String,
    /// No longer used: `sys/init` has no client timeout, since a timed-out call loses the
    /// only copy of the keys while the server goes on to commit them. Still accepted so
    /// that older files load; the boot warns when it is set.
    pub init_timeout_secs: Option<u64>,
    /// Bound on waiting for this node to be unsealed and a raft member.
    pub join_timeout_secs: u64,
}

impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            enabled: true,
            recovery_shares: 5,
            recovery_threshold: 3,
            escrow_bucket: None,
            escrow_prefix: "vault-bootstrap".into(),
            escrow_kms_key_id: None,
            recovery_pgp_keys: Vec::new(),
            revoke_root_token: true,
            audit_file_path: "/var/log/vault/audit.log".into(),
            expected_size: 3,
            cleanup_dead_servers: false,
            dead_server_last_contact_threshold: "10m".into(),
            init_timeout_secs: None,
            join_timeout_secs: 300,
        }
    }
}

impl Config {
    pub fn escrow_bucket(&self) -> &str {
        self.init
            .escrow_bucket
            .as_deref()
            .unwrap_or(&self.tls.bucket)
    }
    pub fn snapshot_bucket(&self) -> &str {
        self.snapshot
            .bucket
            .as_deref()
            .unwrap_or_else(|| self.escrow_bucket())
    }
    pub fn escrow_kms_key_id(&self) -> &str {
        self.init
            .escrow_kms_key_id
            .as_deref()
            .unwrap_or(&self.seal.kms_key_id)
    }
}

/// Parses `90s`, `10m`, `1h`, `2h30m` into seconds.
pub fn parse_duration_secs(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        };
    }
    if !num.is_empty() {
        return None;
    }
    (total > 0 || s.trim() == "0s").then_some(total)
}

/// Checks that `s` is a CIDR block `address/prefix` (IPv4 or IPv6) that excludes some
/// addresses; the error says what is wrong.
pub fn parse_cidr(s: &str) -> std::result::Result<(IpAddr, u8), String> {
    let Some((addr, len)) = s.split_once('/') else {
        return Err("is not a CIDR block: write address/prefix, e.g. \"10.0.0.0/16\" (a single address is \"10.0.1.5/32\")".into());
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("does not start with an IP address ({addr:?})"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("has a prefix length that is not 0..={max}"))?;
    if len == 0 {
        // A /0 admits every address: the binding would bind nothing.
        return Err("admits every address: name the VPC's CIDR, or remove the key for the instances' own addresses".into());
    }
    Ok((ip, len))
}

/// Where the address the server binds to comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindAddress {
    Ip(IpAddr),
    PrivateIp,
}

impl VaultConfig {
    pub fn bind(&self) -> BindAddress {
        match self.bind_address.parse::<IpAddr>() {
            Ok(ip) => BindAddress::Ip(ip),
            // validate() guarantees the only other value is "private-ip".
            Err(_) => BindAddress::PrivateIp,
        }
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::ConfigMissing { path: path.into() })
            }
            Err(source) => {
                return Err(Error::ConfigRead {
                    path: path.into(),
                    source,
                })
            }
        };
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            // toml's message says what is wrong but not always which key: quote the line.
            let message = match e.span() {
                Some(span) => {
                    let start = span.start.min(text.len());
                    let line_no = text[..start].matches('\n').count() + 1;
                    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
                    format!("{} (line {line_no}: `{line}`)", e.message().trim())
                }
                None => e.message().trim().to_string(),
            };
            Error::ConfigParse {
                path: path.into(),
                message,
            }
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, message: String| {
            Err(Error::ConfigInvalid {
                path: path.into(),
                key: key.into(),
                message,
            })
        };
        let nonempty = [
            ("cluster.tag_key", &self.cluster.tag_key),
            ("tls.bucket", &self.tls.bucket),
            ("tls.cert_key", &self.tls.cert_key),
            ("tls.key_key", &self.tls.key_key),
            ("tls.ca_key", &self.tls.ca_key),
            ("seal.kms_key_id", &self.seal.kms_key_id),
            ("vault.unit", &self.vault.unit),
            ("vault.user", &self.vault.user),
            (
                "vault.prometheus_retention",
                &self.vault.prometheus_retention,
            ),
        ];
        for (key, value) in nonempty {
            if value.trim().is_empty() {
                return bad(key, "must not be empty".into());
            }
        }
        if matches!(&self.cluster.tag_value, Some(v) if v.trim().is_empty()) {
            return bad(
                "cluster.tag_value",
                "must not be empty; remove it to use this instance's own tag value".into(),
            );
        }
        if self.cluster.min_peers == 0 {
            return bad("cluster.min_peers", "must be at least 1".into());
        }
        for (key, secs) in [
            (
                "cluster.discovery_timeout_secs",
                self.cluster.discovery_timeout_secs,
            ),
            ("vault.health_timeout_secs", self.vault.health_timeout_secs),
            ("agent.imds_timeout_secs", self.agent.imds_timeout_secs),
            ("agent.aws_timeout_secs", self.agent.aws_timeout_secs),
            ("snapshot.timeout_secs", self.snapshot.timeout_secs),
            ("lifecycle.heartbeat_secs", self.lifecycle.heartbeat_secs),
            (
                "lifecycle.launch_timeout_secs",
                self.lifecycle.launch_timeout_secs,
            ),
            (
                "lifecycle.leave_timeout_secs",
                self.lifecycle.leave_timeout_secs,
            ),
            (
                "lifecycle.watch_interval_secs",
                self.lifecycle.watch_interval_secs,
            ),
        ] {
            if secs == 0 {
                return bad(key, "must be at least 1 (seconds)".into());
            }
        }
        // The launch wait runs inside the boot unit's TimeoutStartSec (40 minutes): past it
        // systemd would kill the boot and start the wait again from zero while heartbeats
        // keep the hook alive, so the hook would never be abandoned.
        if self.lifecycle.launch_timeout_secs > MAX_LAUNCH_TIMEOUT_SECS {
            return bad(
                "lifecycle.launch_timeout_secs",
                format!(
                    "{} is above {MAX_LAUNCH_TIMEOUT_SECS}: the wait must end inside the boot unit's TimeoutStartSec (40 minutes) with the steps before it",
                    self.lifecycle.launch_timeout_secs
                ),
            );
        }
        // AWS allows a hook's heartbeat timeout of at most 7200 s, and a heartbeat must
        // come well inside it.
        if self.lifecycle.heartbeat_secs > MAX_HEARTBEAT_SECS {
            return bad(
                "lifecycle.heartbeat_secs",
                format!(
                    "{} is above {MAX_HEARTBEAT_SECS}: keep it well below the hooks' HeartbeatTimeout (at most 7200 s on AWS)",
                    self.lifecycle.heartbeat_secs
                ),
            );
        }
        if !(1..=10).contains(&self.vault.performance_multiplier) {
            return bad(
                "vault.performance_multiplier",
                format!(
                    "{} is out of range: use 1 (fastest elections, production) to 10",
                    self.vault.performance_multiplier
                ),
            );
        }
        if self.vault.api_port == 0 {
            return bad("vault.api_port", "must be a port number 1..=65535".into());
        }
        if self.vault.cluster_port == 0 {
            return bad(
                "vault.cluster_port",
                "must be a port number 1..=65535".into(),
            );
        }
        if self.vault.api_port == self.vault.cluster_port {
            return bad(
                "vault.cluster_port",
                "must differ from vault.api_port".into(),
            );
        }
        if self.vault.bind_address != "private-ip"
            && self.vault.bind_address.parse::<IpAddr>().is_err()
        {
            return bad(
                "vault.bind_address",
                format!(
                    "{:?} is neither an IP address nor \"private-ip\"",
                    self.vault.bind_address
                ),
            );
        }
        let paths = [
            ("vault.binary", &self.vault.binary),
            ("vault.config_file", &self.vault.config_file),
            ("vault.data_dir", &self.vault.data_dir),
            ("vault.tls_dir", &self.vault.tls_dir),
            ("agent.state_dir", &self.agent.state_dir),
        ];
        for (key, p) in paths {
            if !p.is_absolute() {
                return bad(key, format!("{} must be an absolute path", p.display()));
            }
        }
        if self.snapshot.keep == 0 {
            return bad(
                "snapshot.keep",
                "must be at least 1: 0 would delete the snapshot just taken".into(),
            );
        }
        if self.snapshot.prefix.trim_matches('/').is_empty() {
            return bad("snapshot.prefix", "must not be empty".into());
        }
        if matches!(&self.snapshot.bucket, Some(b) if b.trim().is_empty()) {
            return bad(
                "snapshot.bucket",
                "must not be empty; remove it to use the escrow bucket".into(),
            );
        }
        for c in &self.snapshot.bound_cidrs {
            if let Err(why) = parse_cidr(c) {
                return bad("snapshot.bound_cidrs", format!("{c:?} {why}"));
            }
        }
        for c in &self.lifecycle.bound_cidrs {
            if let Err(why) = parse_cidr(c) {
                return bad("lifecycle.bound_cidrs", format!("{c:?} {why}"));
            }
        }
        for (key, v) in [
            ("lifecycle.launch_hook", &self.lifecycle.launch_hook),
            ("lifecycle.terminate_hook", &self.lifecycle.terminate_hook),
            ("lifecycle.group", &self.lifecycle.group),
        ] {
            if matches!(v, Some(v) if v.trim().is_empty()) {
                return bad(key, "must not be empty; remove the key instead".into());
            }
        }
        if self.lifecycle.hooks()
            && self.lifecycle.bound_cidrs.is_empty()
            && self.snapshot.bound_cidrs.is_empty()
        {
            return bad(
                "lifecycle.bound_cidrs",
                "must name the group's subnets (or the VPC's CIDR) when lifecycle hooks are set, here or in snapshot.bound_cidrs: by default the lifecycle AppRole is bound to the addresses known at init, and the replacements of an instance refresh (new addresses) could never log in, so every launch hook would be abandoned".into(),
            );
        }
        if self.lifecycle.hooks()
            && self.lifecycle.group.is_none()
            && self.cluster.tag_key != ASG_TAG
        {
            return bad(
                "lifecycle.group",
                format!("must name the Auto Scaling group: cluster.tag_key is not {ASG_TAG}, so the group cannot be read from the instance's tags"),
            );
        }
        if let Some(ep) = &self.seal.endpoint {
            if !(ep.starts_with("https://") || ep.starts_with("http://")) {
                return bad("seal.endpoint", format!("{ep:?} must be an http(s):// URL"));
            }
        }
        self.validate_init(path)
    }

    fn validate_access(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, message: String| {
            Err(Error::ConfigInvalid {
                path: path.into(),
                key: key.into(),
                message,
            })
        };
        for arn in &self.access.aws_role_arns {
            // Bind roles, never assumed-role session ARNs: those change with every session.
            let ok = arn.starts_with("arn:")
                && arn
                    .split(':')
                    .nth(5)
                    .is_some_and(|r| r.starts_with("role/"));
            if !ok {
                return bad(
                    "access.aws_role_arns",
                    format!("{arn:?} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"),
                );
            }
        }
        if let Some(sha) = &self.access.aws_plugin_sha256 {
            if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
                return bad(
                    "access.aws_plugin_sha256",
                    format!("{sha:?} is not a hex SHA-256 (64 characters)"),
                );
            }
            if self.vault.plugin_directory.is_none() || self.access.aws_plugin_command.is_none() {
                return bad(
                    "access.aws_plugin_sha256",
                    "needs vault.plugin_directory and access.aws_plugin_command (the plugin's file name there)".into(),
                );
            }
        }
        let names = &self.access.operator_common_names;
        if self.access.operator_ca_key.is_some() && names.is_empty() {
            return bad(
                "access.operator_common_names",
                "must list the common names of the operators' client certificates when access.operator_ca_key is set: with no list, every certificate the operator CA signs (a server's, a test's, anyone's) would log in as an administrator".into(),
            );
        }
        if self.access.operator_ca_key.is_none() && !names.is_empty() {
            return bad(
                "access.operator_common_names",
                "has no effect without access.operator_ca_key (the CA whose certificates it names): set that too, or remove this key".into(),
            );
        }
        for n in names {
            if n.trim().is_empty() || n.trim().chars().all(|c| c == '*') {
                return bad(
                    "access.operator_common_names",
                    format!("{n:?} names no one (or everyone): list each operator's common name, e.g. [\"alice\", \"bob\"]"),
                );
            }
        }
        if !self.access.aws_role_arns.is_empty() && self.access.aws_sts_endpoint.is_none() {
            return bad(
                "access.aws_sts_endpoint",
                "must be set with aws_role_arns: without it the server calls the public STS host"
                    .into(),
            );
        }
        Ok(())
    }

    fn validate_init(&self, path: &Path) -> Result<()> {
        self.validate_access(path)?;
        let bad = |key: &str, message: String| {
            Err(Error::ConfigInvalid {
                path: path.into(),
                key: key.into(),
                message,
            })
        };
        let i = &self.init;
        if !(1..=10).contains(&i.recovery_shares) {
            return bad(
                "init.recovery_shares",
                format!("{} is out of range 1..=10", i.recovery_shares),
            );
        }
        if i.recovery_threshold == 0 || i.recovery_threshold > i.recovery_shares {
            return bad(
                "init.recovery_threshold",
                format!(
                    "{} must be between 1 and init.recovery_shares ({})",
                    i.recovery_threshold, i.recovery_shares
                ),
            );
        }
        if !i.recovery_pgp_keys.is_empty()
            && i.recovery_pgp_keys.len() != i.recovery_shares as usize
        {
            return bad(
                "init.recovery_pgp_keys",
                format!(
                    "has {} keys but init.recovery_shares is {}: give one public key per share",
                    i.recovery_pgp_keys.len(),
                    i.recovery_shares
                ),
            );
        }
        if i.expected_size < 3 {
            return bad(
                "init.expected_size",
                format!(
                    "{} is below 3: a raft cluster needs 3 voters to survive one failure",
                    i.expected_size
                ),
            );
        }
        match parse_duration_secs(&i.dead_server_last_contact_threshold) {
            Some(s) if s >= 60 => {}
            _ => {
                return bad(
                    "init.dead_server_last_contact_threshold",
                    format!(
                        "{:?} must be a duration of at least 1m (e.g. \"10m\"): shorter removes servers that are only restarting",
                        i.dead_server_last_contact_threshold
                    ),
                )
            }
        }
        if i.join_timeout_secs == 0 {
            return bad(
                "init.join_timeout_secs",
                "must be at least 1 (seconds)".into(),
            );
        }
        if i.escrow_prefix.trim_matches('/').is_empty() {
            return bad("init.escrow_prefix", "must not be empty".into());
        }
        if !i.audit_file_path.is_absolute() {
            return bad(
                "init.audit_file_path",
                format!("{} must be an absolute path", i.audit_file_path.display()),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[tls]
bucket = "vault-resources"
[seal]
kms_key_id = "alias/vault-unseal"
"#;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/vault-bootstrap/config.toml"))
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.cluster.tag_key, "aws:autoscaling:groupName");
        assert_eq!(c.tls.cert_key, "tls/server.pem");
        assert_eq!(c.vault.binary, PathBuf::from("/usr/local/bin/vault"));
        assert_eq!(c.vault.api_port, 8200);
        assert_eq!(c.vault.launcher, LauncherKind::Systemd);
        assert_eq!(c.vault.bind(), BindAddress::Ip("0.0.0.0".parse().unwrap()));
        assert_eq!(c.agent.state_dir, PathBuf::from("/var/lib/vault-bootstrap"));
    }

    #[test]
    fn lifecycle_waits_are_bounded_by_the_boot_unit_and_aws() {
        for (key, ok, bad_value) in [
            (
                "launch_timeout_secs",
                MAX_LAUNCH_TIMEOUT_SECS,
                MAX_LAUNCH_TIMEOUT_SECS + 1,
            ),
            ("heartbeat_secs", MAX_HEARTBEAT_SECS, MAX_HEARTBEAT_SECS + 1),
        ] {
            assert!(parse(&format!("{MINIMAL}[lifecycle]\n{key} = {ok}\n")).is_ok());
            let e = parse(&format!("{MINIMAL}[lifecycle]\n{key} = {bad_value}\n")).unwrap_err();
            assert!(e.to_string().contains(&format!("lifecycle.{key}")), "{e}");
            assert_eq!(e.exit_code(), crate::error::exit::CONFIG);
        }
    }

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../tests/fixtures/config/example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.vault.bind(), BindAddress::Ip("0.0.0.0".parse().unwrap()));
    }

    #[test]
    fn unknown_key_is_named_with_the_file() {
        let e = parse(&format!("{MINIMAL}\n[vault]\napi_prot = 8200\n")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("api_prot"), "{msg}");
        assert!(msg.contains("/etc/vault-bootstrap/config.toml"), "{msg}");
        assert_eq!(e.exit_code(), 78);
    }

    #[test]
    fn missing_required_key_is_named() {
        let e = parse("[tls]\nbucket = \"b\"\n").unwrap_err();
        assert!(e.to_string().contains("seal"), "{e}");
        let e = parse("[tls]\n[seal]\nkms_key_id = \"k\"\n").unwrap_err();
        assert!(e.to_string().contains("bucket"), "{e}");
        assert_eq!(e.exit_code(), 78);
    }

    #[test]
    fn wrong_type_is_named() {
        let e = parse(&format!("{MINIMAL}\n[vault]\napi_port = \"8200\"\n")).unwrap_err();
        assert!(e.to_string().contains("api_port"), "{e}");
        assert_eq!(e.exit_code(), 78);
    }

    #[test]
    fn validation_names_the_key() {
        let cases = [
            (
                "[vault]\nperformance_multiplier = 11\n",
                "vault.performance_multiplier",
            ),
            (
                "[vault]\nperformance_multiplier = 0\n",
                "vault.performance_multiplier",
            ),
            ("[vault]\nbind_address = \"eth0\"\n", "vault.bind_address"),
            ("[vault]\ncluster_port = 8200\n", "vault.cluster_port"),
            ("[vault]\ndata_dir = \"relative\"\n", "vault.data_dir"),
            ("[cluster]\nmin_peers = 0\n", "cluster.min_peers"),
            ("[cluster]\ntag_value = \"\"\n", "cluster.tag_value"),
            (
                "[agent]\nimds_timeout_secs = 0\n",
                "agent.imds_timeout_secs",
            ),
        ];
        for (extra, key) in cases {
            let e = parse(&format!("{MINIMAL}\n{extra}")).unwrap_err();
            assert!(e.to_string().contains(key), "{extra}: {e}");
            assert_eq!(e.exit_code(), 78);
        }
        let e =
            parse("[tls]\nbucket = \"b\"\n[seal]\nkms_key_id = \"k\"\nendpoint = \"kms.local\"\n")
                .unwrap_err();
        assert!(e.to_string().contains("seal.endpoint"), "{e}");
    }

    #[test]
    fn snapshot_bound_cidrs_are_checked() {
        let c = parse(MINIMAL).unwrap();
        assert!(
            c.snapshot.bound_cidrs.is_empty(),
            "default: the instances' addresses"
        );
        let c = parse(&format!(
            "{MINIMAL}\n[snapshot]\nbound_cidrs = [\"10.0.0.0/16\", \"fd00::/8\"]\n"
        ))
        .unwrap();
        assert_eq!(c.snapshot.bound_cidrs, ["10.0.0.0/16", "fd00::/8"]);
        for (bad, why) in [
            ("10.0.0.5", "address/prefix"),
            ("10.0.0.0/33", "0..=32"),
            ("vpc/16", "IP address"),
            ("0.0.0.0/0", "every address"),
        ] {
            let e = parse(&format!(
                "{MINIMAL}\n[snapshot]\nbound_cidrs = [\"{bad}\"]\n"
            ))
            .unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("snapshot.bound_cidrs") && msg.contains(why),
                "{bad}: {msg}"
            );
            assert_eq!(e.exit_code(), 78);
        }
    }

    #[test]
    fn an_operator_ca_needs_the_operators_common_names() {
        let ca = "[access]\noperator_ca_key = \"tls/operator-ca.pem\"\n";
        let e = parse(&format!("{MINIMAL}\n{ca}")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("access.operator_common_names") && msg.contains("every certificate"),
            "{msg}"
        );
        assert_eq!(e.exit_code(), 78);
        let c = parse(&format!(
            "{MINIMAL}\n{ca}operator_common_names = [\"alice\", \"bob\"]\n"
        ))
        .unwrap();
        assert_eq!(c.access.operator_common_names, ["alice", "bob"]);
        for names in ["[\"\"]", "[\"*\"]"] {
            let e =
                parse(&format!("{MINIMAL}\n{ca}operator_common_names = {names}\n")).unwrap_err();
            assert!(
                e.to_string().contains("access.operator_common_names"),
                "{names}: {e}"
            );
        }
        // Names without the CA they belong to: a mistake, not a silent no-op.
        let e = parse(&format!(
            "{MINIMAL}\n[access]\noperator_common_names = [\"alice\"]\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("operator_ca_key"), "{e}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_secs("10m"), Some(600));
        assert_eq!(parse_duration_secs("1h30m"), Some(5400));
        assert_eq!(parse_duration_secs("90s"), Some(90));
        assert_eq!(parse_duration_secs("10"), None);
        assert_eq!(parse_duration_secs("x"), None);
    }

    #[test]
    fn escrow_defaults_follow_tls_and_seal() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.escrow_bucket(), "vault-resources");
        assert_eq!(c.escrow_kms_key_id(), "alias/vault-unseal");
        assert_eq!(c.init.recovery_shares, 5);
        assert!(c.init.revoke_root_token);
    }

    #[test]
    fn private_ip_bind_is_accepted() {
        let c = parse(&format!(
            "{MINIMAL}\n[vault]\nbind_address = \"private-ip\"\n"
        ))
        .unwrap();
        assert_eq!(c.vault.bind(), BindAddress::PrivateIp);
    }

    #[test]
    fn missing_file_is_noinput() {
        let e = Config::load(Path::new("/nonexistent/vb.toml")).unwrap_err();
        assert_eq!(e.exit_code(), 66);
        assert!(e.to_string().contains("/nonexistent/vb.toml"));
    }
}
