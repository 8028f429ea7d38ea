//! Recovery-key escrow: every recovery share and the root token, each KMS-encrypted under
//! the escrow key with an encryption context naming the cluster and the item, written to
//! S3 write-once (`If-None-Match: *`, SSE-KMS), read back and decrypted to verify, then a
//! final "cluster initialized" marker.
//!
//! Layout under `s3://<escrow_bucket>/<escrow_prefix>/<cluster>/`:
//! `recovery-key-<n>.enc` (n from 1), `root-token.enc`, `snapshot-approle.enc` (the
//! snapshot credentials, see `crate::snapshot`), `cluster-initialized.json`,
//! `init-lock/<generation>.json` (see `init::lock`). After a rotation (`crate::rotation`)
//! the recovery keys and node credentials in force live under `generations/<n>/`
//! ([`generation`]).
//! An operator can decrypt an item with plain `aws kms decrypt` and the context below.

pub mod finish;
pub mod generation;
pub mod pending;

use crate::aws::kms::{Context, Kms};
use crate::aws::s3::{ObjectStore, PutOutcome};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::retry;
use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Encryption-context keys (stable: operators use them to decrypt by hand, and the IAM
/// policies grant `kms:Decrypt` by them).
pub const CTX_CLUSTER: &str = "vault-bootstrap:cluster";
pub const CTX_ITEM: &str = "vault-bootstrap:item";
pub const CTX_CLASS: &str = "vault-bootstrap:class";
/// The pending init file's data key only: the ARN of the instance that wrote it.
pub const CTX_INSTANCE: &str = "vault-bootstrap:instance";

/// Who may decrypt an item, as the policies tell classes apart (docs/security.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Recovery shares and the root token: operators only, never a node.
    Recovery,
    /// Credentials the nodes themselves use (the snapshot and lifecycle AppRoles).
    NodeCredential,
    /// The pending init file's data key: only the instance that wrote it.
    Pending,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Recovery => "recovery",
            Class::NodeCredential => "node-credential",
            Class::Pending => "pending",
        }
    }
}

/// Where one cluster's escrow lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub bucket: String,
    /// `<escrow_prefix>/<cluster>/`
    pub prefix: String,
    pub kms_key_id: String,
    pub cluster: String,
    /// Which generation of the recovery keys and node credentials [`Layout::object`] names:
    /// [`generation::FIRST`] (init's, directly under `prefix`) until a rotation.
    pub generation: u32,
}

impl Layout {
    pub fn new(cfg: &Config, cluster: &str) -> Layout {
        Layout {
            bucket: cfg.escrow_bucket().to_owned(),
            prefix: format!("{}/{}/", cfg.init.escrow_prefix.trim_matches('/'), cluster),
            kms_key_id: cfg.escrow_kms_key_id().to_owned(),
            cluster: cluster.to_owned(),
            generation: generation::FIRST,
        }
    }

    /// The same escrow, naming generation `n`'s items.
    pub fn at(&self, n: u32) -> Layout {
        Layout {
            generation: n,
            ..self.clone()
        }
    }

    /// The escrow key by its ARN when the config names an alias or a key id: every object
    /// under the escrow prefix is written with SSE-KMS under it, and the shipped bucket
    /// policy compares `s3:x-amz-server-side-encryption-aws-kms-key-id` with the key ARN. A
    /// failed `DescribeKey` keeps the configured name (then a policy that compares ARNs
    /// refuses the write, and says so).
    pub async fn resolve_key_arn<K: Kms>(&mut self, kms: &K, aws: Duration) {
        if self.kms_key_id.starts_with("arn:") {
            return;
        }
        match retry::retry("DescribeKey (escrow key)", aws, || {
            kms.describe(&self.kms_key_id)
        })
        .await
        {
            Ok(arn) if arn.starts_with("arn:") => self.kms_key_id = arn,
            Ok(_) => {}
            Err(e) => tracing::warn!(
                key = %self.kms_key_id,
                "could not resolve the escrow key to its ARN ({e}); writing with the configured name"
            ),
        }
    }

    pub fn share_item(n: usize) -> String {
        format!("recovery-key-{n}")
    }
    pub const ROOT_ITEM: &'static str = "root-token";
    /// The snapshot AppRole's role_id and secret_id (JSON), see `crate::snapshot`.
    pub const SNAPSHOT_APPROLE_ITEM: &'static str = "snapshot-approle";
    /// The lifecycle AppRole's role_id and secret_id (JSON), see `crate::lifecycle`.
    pub const LIFECYCLE_APPROLE_ITEM: &'static str = "lifecycle-approle";

    /// Item `item` of this layout's generation: init's items sit directly under the prefix
    /// (where they always were), a rotation's under its generation's directory.
    pub fn object(&self, item: &str) -> String {
        if self.generation <= generation::FIRST {
            format!("{}{item}.enc", self.prefix)
        } else {
            format!("{}{item}.enc", self.generation_dir(self.generation))
        }
    }
    /// `generations/<n>/`: a rotation's items and records.
    pub fn generation_dir(&self, n: u32) -> String {
        format!("{}generations/{n}/", self.prefix)
    }
    pub fn marker(&self) -> String {
        format!("{}cluster-initialized.json", self.prefix)
    }
    pub fn lock_dir(&self) -> String {
        format!("{}init-lock/", self.prefix)
    }
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
    /// The class of an escrow item, by its name.
    pub fn class_of(item: &str) -> Class {
        if item == Self::SNAPSHOT_APPROLE_ITEM || item == Self::LIFECYCLE_APPROLE_ITEM {
            Class::NodeCredential
        } else {
            Class::Recovery
        }
    }

    /// An escrow item's encryption context: cluster, item and class.
    pub fn context(&self, item: &str) -> Context {
        self.context_of(item, Self::class_of(item))
    }

    pub fn context_of(&self, item: &str, class: Class) -> Context {
        vec![
            (CTX_CLUSTER.to_owned(), self.cluster.clone()),
            (CTX_ITEM.to_owned(), item.to_owned()),
            (CTX_CLASS.to_owned(), class.as_str().to_owned()),
        ]
    }
}

/// What `sys/init` returned that must never be lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSecrets {
    /// Hex shares, or base64 PGP messages when `pgp`.
    pub shares: Vec<Secret>,
    pub root_token: Secret,
    pub pgp: bool,
    pub threshold: u8,
}

impl InitSecrets {
    /// (item name, secret) in escrow order.
    pub fn items(&self) -> Vec<(String, &Secret)> {
        let mut v: Vec<(String, &Secret)> = self
            .shares
            .iter()
            .enumerate()
            .map(|(i, s)| (Layout::share_item(i + 1), s))
            .collect();
        v.push((Layout::ROOT_ITEM.to_owned(), &self.root_token));
        v
    }
}

/// The "cluster initialized" marker: public facts only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Marker {
    pub cluster: String,
    pub instance_id: String,
    pub initialized_unix: u64,
    pub recovery_shares: usize,
    pub recovery_threshold: u8,
    pub pgp: bool,
    pub kms_key_id: String,
    /// The initialized cluster's `cluster_id` (`sys/health`): a node serving another id is
    /// not a member of this cluster and never reports ready. Absent in markers written
    /// before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
}

/// Test-only crash injection: `VAULT_BOOTSTRAP_CRASH_AT=<point>` kills the agent with
/// SIGKILL at that point, so the tests can prove every step between `sys/init` and the
/// marker is crash-safe. Harmless in production: it can only stop the agent itself.
pub fn crash_point(point: &str) {
    if std::env::var("VAULT_BOOTSTRAP_CRASH_AT").ok().as_deref() == Some(point) {
        tracing::warn!(point, "test hook: killing the agent with SIGKILL");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Test-only pause: `VAULT_BOOTSTRAP_PAUSE_AT=<point>:<ms>` makes the agent wait that long
/// at that point, so a test can hold two nodes inside a window that is milliseconds wide in
/// production (two leavers between their decision and their removal) and prove what the
/// agent does when both are in it. Harmless in production: it can only slow the agent.
pub async fn pause_point(point: &str) {
    let Ok(v) = std::env::var("VAULT_BOOTSTRAP_PAUSE_AT") else {
        return;
    };
    let Some((p, ms)) = v.split_once(':') else {
        return;
    };
    if p == point {
        if let Ok(ms) = ms.parse::<u64>() {
            tracing::warn!(point, ms, "test hook: pausing here");
            tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
        }
    }
}

/// Test-only fault injection: `VAULT_BOOTSTRAP_FAIL_AT=<point>` makes the step at that
/// point fail as if the operating system refused it, so the tests can prove what the agent
/// does when a write it cannot do without fails. Harmless in production: it can only make
/// the agent itself fail.
pub fn fault_point(point: &str) -> bool {
    let hit = std::env::var("VAULT_BOOTSTRAP_FAIL_AT").ok().as_deref() == Some(point);
    if hit {
        tracing::warn!(point, "test hook: failing this step");
    }
    hit
}

use crate::clock::now_unix;

/// Each item's ciphertext as this node wrote it (not secret): what the read-back compares
/// with S3's bytes, and what a resumed run uploads again (KMS never encrypts the same way
/// twice, so a fresh encryption could not be compared with what an earlier run uploaded).
pub type Sealed = Vec<(String, Vec<u8>)>;

/// Encrypts every item under the escrow key, each with its own context.
pub async fn encrypt_items<K: Kms>(
    kms: &K,
    layout: &Layout,
    secrets: &InitSecrets,
    deadline: Duration,
) -> Result<Sealed> {
    let mut sealed = Vec::new();
    for (name, secret) in secrets.items() {
        let ctx = layout.context(&name);
        let ct = retry::retry("encrypt escrow item", deadline, || {
            kms.encrypt(&layout.kms_key_id, secret.expose().as_bytes(), &ctx)
        })
        .await?;
        sealed.push((name, ct));
    }
    Ok(sealed)
}

/// Uploads every sealed item write-once, verifies each by reading it back (the bytes and
/// S3's SHA-256 checksum against what was written; nothing is decrypted: a node may write
/// the escrow but never read a recovery key), then writes the marker. Safe to run again
/// after a crash at any point with the same `sealed`: an item already present is accepted
/// only if it holds exactly these bytes.
pub async fn escrow<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    sealed: &Sealed,
    secrets: &InitSecrets,
    instance_id: &str,
    cluster_id: Option<&str>,
    deadline: Duration,
) -> Result<Marker> {
    for (name, ct) in sealed {
        if upload_item(s3, layout, name, ct, deadline).await? == PutOutcome::Exists {
            // A previous run (crashed) wrote it: the read-back below accepts it only if it
            // holds these bytes.
            tracing::info!(item = %name, "escrow item already present (resumed)");
        }
        crash_point(&format!("uploaded-{name}"));
    }
    for (name, ct) in sealed {
        check_stored(s3, layout, name, ct, deadline).await?;
    }
    tracing::info!(
        items = sealed.len(),
        "every escrow item read back: the bytes and S3's SHA-256 are what was written"
    );
    crash_point("verified");

    let marker = Marker {
        cluster: layout.cluster.clone(),
        instance_id: instance_id.to_owned(),
        initialized_unix: now_unix(),
        recovery_shares: secrets.shares.len(),
        recovery_threshold: secrets.threshold,
        pgp: secrets.pgp,
        kms_key_id: layout.kms_key_id.clone(),
        cluster_id: cluster_id.map(str::to_owned),
    };
    let body = serde_json::to_vec_pretty(&marker).map_err(|e| Error::Internal(e.to_string()))?;
    let key = layout.marker();
    let put = retry::retry("write the cluster-initialized marker", deadline, || {
        s3.put_if_absent(&layout.bucket, &key, body.clone(), Some(&layout.kms_key_id))
    })
    .await?;
    if put == PutOutcome::Exists {
        let existing = read_marker(s3, layout, deadline).await?;
        match existing {
            Some(m) if m.instance_id == instance_id => {}
            Some(m) => {
                return Err(Error::Escrow {
                    message: format!(
                        "{} already names instance {} as the one that initialized cluster {}: two initializations? Keep this node's escrow and investigate before anything else",
                        layout.url(&key),
                        m.instance_id,
                        layout.cluster
                    ),
                })
            }
            None => {}
        }
    }
    crash_point("marker-written");
    tracing::info!(marker = %layout.url(&key), "cluster-initialized marker written");
    Ok(marker)
}

/// Writes one sealed item write-once; `Exists` when an earlier run wrote it.
pub async fn upload_item<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    name: &str,
    ct: &[u8],
    deadline: Duration,
) -> Result<PutOutcome> {
    let key = layout.object(name);
    retry::retry("upload escrow item", deadline, || {
        s3.put_if_absent(&layout.bucket, &key, ct.to_vec(), Some(&layout.kms_key_id))
    })
    .await
}

/// Reads item `name` back: an error unless S3 holds exactly `ct`, with S3's SHA-256 of it.
pub async fn check_stored<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    name: &str,
    ct: &[u8],
    deadline: Duration,
) -> Result<()> {
    let key = layout.object(name);
    let stored = retry::retry("read escrow item back", deadline, || {
        s3.get_checked(&layout.bucket, &key)
    })
    .await?;
    if stored.body != ct {
        return Err(Error::Escrow {
            message: format!(
                "{} holds other bytes than this node's init wrote (another writer, or an earlier init's item); not overwriting it: investigate before anything else",
                layout.url(&key)
            ),
        });
    }
    match stored.sha256 {
        Some(sum) if sum == crate::aws::s3::sha256_b64(ct) => Ok(()),
        Some(_) => Err(Error::Escrow {
            message: format!(
                "{}: S3's SHA-256 checksum does not match the bytes read back; read it again, and check the bucket for tampering",
                layout.url(&key)
            ),
        }),
        None => Err(Error::Escrow {
            message: format!(
                "{} has no SHA-256 checksum: it was not written by this agent's write-once upload",
                layout.url(&key)
            ),
        }),
    }
}

/// Encrypts one node-credential item and writes it write-once; `Exists` when an earlier run
/// wrote it (nothing is overwritten). Returns the ciphertext for [`check_stored`].
pub async fn put_item<S: ObjectStore, K: Kms>(
    s3: &S,
    kms: &K,
    layout: &Layout,
    name: &str,
    secret: &Secret,
    deadline: Duration,
) -> Result<(PutOutcome, Vec<u8>)> {
    let ctx = layout.context(name);
    let ct = retry::retry("encrypt escrow item", deadline, || {
        kms.encrypt(&layout.kms_key_id, secret.expose().as_bytes(), &ctx)
    })
    .await?;
    let put = upload_item(s3, layout, name, &ct, deadline).await?;
    Ok((put, ct))
}

/// Reads and decrypts one item. A recovery item decrypts only with the operator role: a
/// denial says so.
pub async fn decrypt_item<S: ObjectStore, K: Kms>(
    s3: &S,
    kms: &K,
    layout: &Layout,
    name: &str,
    deadline: Duration,
) -> Result<Secret> {
    let key = layout.object(name);
    let ct = retry::retry("read escrow item", deadline, || {
        s3.get(&layout.bucket, &key)
    })
    .await?;
    let ctx = layout.context(name);
    let plain = retry::retry("decrypt escrow item", deadline, || kms.decrypt(&ct, &ctx))
        .await
        .map_err(|e| match e {
            // Not "grant the instance role": the node role must never read these.
            Error::Aws {
                operation,
                resource,
                failure: crate::error::AwsFailure::Denied,
                ..
            } if Layout::class_of(name) == Class::Recovery => Error::Aws {
                operation,
                resource,
                failure: crate::error::AwsFailure::Denied,
                message: "access denied: recovery keys and the root token decrypt only with the operator role (packer/examples/iam-policy-operator.json), never with a node's role. Run this with operator credentials".into(),
            },
            e => e,
        })?;
    let s = std::str::from_utf8(&plain).map_err(|_| Error::Escrow {
        message: format!(
            "{} decrypts to something that is not text",
            layout.url(&key)
        ),
    })?;
    Ok(Secret::new(s))
}

pub async fn read_marker<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    deadline: Duration,
) -> Result<Option<Marker>> {
    let key = layout.marker();
    let body = retry::retry("read the cluster-initialized marker", deadline, || {
        s3.get_opt(&layout.bucket, &key)
    })
    .await?;
    match body {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Escrow {
                message: format!("{} is not a marker this agent wrote: {e}", layout.url(&key)),
            }),
    }
}

/// The marker, or an error saying there is none (commands that need an escrow to exist).
pub async fn require_marker<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    deadline: Duration,
) -> Result<Marker> {
    read_marker(s3, layout, deadline)
        .await?
        .ok_or_else(|| Error::Escrow {
            message: format!("no escrow marker at {}", layout.url(&layout.marker())),
        })
}

/// What `escrow verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub marker: bool,
    /// The generation in force ([`generation`]), whose shares were checked.
    pub generation: u32,
    pub shares_expected: usize,
    pub shares_ok: usize,
    /// Init's root token (generation 1 only: a rotation makes no root token).
    pub root_token_ok: bool,
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.marker
            && self.shares_expected > 0
            && self.shares_ok == self.shares_expected
            && self.problems.is_empty()
    }
}

/// Checks that the marker and every share of the generation in force are present and
/// decrypt; never returns secrets.
pub async fn verify<S: ObjectStore, K: Kms>(
    s3: &S,
    kms: &K,
    layout: &Layout,
    deadline: Duration,
) -> Result<Report> {
    let current = match read_marker(s3, layout, deadline).await? {
        Some(m) => Some(generation::current_of(s3, layout, &m, deadline).await?),
        None => None,
    };
    let mut r = Report {
        marker: current.is_some(),
        generation: current
            .as_ref()
            .map_or(generation::FIRST, |c| c.layout.generation),
        shares_expected: current.as_ref().map_or(0, |c| c.shares),
        shares_ok: 0,
        root_token_ok: false,
        problems: Vec::new(),
    };
    if current.is_none() {
        r.problems.push(format!(
            "marker {} is missing",
            layout.url(&layout.marker())
        ));
    }
    let at = layout.at(r.generation);
    for n in 1..=r.shares_expected {
        let name = Layout::share_item(n);
        match decrypt_item(s3, kms, &at, &name, deadline).await {
            Ok(_) => r.shares_ok += 1,
            // Denied is not a finding about the escrow: these credentials may not read it
            // (the node role), and the error says which role can.
            Err(
                e @ Error::Aws {
                    failure: crate::error::AwsFailure::Denied,
                    ..
                },
            ) => return Err(e),
            Err(e) => r.problems.push(format!("{name}: {e}")),
        }
    }
    r.root_token_ok = decrypt_item(
        s3,
        kms,
        &layout.at(generation::FIRST),
        Layout::ROOT_ITEM,
        deadline,
    )
    .await
    .is_ok();
    Ok(r)
}

#[cfg(test)]
pub(crate) mod fake {
    //! In-memory S3 and KMS for the escrow and lock logic's tests.
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use zeroize::Zeroizing;

    #[derive(Default)]
    pub struct FakeS3 {
        pub objects: Mutex<BTreeMap<(String, String), Vec<u8>>>,
        /// When set, every call fails with this (transient) failure message.
        pub down: Mutex<bool>,
    }

    fn down_err() -> Error {
        Error::Aws {
            operation: "S3",
            resource: "fake".into(),
            failure: crate::error::AwsFailure::Transient,
            message: "connection refused".into(),
        }
    }

    impl ObjectStore for FakeS3 {
        async fn get(&self, bucket: &str, key: &str) -> Result<Vec<u8>> {
            if *self.down.lock().unwrap() {
                return Err(down_err());
            }
            self.objects
                .lock()
                .unwrap()
                .get(&(bucket.into(), key.into()))
                .cloned()
                .ok_or(Error::Aws {
                    operation: "GetObject",
                    resource: key.into(),
                    failure: crate::error::AwsFailure::NotFound,
                    message: "NoSuchKey".into(),
                })
        }
        async fn put_if_absent(
            &self,
            bucket: &str,
            key: &str,
            body: Vec<u8>,
            _k: Option<&str>,
        ) -> Result<PutOutcome> {
            if *self.down.lock().unwrap() {
                return Err(down_err());
            }
            let mut o = self.objects.lock().unwrap();
            let k = (bucket.to_string(), key.to_string());
            if o.contains_key(&k) {
                return Ok(PutOutcome::Exists);
            }
            o.insert(k, body);
            Ok(PutOutcome::Created)
        }
        async fn get_checked(&self, bucket: &str, key: &str) -> Result<crate::aws::s3::Stored> {
            // S3 computes the checksum at the write; so does this fake (of what it holds).
            let body = self.get(bucket, key).await?;
            let sha256 = Some(crate::aws::s3::sha256_b64(&body));
            Ok(crate::aws::s3::Stored { body, sha256 })
        }
        async fn delete(&self, bucket: &str, key: &str) -> Result<()> {
            if *self.down.lock().unwrap() {
                return Err(down_err());
            }
            self.objects
                .lock()
                .unwrap()
                .remove(&(bucket.to_string(), key.to_string()));
            Ok(())
        }
        async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
            Ok(self
                .objects
                .lock()
                .unwrap()
                .keys()
                .filter(|(b, k)| b == bucket && k.starts_with(prefix))
                .map(|(_, k)| k.clone())
                .collect())
        }
    }

    /// "Encrypts" by framing the plaintext with its context and a fresh nonce (real KMS
    /// never returns the same ciphertext twice); decrypt checks the context and records it.
    #[derive(Default)]
    pub struct FakeKms {
        pub down: Mutex<bool>,
        pub nonce: std::sync::atomic::AtomicU64,
        /// The context of every decrypt asked for, in order.
        pub decrypts: Mutex<Vec<Context>>,
        /// Decrypts of this class are denied, as the node policy denies class `recovery`.
        pub deny_class: Mutex<Option<Class>>,
    }

    impl FakeKms {
        /// How many decrypts asked for a context of `class`.
        pub fn decrypts_of(&self, class: Class) -> usize {
            self.decrypts
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.iter().any(|(k, v)| k == CTX_CLASS && v == class.as_str()))
                .count()
        }
    }

    fn frame(ctx: &Context) -> String {
        ctx.iter().map(|(k, v)| format!("{k}={v};")).collect()
    }

    impl Kms for FakeKms {
        async fn encrypt(&self, key_id: &str, plaintext: &[u8], ctx: &Context) -> Result<Vec<u8>> {
            if *self.down.lock().unwrap() {
                return Err(down_err());
            }
            let n = self
                .nonce
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut v = format!("{key_id}|{}|{n}|", frame(ctx)).into_bytes();
            v.extend(plaintext.iter().map(|b| b ^ 0x5a));
            Ok(v)
        }
        async fn decrypt(&self, ct: &[u8], ctx: &Context) -> Result<Zeroizing<Vec<u8>>> {
            if *self.down.lock().unwrap() {
                return Err(down_err());
            }
            self.decrypts.lock().unwrap().push(ctx.clone());
            if let Some(c) = *self.deny_class.lock().unwrap() {
                if ctx.iter().any(|(k, v)| k == CTX_CLASS && v == c.as_str()) {
                    return Err(Error::Aws {
                        operation: "kms:Decrypt",
                        resource: "fake".into(),
                        failure: crate::error::AwsFailure::Denied,
                        message: "AccessDeniedException".into(),
                    });
                }
            }
            let s = ct.to_vec();
            let mut parts = s.splitn(4, |b| *b == b'|');
            let _key = parts.next();
            let c = parts.next().unwrap_or_default();
            let _nonce = parts.next();
            if c != frame(ctx).as_bytes() {
                return Err(Error::Aws {
                    operation: "kms:Decrypt",
                    resource: "fake".into(),
                    failure: crate::error::AwsFailure::Other,
                    message: "InvalidCiphertextException".into(),
                });
            }
            Ok(Zeroizing::new(
                parts
                    .next()
                    .unwrap_or_default()
                    .iter()
                    .map(|b| b ^ 0x5a)
                    .collect(),
            ))
        }
        async fn describe(&self, key_id: &str) -> Result<String> {
            Ok(format!("arn:aws:kms:us-east-1:111122223333:key/{key_id}"))
        }
        async fn data_key(
            &self,
            key_id: &str,
            ctx: &Context,
        ) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>)> {
            let key = vec![7u8; 32];
            let ct = self.encrypt(key_id, &key, ctx).await?;
            Ok((Zeroizing::new(key), ct))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    fn layout() -> Layout {
        Layout {
            bucket: "esc".into(),
            prefix: "vault-bootstrap/prod/".into(),
            kms_key_id: "alias/escrow".into(),
            cluster: "prod".into(),
            generation: generation::FIRST,
        }
    }

    fn secrets() -> InitSecrets {
        InitSecrets {
            shares: (1..=5).map(|i| Secret::new(format!("share-{i}"))).collect(),
            root_token: Secret::new("s.root"),
            pgp: false,
            threshold: 3,
        }
    }

    const D: Duration = Duration::from_secs(2);

    async fn sealed(kms: &FakeKms, l: &Layout) -> Sealed {
        encrypt_items(kms, l, &secrets(), D).await.unwrap()
    }

    #[tokio::test]
    async fn escrow_then_verify() {
        let (s3, kms) = (FakeS3::default(), FakeKms::default());
        let l = layout();
        let items = sealed(&kms, &l).await;
        let m = escrow(&s3, &l, &items, &secrets(), "i-1", Some("cid"), D)
            .await
            .unwrap();
        assert_eq!(m.recovery_shares, 5);
        assert_eq!(m.cluster_id.as_deref(), Some("cid"));
        let keys = s3.list("esc", "vault-bootstrap/prod/").await.unwrap();
        assert_eq!(keys.len(), 7, "{keys:?}");
        // Nothing in S3 is plain text.
        for v in s3.objects.lock().unwrap().values() {
            assert!(!String::from_utf8_lossy(v).contains("share-1"));
        }
        // The node's escrow never decrypted anything: it compared bytes.
        assert_eq!(kms.decrypts.lock().unwrap().len(), 0);
        // The operator's verify decrypts each item under its class.
        let r = verify(&s3, &kms, &l, D).await.unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.shares_ok, 5);
        assert!(r.root_token_ok);
        assert_eq!(kms.decrypts_of(Class::Recovery), 6);
        let s = decrypt_item(&s3, &kms, &l, "recovery-key-2", D)
            .await
            .unwrap();
        assert_eq!(s.expose(), "share-2");
    }

    #[tokio::test]
    async fn verify_without_the_operator_role_is_a_denial_naming_it() {
        let (s3, kms) = (FakeS3::default(), FakeKms::default());
        let l = layout();
        let items = sealed(&kms, &l).await;
        escrow(&s3, &l, &items, &secrets(), "i-1", Some("cid"), D)
            .await
            .unwrap();
        *kms.deny_class.lock().unwrap() = Some(Class::Recovery);
        let e = verify(&s3, &kms, &l, D).await.unwrap_err();
        assert_eq!(e.exit_code(), 77, "{e}");
        assert!(e.to_string().contains("operator role"), "{e}");
    }

    #[tokio::test]
    async fn items_carry_their_class_in_the_context() {
        let l = layout();
        let class = |item: &str| {
            l.context(item)
                .into_iter()
                .find(|(k, _)| k == CTX_CLASS)
                .map(|(_, v)| v)
        };
        assert_eq!(class("recovery-key-1").as_deref(), Some("recovery"));
        assert_eq!(class(Layout::ROOT_ITEM).as_deref(), Some("recovery"));
        assert_eq!(
            class(Layout::SNAPSHOT_APPROLE_ITEM).as_deref(),
            Some("node-credential")
        );
    }

    #[tokio::test]
    async fn rerun_after_partial_upload_resumes_with_the_same_bytes() {
        let (s3, kms) = (FakeS3::default(), FakeKms::default());
        let l = layout();
        let items = sealed(&kms, &l).await;
        upload_item(&s3, &l, &items[0].0, &items[0].1, D)
            .await
            .unwrap();
        escrow(&s3, &l, &items, &secrets(), "i-1", Some("cid"), D)
            .await
            .unwrap();
        assert!(verify(&s3, &kms, &l, D).await.unwrap().ok());
        // And running it all again is harmless.
        escrow(&s3, &l, &items, &secrets(), "i-1", Some("cid"), D)
            .await
            .unwrap();
        // A fresh encryption of the same secrets is other bytes: refused, not overwritten.
        let again = sealed(&kms, &l).await;
        let e = escrow(&s3, &l, &again, &secrets(), "i-1", Some("cid"), D)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("holds other bytes"), "{e}");
    }

    #[tokio::test]
    async fn another_writers_item_is_never_overwritten() {
        let (s3, kms) = (FakeS3::default(), FakeKms::default());
        let l = layout();
        let ct = kms
            .encrypt(&l.kms_key_id, b"someone-else", &l.context("recovery-key-1"))
            .await
            .unwrap();
        s3.put_if_absent("esc", &l.object("recovery-key-1"), ct.clone(), None)
            .await
            .unwrap();
        let items = sealed(&kms, &l).await;
        let e = escrow(&s3, &l, &items, &secrets(), "i-1", Some("cid"), D)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("holds other bytes"), "{e}");
        assert!(!e.to_string().contains("share-1"));
        assert_eq!(
            s3.get("esc", &l.object("recovery-key-1")).await.unwrap(),
            ct
        );
    }

    #[tokio::test]
    async fn verify_reports_missing_pieces() {
        let (s3, kms) = (FakeS3::default(), FakeKms::default());
        let l = layout();
        let items = sealed(&kms, &l).await;
        escrow(&s3, &l, &items, &secrets(), "i-1", Some("cid"), D)
            .await
            .unwrap();
        s3.objects
            .lock()
            .unwrap()
            .remove(&("esc".into(), l.object("recovery-key-3")));
        let r = verify(&s3, &kms, &l, D).await.unwrap();
        assert!(!r.ok());
        assert_eq!(r.shares_ok, 4);
        assert!(r.problems[0].contains("recovery-key-3"), "{r:?}");
    }

    #[tokio::test]
    async fn wrong_context_does_not_decrypt() {
        let (s3, kms) = (FakeS3::default(), FakeKms::default());
        let l = layout();
        let items = sealed(&kms, &l).await;
        escrow(&s3, &l, &items, &secrets(), "i-1", Some("cid"), D)
            .await
            .unwrap();
        // Swap two objects: each decrypts only under its own item name.
        {
            let mut o = s3.objects.lock().unwrap();
            let a = o
                .get(&("esc".into(), l.object("recovery-key-1")))
                .cloned()
                .unwrap();
            o.insert(("esc".into(), l.object("recovery-key-2")), a);
        }
        let r = verify(&s3, &kms, &l, D).await.unwrap();
        assert_eq!(r.shares_ok, 4);
    }

    /// The shipped policies grant `kms:Decrypt` by these context keys and class values: a
    /// rename on either side would leave a policy that silently grants nothing (or the
    /// wrong thing), so the two are tied here.
    #[test]
    fn the_shipped_policies_use_the_context_keys_and_classes_of_the_code() {
        let files = [
            (
                "iam-policy.json",
                include_str!("../../packer/examples/iam-policy.json"),
            ),
            (
                "iam-policy-operator.json",
                include_str!("../../packer/examples/iam-policy-operator.json"),
            ),
        ];
        let keys = [CTX_CLUSTER, CTX_ITEM, CTX_CLASS, CTX_INSTANCE];
        let classes = [Class::Recovery, Class::NodeCredential, Class::Pending].map(Class::as_str);
        let mut node_classes = Vec::new();
        for (file, text) in files {
            let policy: serde_json::Value = serde_json::from_str(text).unwrap();
            for st in policy["Statement"].as_array().unwrap() {
                let Some(ops) = st["Condition"].as_object() else {
                    continue;
                };
                for by_key in ops.values() {
                    for (key, value) in by_key.as_object().unwrap() {
                        let Some(ctx) = key.strip_prefix("kms:EncryptionContext:") else {
                            continue;
                        };
                        if ctx.starts_with("aws:") {
                            continue; // S3's own context (SSE-KMS), not the agent's
                        }
                        assert!(keys.contains(&ctx), "{file}: unknown context key {key}");
                        if ctx == CTX_CLASS {
                            let v = value.as_str().unwrap();
                            assert!(classes.contains(&v), "{file}: unknown class {v}");
                            if file == "iam-policy.json" {
                                node_classes.push(v.to_owned());
                            }
                        }
                        if ctx == CTX_CLUSTER {
                            assert_eq!(value, "prod-vault", "{file}: {key}");
                        }
                    }
                }
            }
        }
        // What the node may decrypt, exactly: never a recovery item.
        node_classes.sort();
        assert_eq!(node_classes, ["node-credential", "pending"]);
    }
}
