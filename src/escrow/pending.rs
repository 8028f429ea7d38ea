//! The crash-safe bridge between `sys/init` and a finished escrow and post-init.
//!
//! Before `sys/init` is called, the agent asks KMS for a data key, bound by encryption
//! context to this cluster, class `pending` and the ARN of this instance: the node policy
//! lets an instance decrypt it only when that ARN is its own (`ec2:SourceInstanceARN`), so
//! no other node and no stolen copy of the file opens it elsewhere. The moment the init
//! response arrives, it is sealed locally with AES-256-GCM under that key (no network in
//! between) and written to `<state_dir>/pending-init.json` (0600, fsync, rename, dir fsync).
//! Then the escrow items' ciphertexts are recorded in it before any is uploaded, so that a
//! resumed run uploads and compares the very same bytes. The file holds only ciphertext
//! and the KMS-encrypted data key. A `boot` that finds the file decrypts it through KMS
//! and resumes; the file is removed only once post-init is done (the root token in it is
//! what finishes post-init: nodes never decrypt the escrowed one).

use super::{InitSecrets, Layout};
use crate::aws::kms::{Context, Kms};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::secret::Secret;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

pub const FILE: &str = "pending-init.json";
const ITEM: &str = "pending-init-response";

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The file's format (everything secret is ciphertext). Version 2 binds the data key to
/// the instance's ARN and records the escrow items' ciphertexts.
#[derive(Debug, Serialize, Deserialize)]
struct PendingFile {
    version: u32,
    cluster: String,
    instance_id: String,
    #[serde(default)]
    instance_arn: String,
    kms_key_id: String,
    encrypted_data_key: String,
    nonce: String,
    ciphertext: String,
    /// Escrow item name -> its KMS ciphertext (base64), once encrypted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    items: Vec<(String, String)>,
}

const VERSION: u32 = 2;

/// The sealed plaintext (only ever in memory, zeroized).
#[derive(Serialize, Deserialize)]
struct Plain {
    shares: Vec<String>,
    root_token: String,
    pgp: bool,
    threshold: u8,
}

impl Drop for Plain {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.shares.iter_mut().for_each(|s| s.zeroize());
        self.root_token.zeroize();
    }
}

/// A data key obtained before `sys/init`, ready to seal its response without the network.
pub struct Sealer {
    key: Zeroizing<Vec<u8>>,
    encrypted_key: Vec<u8>,
    layout: Layout,
    instance_id: String,
    instance_arn: String,
}

/// The data key's context: cluster, item, class `pending`, and the instance. The node
/// role may decrypt class `pending` only for its own instance, so a file from before the
/// classes (version 1) cannot be read here: `read` refuses it, naming the way out.
fn context(layout: &Layout, instance_arn: &str) -> Context {
    let mut ctx = layout.context_of(ITEM, super::Class::Pending);
    ctx.push((super::CTX_INSTANCE.to_owned(), instance_arn.to_owned()));
    ctx
}

impl Sealer {
    /// Gets the data key; failing here (KMS down or denied) stops the init before it starts.
    pub async fn prepare<K: Kms>(
        kms: &K,
        layout: &Layout,
        instance_id: &str,
        instance_arn: &str,
    ) -> Result<Sealer> {
        let ctx = context(layout, instance_arn);
        let (key, encrypted_key) = kms.data_key(&layout.kms_key_id, &ctx).await?;
        if key.len() != 32 {
            return Err(Error::Escrow {
                message: format!("KMS returned a {}-byte data key; expected 32", key.len()),
            });
        }
        Ok(Sealer {
            key,
            encrypted_key,
            layout: layout.clone(),
            instance_id: instance_id.to_owned(),
            instance_arn: instance_arn.to_owned(),
        })
    }

    /// Seals `secrets` and writes the pending file atomically (0600, owned by the agent).
    pub fn write(&self, secrets: &InitSecrets, state_dir: &Path) -> Result<PathBuf> {
        let plain = Plain {
            shares: secrets
                .shares
                .iter()
                .map(|s| s.expose().to_owned())
                .collect(),
            root_token: secrets.root_token.expose().to_owned(),
            pgp: secrets.pgp,
            threshold: secrets.threshold,
        };
        let mut buf =
            Zeroizing::new(serde_json::to_vec(&plain).map_err(|e| Error::Internal(e.to_string()))?);
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| Error::Internal("no randomness for the nonce".into()))?;
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &self.key)
                .map_err(|_| Error::Internal("AES key".into()))?,
        );
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(self.layout.cluster.as_bytes()),
            &mut *buf,
        )
        .map_err(|_| Error::Internal("AES-GCM seal failed".into()))?;
        let file = PendingFile {
            version: VERSION,
            cluster: self.layout.cluster.clone(),
            instance_id: self.instance_id.clone(),
            instance_arn: self.instance_arn.clone(),
            kms_key_id: self.layout.kms_key_id.clone(),
            encrypted_data_key: B64.encode(&self.encrypted_key),
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(&*buf),
            items: Vec::new(),
        };
        let p = path(state_dir);
        if super::fault_point("pending-write") {
            return Err(Error::write(
                &p,
                "injected failure (VAULT_BOOTSTRAP_FAIL_AT)",
            ));
        }
        store(state_dir, &file)?;
        Ok(p)
    }
}

fn store(state_dir: &Path, file: &PendingFile) -> Result<()> {
    fsutil::write_record(state_dir, FILE, file).map(|_| ())
}

/// Records the escrow items' ciphertexts in the pending file, before any is uploaded.
pub fn record_items(state_dir: &Path, sealed: &super::Sealed) -> Result<()> {
    let p = path(state_dir);
    let text = std::fs::read(&p).map_err(|e| Error::write(&p, format!("read: {e}")))?;
    let mut file: PendingFile = serde_json::from_slice(&text)
        .map_err(|e| Error::write(&p, format!("not a pending file: {e}")))?;
    file.items = sealed
        .iter()
        .map(|(name, ct)| (name.clone(), B64.encode(ct)))
        .collect();
    store(state_dir, &file)
}

/// What a pending file says about itself without decrypting anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInfo {
    pub cluster: String,
    pub instance_id: String,
    /// The escrow items' ciphertexts, once recorded (see [`record_items`]).
    pub sealed: Option<super::Sealed>,
}

/// Reads and decrypts a pending file, if there is one.
pub async fn read<K: Kms>(
    kms: &K,
    layout: &Layout,
    state_dir: &Path,
) -> Result<Option<(PendingInfo, InitSecrets)>> {
    let p = path(state_dir);
    let text = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Escrow {
                message: format!("cannot read {}: {e}", p.display()),
            })
        }
    };
    open(kms, layout, &text, &p.display().to_string())
        .await
        .map(Some)
}

/// Decrypts a pending file's bytes (from this node's disk, or its copy in S3 with the
/// operator role); `source` names where they came from in errors.
pub async fn open<K: Kms>(
    kms: &K,
    layout: &Layout,
    text: &[u8],
    source: &str,
) -> Result<(PendingInfo, InitSecrets)> {
    let bad = |what: &str| {
        Error::Escrow {
        message: format!(
            "{source} is damaged ({what}); keep it and decrypt it by hand (docs/internals.md \"Init and escrow\")"
        ),
    }
    };
    let f: PendingFile = serde_json::from_slice(text).map_err(|_| bad("not JSON"))?;
    if f.cluster != layout.cluster {
        return Err(Error::Escrow {
            message: format!(
                "{source} belongs to cluster {:?}, this node is in {:?}; move it aside after escrowing it by hand",
                f.cluster,
                layout.cluster
            ),
        });
    }
    if f.version != VERSION {
        return Err(Error::Escrow {
            message: format!(
                "{source} is format version {} and this agent reads {VERSION}: its data key is not bound to this instance, so the node role cannot decrypt it. Keep it: with the operator role, escrow its items and finish post-init by hand, then move it out of the state directory for boot to go on (docs/internals.md \"Init and escrow\")",
                f.version
            ),
        });
    }
    let ek = B64
        .decode(&f.encrypted_data_key)
        .map_err(|_| bad("data key"))?;
    let nonce: [u8; NONCE_LEN] = B64
        .decode(&f.nonce)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or_else(|| bad("nonce"))?;
    let mut buf = Zeroizing::new(B64.decode(&f.ciphertext).map_err(|_| bad("ciphertext"))?);
    let key_bytes = kms.decrypt(&ek, &context(layout, &f.instance_arn)).await?;
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &key_bytes).map_err(|_| bad("data key length"))?,
    );
    let plain_len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(f.cluster.as_bytes()),
            &mut buf,
        )
        .map_err(|_| bad("authentication failed"))?
        .len();
    let plain: Plain = serde_json::from_slice(&buf[..plain_len]).map_err(|_| bad("content"))?;
    let secrets = InitSecrets {
        shares: plain
            .shares
            .iter()
            .map(|s| Secret::new(s.as_str()))
            .collect(),
        root_token: Secret::new(plain.root_token.as_str()),
        pgp: plain.pgp,
        threshold: plain.threshold,
    };
    let sealed = if f.items.is_empty() {
        None
    } else {
        Some(
            f.items
                .iter()
                .map(|(name, ct)| Ok((name.clone(), B64.decode(ct).map_err(|_| bad("items"))?)))
                .collect::<Result<super::Sealed>>()?,
        )
    };
    Ok((
        PendingInfo {
            cluster: f.cluster.clone(),
            instance_id: f.instance_id.clone(),
            sealed,
        },
        secrets,
    ))
}

/// Where the copy of a node's pending file goes: `<escrow prefix>pending-init/<instance>.json`.
pub fn copy_key(layout: &Layout, instance_id: &str) -> String {
    format!("{}pending-init/{instance_id}.json", layout.prefix)
}

/// Puts a copy of this node's pending file in S3, write-once and SSE-KMS under the escrow
/// key, as the file is when first written (the KMS-encrypted data key and the AES-GCM
/// ciphertext; no escrow item yet). The instance's volume may go with the instance (the
/// group abandons it, an operator terminates it); the copy then lets an operator finish
/// the escrow (`vault-bootstrap escrow finish`): only this instance and the operator role
/// can decrypt its data key (class `pending`, bound to this instance's ARN). A copy that
/// exists already (a resumed run) is left as it is.
pub async fn upload_copy<S: crate::aws::s3::ObjectStore>(
    s3: &S,
    layout: &Layout,
    state_dir: &Path,
    instance_id: &str,
    deadline: std::time::Duration,
) -> Result<String> {
    let p = path(state_dir);
    let text = std::fs::read(&p).map_err(|e| Error::Escrow {
        message: format!("cannot read {}: {e}", p.display()),
    })?;
    let mut file: PendingFile = serde_json::from_slice(&text).map_err(|e| Error::Escrow {
        message: format!("{} is damaged ({e})", p.display()),
    })?;
    // The copy is the response alone: item ciphertexts, once recorded, are in S3 as items.
    file.items.clear();
    let body = serde_json::to_vec_pretty(&file).map_err(|e| Error::Internal(e.to_string()))?;
    let key = copy_key(layout, instance_id);
    if super::fault_point("pending-copy") {
        return Err(Error::Escrow {
            message: format!(
                "{}: injected failure (VAULT_BOOTSTRAP_FAIL_AT)",
                layout.url(&key)
            ),
        });
    }
    crate::retry::retry("copy the pending init file to S3", deadline, || {
        s3.put_if_absent(&layout.bucket, &key, body.clone(), Some(&layout.kms_key_id))
    })
    .await?;
    Ok(layout.url(&key))
}

/// Removes the pending file (only once post-init is done) and makes the removal durable.
pub fn remove(state_dir: &Path) -> Result<()> {
    fsutil::remove_durable(&path(state_dir))
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeKms;
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn layout() -> Layout {
        Layout {
            bucket: "esc".into(),
            prefix: "p/prod/".into(),
            kms_key_id: "alias/escrow".into(),
            cluster: "prod".into(),
            generation: crate::escrow::generation::FIRST,
        }
    }

    const ARN: &str = "arn:aws:ec2:us-east-1:123456789012:instance/i-1";

    fn secrets() -> InitSecrets {
        InitSecrets {
            shares: vec![Secret::new("aa11"), Secret::new("bb22")],
            root_token: Secret::new("s.rootroot"),
            pgp: false,
            threshold: 2,
        }
    }

    #[tokio::test]
    async fn round_trip_without_plain_text_on_disk() {
        let kms = FakeKms::default();
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let sealer = Sealer::prepare(&kms, &layout(), "i-1", ARN).await.unwrap();
        let p = sealer.write(&secrets(), &state).unwrap();
        let raw = std::fs::read_to_string(&p).unwrap();
        for needle in ["aa11", "bb22", "s.rootroot"] {
            assert!(!raw.contains(needle), "plain secret on disk");
        }
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
        let (info, back) = read(&kms, &layout(), &state).await.unwrap().unwrap();
        assert_eq!(info.instance_id, "i-1");
        assert_eq!(info.sealed, None);
        assert_eq!(back, secrets());
        // The data key is bound to this instance and class `pending`.
        let ctx = kms.decrypts.lock().unwrap().last().cloned().unwrap();
        assert!(
            ctx.contains(&(super::super::CTX_INSTANCE.into(), ARN.into())),
            "{ctx:?}"
        );
        assert!(
            ctx.contains(&(super::super::CTX_CLASS.into(), "pending".into())),
            "{ctx:?}"
        );
        // Recorded ciphertexts come back as written.
        let sealed = vec![("recovery-key-1".to_string(), vec![1u8, 2, 3])];
        record_items(&state, &sealed).unwrap();
        let (info, back) = read(&kms, &layout(), &state).await.unwrap().unwrap();
        assert_eq!(info.sealed, Some(sealed));
        assert_eq!(back, secrets());
        remove(&state).unwrap();
        assert!(read(&kms, &layout(), &state).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn tampering_is_detected() {
        let kms = FakeKms::default();
        let d = tempfile::tempdir().unwrap();
        let sealer = Sealer::prepare(&kms, &layout(), "i-1", ARN).await.unwrap();
        let p = sealer.write(&secrets(), d.path()).unwrap();
        let mut f: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let mut ct = B64.decode(f["ciphertext"].as_str().unwrap()).unwrap();
        ct[0] ^= 1;
        f["ciphertext"] = B64.encode(ct).into();
        std::fs::write(&p, serde_json::to_vec(&f).unwrap()).unwrap();
        let e = read(&kms, &layout(), d.path()).await.err().unwrap();
        assert!(e.to_string().contains("authentication failed"), "{e}");
    }

    #[tokio::test]
    async fn another_clusters_file_is_refused() {
        let kms = FakeKms::default();
        let d = tempfile::tempdir().unwrap();
        Sealer::prepare(&kms, &layout(), "i-1", ARN)
            .await
            .unwrap()
            .write(&secrets(), d.path())
            .unwrap();
        let mut other = layout();
        other.cluster = "staging".into();
        assert!(read(&kms, &other, d.path()).await.is_err());
    }

    #[tokio::test]
    async fn a_file_of_another_format_version_is_refused_and_kept() {
        let kms = FakeKms::default();
        let d = tempfile::tempdir().unwrap();
        let sealer = Sealer::prepare(&kms, &layout(), "i-1", ARN).await.unwrap();
        let p = sealer.write(&secrets(), d.path()).unwrap();
        let mut f: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f["version"] = 1.into();
        std::fs::write(&p, serde_json::to_vec(&f).unwrap()).unwrap();
        let e = read(&kms, &layout(), d.path()).await.err().unwrap();
        assert!(
            e.to_string().contains("format version 1") && e.to_string().contains("operator role"),
            "{e}"
        );
        assert!(p.exists(), "the file is kept for the operator");
    }
}
