//! Finishing an escrow by hand, with the operator role, when the node that initialized the
//! cluster is gone before its escrow completed (the group abandoned or an operator
//! terminated it, and its volume went with it).
//!
//! The initializer put a copy of its pending file in S3 before any escrow step could fail
//! ([`super::pending::upload_copy`]). The operator role decrypts that copy's data key
//! (class `pending` is one of this cluster's classes), and from the init response in it
//! writes what the initializer did not: each escrow item that is missing, and the marker.
//! An item the initializer did upload is kept, and accepted only if it decrypts to the same
//! secret; then the usual write-once upload, byte read-back and marker follow
//! ([`super::escrow`]). Running it again after a crash, or after it completed, is harmless.

use super::{pending, InitSecrets, Layout, Marker, Sealed};
use crate::aws::kms::Kms;
use crate::aws::s3::ObjectStore;
use crate::error::{Error, Result};
use crate::retry;
use std::time::Duration;

/// What [`from_copy`] did.
#[derive(Debug)]
pub struct Finished {
    pub marker: Marker,
    /// Items the initializer had uploaded (checked), and items written now.
    pub kept: usize,
    pub written: usize,
}

/// Finishes the escrow of the init `instance_id` made, from its copy in S3. `cluster_id`
/// is what the cluster's servers report (recorded in the marker; members compare with it).
pub async fn from_copy<S: ObjectStore, K: Kms>(
    s3: &S,
    kms: &K,
    layout: &Layout,
    instance_id: &str,
    cluster_id: Option<&str>,
    deadline: Duration,
) -> Result<Finished> {
    if let Some(m) = super::read_marker(s3, layout, deadline).await? {
        if m.instance_id != instance_id {
            return Err(Error::Escrow {
                message: format!(
                    "{} names instance {} as the initializer, not {instance_id}: that escrow is complete; nothing was written",
                    layout.url(&layout.marker()),
                    m.instance_id
                ),
            });
        }
    }
    let key = pending::copy_key(layout, instance_id);
    let url = layout.url(&key);
    let copy = retry::retry("read the pending copy", deadline, || {
        s3.get_opt(&layout.bucket, &key)
    })
    .await?
    .ok_or_else(|| Error::Escrow {
        message: format!(
            "no copy of {instance_id}'s init response at {url}: it died before its pending file was copied (an agent from before the copy, or S3 failing from the start). The keys are on its volume or nowhere"
        ),
    })?;
    let (_, secrets) = pending::open(kms, layout, &copy, &url).await?;
    let (sealed, kept) = seal_missing(s3, kms, layout, &secrets, deadline).await?;
    let written = sealed.len() - kept;
    let marker = super::escrow(
        s3,
        layout,
        &sealed,
        &secrets,
        instance_id,
        cluster_id,
        deadline,
    )
    .await?;
    Ok(Finished {
        marker,
        kept,
        written,
    })
}

/// Each item's ciphertext: the one in S3 when it decrypts to this init's secret, else a
/// new encryption. Returns them with how many were kept.
async fn seal_missing<S: ObjectStore, K: Kms>(
    s3: &S,
    kms: &K,
    layout: &Layout,
    secrets: &InitSecrets,
    deadline: Duration,
) -> Result<(Sealed, usize)> {
    let mut sealed = Vec::new();
    let mut kept = 0;
    for (name, secret) in secrets.items() {
        let key = layout.object(&name);
        let ctx = layout.context(&name);
        let existing = retry::retry("read escrow item", deadline, || {
            s3.get_opt(&layout.bucket, &key)
        })
        .await?;
        let ct = match existing {
            Some(ct) => {
                let plain = kms.decrypt(&ct, &ctx).await?;
                if plain.as_slice() != secret.expose().as_bytes() {
                    return Err(Error::Escrow {
                        message: format!(
                            "{} holds another secret than this init response's {name}: two initializations? Nothing was written; investigate before anything else",
                            layout.url(&key)
                        ),
                    });
                }
                kept += 1;
                ct
            }
            None => {
                retry::retry("encrypt escrow item", deadline, || {
                    kms.encrypt(&layout.kms_key_id, secret.expose().as_bytes(), &ctx)
                })
                .await?
            }
        };
        sealed.push((name, ct));
    }
    Ok((sealed, kept))
}
