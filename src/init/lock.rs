//! The init lock: exactly one node of a new cluster may call `sys/init`.
//!
//! The lock is a sequence of write-once S3 objects `init-lock/<generation>.json`, each
//! created with `If-None-Match: *`, so S3 itself picks exactly one winner per generation.
//! The holder is the writer of the highest generation. Taking over a dead holder's lock
//! means creating the next generation, which again only one contender can do: there is
//! no delete-then-recreate window in which two nodes could both believe they won.

use crate::aws::s3::{ObjectStore, PutOutcome};
use crate::error::{Error, Result};
use crate::escrow::Layout;
use crate::retry;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockBody {
    pub instance_id: String,
    pub acquired_unix: u64,
    pub cluster: String,
    pub generation: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lock {
    /// This instance holds generation `n`.
    Mine(u32),
    /// Another instance holds it.
    Held(LockBody),
}

fn key(layout: &Layout, generation: u32) -> String {
    format!("{}{generation:08}.json", layout.lock_dir())
}

fn generation_of(layout: &Layout, key: &str) -> Option<u32> {
    key.strip_prefix(&layout.lock_dir())?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

async fn read<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    generation: u32,
    deadline: Duration,
) -> Result<LockBody> {
    let k = key(layout, generation);
    let body = retry::retry("read the init lock", deadline, || {
        s3.get(&layout.bucket, &k)
    })
    .await?;
    serde_json::from_slice(&body).map_err(|e| Error::Init {
        message: format!("{} is not an init lock this agent wrote ({e}); remove it only if no node is initializing", layout.url(&k)),
        retriable: false,
    })
}

async fn try_create<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    me: &str,
    generation: u32,
    deadline: Duration,
) -> Result<Lock> {
    let body = LockBody {
        instance_id: me.to_owned(),
        acquired_unix: crate::clock::now_unix(),
        cluster: layout.cluster.clone(),
        generation,
    };
    let bytes = serde_json::to_vec_pretty(&body).map_err(|e| Error::Internal(e.to_string()))?;
    let k = key(layout, generation);
    let put = retry::retry("write the init lock", deadline, || {
        // SSE-KMS as every object under the escrow prefix: the shipped bucket policy refuses
        // a PutObject there without it.
        s3.put_if_absent(&layout.bucket, &k, bytes.clone(), Some(&layout.kms_key_id))
    })
    .await?;
    match put {
        PutOutcome::Created => Ok(Lock::Mine(generation)),
        PutOutcome::Exists => {
            let holder = read(s3, layout, generation, deadline).await?;
            // A retried put whose first attempt did land reads back as ours.
            Ok(if holder.instance_id == me {
                Lock::Mine(generation)
            } else {
                Lock::Held(holder)
            })
        }
    }
}

/// Takes the lock if nobody holds it; otherwise says who does. A lock this instance took
/// before a crash is still its own.
pub async fn acquire<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    me: &str,
    deadline: Duration,
) -> Result<Lock> {
    Ok(match holder(s3, layout, deadline).await? {
        None => return try_create(s3, layout, me, 0, deadline).await,
        Some(h) if h.instance_id == me => Lock::Mine(h.generation),
        Some(h) => Lock::Held(h),
    })
}

/// The current holder, without taking anything (for checks after init).
pub async fn holder<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    deadline: Duration,
) -> Result<Option<LockBody>> {
    let dir = layout.lock_dir();
    let keys = retry::retry("list the init lock", deadline, || {
        s3.list(&layout.bucket, &dir)
    })
    .await?;
    match keys.iter().filter_map(|k| generation_of(layout, k)).max() {
        None => Ok(None),
        Some(g) => read(s3, layout, g, deadline).await.map(Some),
    }
}

/// Takes over from `held` (whose holder the caller found gone) by creating the next
/// generation.
pub async fn take_over<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    me: &str,
    held: &LockBody,
    deadline: Duration,
) -> Result<Lock> {
    try_create(s3, layout, me, held.generation + 1, deadline).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::escrow::fake::FakeS3;

    fn layout() -> Layout {
        Layout {
            bucket: "esc".into(),
            prefix: "vb/prod/".into(),
            kms_key_id: "k".into(),
            cluster: "prod".into(),
            generation: crate::escrow::generation::FIRST,
        }
    }
    const D: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn first_comer_wins_and_others_see_the_holder() {
        let s3 = FakeS3::default();
        assert_eq!(
            acquire(&s3, &layout(), "i-a", D).await.unwrap(),
            Lock::Mine(0)
        );
        match acquire(&s3, &layout(), "i-b", D).await.unwrap() {
            Lock::Held(b) => assert_eq!(b.instance_id, "i-a"),
            other => panic!("{other:?}"),
        }
        // The holder, rebooted, still holds it.
        assert_eq!(
            acquire(&s3, &layout(), "i-a", D).await.unwrap(),
            Lock::Mine(0)
        );
    }

    #[tokio::test]
    async fn concurrent_acquires_have_one_winner() {
        let s3 = std::sync::Arc::new(FakeS3::default());
        let mut tasks = Vec::new();
        for i in 0..7 {
            let s3 = s3.clone();
            tasks.push(tokio::spawn(async move {
                acquire(&*s3, &layout(), &format!("i-{i}"), D)
                    .await
                    .unwrap()
            }));
        }
        let mut mine = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Lock::Mine(_)) {
                mine += 1;
            }
        }
        assert_eq!(mine, 1);
    }

    #[tokio::test]
    async fn takeover_creates_the_next_generation_once() {
        let s3 = FakeS3::default();
        acquire(&s3, &layout(), "i-dead", D).await.unwrap();
        let Lock::Held(held) = acquire(&s3, &layout(), "i-b", D).await.unwrap() else {
            panic!()
        };
        assert_eq!(
            take_over(&s3, &layout(), "i-b", &held, D).await.unwrap(),
            Lock::Mine(1)
        );
        // A second contender that also saw generation 0 loses to i-b.
        match take_over(&s3, &layout(), "i-c", &held, D).await.unwrap() {
            Lock::Held(b) => assert_eq!((b.instance_id.as_str(), b.generation), ("i-b", 1)),
            other => panic!("{other:?}"),
        }
        match acquire(&s3, &layout(), "i-c", D).await.unwrap() {
            Lock::Held(b) => assert_eq!(b.instance_id, "i-b"),
            other => panic!("{other:?}"),
        }
    }
}
