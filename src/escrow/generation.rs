//! Generations of the recovery keys and node credentials in the escrow.
//!
//! Init escrows generation 1, directly under the cluster's prefix, with the
//! `cluster-initialized.json` marker as its record. A rotation ([`crate::rotation`]) makes
//! generation n under `generations/<n>/`, every object write-once:
//! - `claim.json`: the attempt at n began (one at a time; a second run resumes it);
//! - the new recovery shares, each read back after upload, before the server takes them;
//! - `rotated.json`: written as soon as n's recovery key is in force at the server; from then
//!   on n is the current generation (its shares are the ones that work);
//! - the new node credentials, then `finished.json`: the rest of the rotation (keyring, root
//!   key, credentials) is done. Until then the nodes keep using the newest credentials that
//!   exist ([`layout_holding`]);
//! - `abandoned.json`: an attempt whose key never came into force (a crash before all its
//!   shares were escrowed, or before the server took them); it is never current;
//! - `superseded.json`: on the generation that n replaced, once n is current.
//!
//! The current generation is the highest with a record; with none, it is 1.

use super::Layout;
use crate::aws::s3::{ObjectStore, PutOutcome};
use crate::error::{Error, Result};
use crate::retry;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::Duration;

/// Init's generation.
pub const FIRST: u32 = 1;

pub const CLAIM: &str = "claim.json";
pub const RECORD: &str = "rotated.json";
pub const FINISHED: &str = "finished.json";
pub const ABANDONED: &str = "abandoned.json";
pub const SUPERSEDED: &str = "superseded.json";

/// What `claim.json` says: the attempt's new key configuration, and what it replaces.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claim {
    pub generation: u32,
    pub supersedes: u32,
    pub claimed_unix: u64,
    pub recovery_shares: usize,
    pub recovery_threshold: u8,
}

/// What `rotated.json` says: public facts of a generation in force.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub generation: u32,
    pub cluster: String,
    pub supersedes: u32,
    pub rotated_unix: u64,
    pub recovery_shares: usize,
    pub recovery_threshold: u8,
    pub kms_key_id: String,
}

/// What `finished.json` says: the rest of the rotation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Finished {
    pub generation: u32,
    pub finished_unix: u64,
    /// The keyring term after the rotation (`sys/key-status`), when the server said.
    pub keyring_term: Option<u64>,
    /// Whether the root key was rotated too; false where the server offers no way
    /// (`sys/rotate/root` is OpenBao's; Vault has none without recovery-key shares).
    pub root_key_rotated: bool,
}

/// `superseded.json` and `abandoned.json`: when, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mark {
    pub generation: u32,
    pub unix: u64,
    pub why: String,
}

/// The generations an escrow holds, from one listing of `generations/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generations {
    pub recorded: BTreeSet<u32>,
    pub finished: BTreeSet<u32>,
    pub claimed: BTreeSet<u32>,
    pub abandoned: BTreeSet<u32>,
    pub superseded: BTreeSet<u32>,
}

impl Generations {
    /// From the keys under the escrow prefix (pure: what the listing returned).
    pub fn parse(layout: &Layout, keys: &[String]) -> Generations {
        let mut g = Generations::default();
        let dir = format!("{}generations/", layout.prefix);
        for key in keys {
            let Some((n, file)) = key.strip_prefix(&dir).and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            let Ok(n) = n.parse::<u32>() else { continue };
            let set = match file {
                RECORD if n > FIRST => &mut g.recorded,
                FINISHED if n > FIRST => &mut g.finished,
                CLAIM if n > FIRST => &mut g.claimed,
                ABANDONED => &mut g.abandoned,
                SUPERSEDED => &mut g.superseded,
                _ => continue,
            };
            set.insert(n);
        }
        g
    }

    /// The generation in force.
    pub fn current(&self) -> u32 {
        self.recorded.iter().next_back().copied().unwrap_or(FIRST)
    }

    /// An attempt begun and neither finished nor abandoned, above the current generation:
    /// what a new run resumes rather than starting another.
    pub fn open_attempt(&self) -> Option<u32> {
        let cur = self.current();
        self.claimed
            .iter()
            .rev()
            .copied()
            .find(|n| *n > cur && !self.abandoned.contains(n) && !self.recorded.contains(n))
    }

    /// The current generation when its rotation stopped after its key came into force,
    /// before the keyring, root key and node credentials were done.
    pub fn unfinished(&self) -> Option<u32> {
        let cur = self.current();
        (cur > FIRST && !self.finished.contains(&cur)).then_some(cur)
    }

    /// The number of a new attempt: above everything ever claimed.
    pub fn next(&self) -> u32 {
        let claimed = self.claimed.iter().next_back().copied().unwrap_or(FIRST);
        claimed.max(self.current()).saturating_add(1)
    }

    /// Generations that were in force and are replaced but not yet marked so (a run that
    /// stopped between its record and the mark).
    pub fn unmarked_replaced(&self) -> Vec<u32> {
        let cur = self.current();
        std::iter::once(FIRST)
            .chain(self.recorded.iter().copied())
            .filter(|n| *n < cur && !self.superseded.contains(n))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }
}

impl Layout {
    /// `generations/<n>/<file>`.
    pub fn generation_file(&self, n: u32, file: &str) -> String {
        format!("{}{file}", self.generation_dir(n))
    }
}

/// Lists the escrow's generations.
pub async fn scan<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    deadline: Duration,
) -> Result<Generations> {
    let dir = format!("{}generations/", layout.prefix);
    let keys = retry::retry("list the escrow's generations", deadline, || {
        s3.list(&layout.bucket, &dir)
    })
    .await?;
    Ok(Generations::parse(layout, &keys))
}

/// The layout of the newest generation in force, or replaced, that holds `item`: a node
/// credential of a rotation that has not reached its credentials yet is the previous
/// generation's, still valid until the rotation replaces it.
pub async fn layout_holding<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    item: &str,
    deadline: Duration,
) -> Result<Layout> {
    let gens = scan(s3, layout, deadline).await?;
    for n in gens.recorded.iter().rev().copied() {
        let at = layout.at(n);
        let key = at.object(item);
        if retry::retry("look for an escrow item", deadline, || {
            s3.get_opt(&layout.bucket, &key)
        })
        .await?
        .is_some()
        {
            return Ok(at);
        }
    }
    Ok(layout.at(FIRST))
}

/// The generation in force and its key configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub layout: Layout,
    pub shares: usize,
    pub threshold: u8,
    pub pgp: bool,
    pub generations: Generations,
}

/// The current generation, from the init marker (generation 1) or its record. Errors when
/// the cluster has no marker (never escrowed) or a record does not parse.
pub async fn current<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    deadline: Duration,
) -> Result<Current> {
    let marker = super::require_marker(s3, layout, deadline).await?;
    current_of(s3, layout, &marker, deadline).await
}

/// [`current`] for a cluster whose init marker is already read.
pub async fn current_of<S: ObjectStore>(
    s3: &S,
    layout: &Layout,
    marker: &super::Marker,
    deadline: Duration,
) -> Result<Current> {
    let generations = scan(s3, layout, deadline).await?;
    let n = generations.current();
    if n == FIRST {
        return Ok(Current {
            layout: layout.at(FIRST),
            shares: marker.recovery_shares,
            threshold: marker.recovery_threshold,
            pgp: marker.pgp,
            generations,
        });
    }
    let record: Record = read_json(s3, layout, &layout.generation_file(n, RECORD), deadline)
        .await?
        .ok_or_else(|| Error::Escrow {
            message: format!(
                "{} was listed but cannot be read",
                layout.url(&layout.generation_file(n, RECORD))
            ),
        })?;
    Ok(Current {
        layout: layout.at(n),
        shares: record.recovery_shares,
        threshold: record.recovery_threshold,
        // A rotation refuses PGP-wrapped escrows, so every generation it made is plain.
        pgp: false,
        generations,
    })
}

/// Reads a JSON document the agent wrote; `None` when absent.
pub async fn read_json<S: ObjectStore, T: DeserializeOwned>(
    s3: &S,
    layout: &Layout,
    key: &str,
    deadline: Duration,
) -> Result<Option<T>> {
    let body = retry::retry("read an escrow record", deadline, || {
        s3.get_opt(&layout.bucket, key)
    })
    .await?;
    match body {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Escrow {
                message: format!("{} is not a record this agent wrote: {e}", layout.url(key)),
            }),
    }
}

/// Writes a JSON document write-once (under the escrow key, as the bucket policy demands).
pub async fn write_json_once<S: ObjectStore, T: Serialize>(
    s3: &S,
    layout: &Layout,
    key: &str,
    doc: &T,
    deadline: Duration,
) -> Result<PutOutcome> {
    let body = serde_json::to_vec_pretty(doc).map_err(|e| Error::Internal(e.to_string()))?;
    retry::retry("write an escrow record", deadline, || {
        s3.put_if_absent(&layout.bucket, key, body.clone(), Some(&layout.kms_key_id))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            bucket: "esc".into(),
            prefix: "vb/prod/".into(),
            kms_key_id: "k".into(),
            cluster: "prod".into(),
            generation: FIRST,
        }
    }

    fn keys(files: &[&str]) -> Vec<String> {
        files
            .iter()
            .map(|f| format!("vb/prod/generations/{f}"))
            .collect()
    }

    #[test]
    fn items_of_a_rotation_live_under_its_generation() {
        let l = layout();
        assert_eq!(l.object("recovery-key-1"), "vb/prod/recovery-key-1.enc");
        assert_eq!(
            l.at(3).object("recovery-key-1"),
            "vb/prod/generations/3/recovery-key-1.enc"
        );
        assert_eq!(l.at(3).marker(), l.marker(), "one init marker for all");
    }

    #[test]
    fn no_rotation_means_generation_one() {
        let g = Generations::parse(&layout(), &[]);
        assert_eq!(g.current(), FIRST);
        assert_eq!(g.open_attempt(), None);
        assert_eq!(g.next(), 2);
        assert!(g.unmarked_replaced().is_empty());
    }

    #[test]
    fn the_highest_record_is_current_and_claims_alone_are_not() {
        let g = Generations::parse(
            &layout(),
            &keys(&[
                "2/claim.json",
                "2/rotated.json",
                "2/recovery-key-1.enc",
                "1/superseded.json",
                "3/claim.json",
                "3/abandoned.json",
                "4/claim.json",
                "4/recovery-key-1.enc",
            ]),
        );
        assert_eq!(g.current(), 2);
        assert_eq!(g.open_attempt(), Some(4), "3 is abandoned, 4 is open");
        assert_eq!(g.next(), 5);
        assert!(g.unmarked_replaced().is_empty());
    }

    #[test]
    fn a_record_without_the_mark_on_what_it_replaced_is_found() {
        let g = Generations::parse(&layout(), &keys(&["2/claim.json", "2/rotated.json"]));
        assert_eq!(g.current(), 2);
        assert_eq!(g.unmarked_replaced(), vec![1]);
        assert_eq!(g.open_attempt(), None);
        assert_eq!(
            g.unfinished(),
            Some(2),
            "its keyring and credentials are not done"
        );
        let g = Generations::parse(
            &layout(),
            &keys(&["2/claim.json", "2/rotated.json", "2/finished.json"]),
        );
        assert_eq!(g.unfinished(), None);
    }

    #[test]
    fn the_next_attempt_never_overflows() {
        let g = Generations::parse(&layout(), &keys(&[&format!("{}/claim.json", u32::MAX)]));
        assert_eq!(g.next(), u32::MAX);
    }

    #[test]
    fn foreign_keys_are_ignored() {
        let g = Generations::parse(
            &layout(),
            &[
                "vb/prod/generations/x/rotated.json".into(),
                "vb/prod/generations/1/rotated.json".into(),
                "vb/other/generations/5/rotated.json".into(),
            ],
        );
        assert_eq!(g.current(), FIRST);
    }
}
