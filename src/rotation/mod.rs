//! After a compromise: rotate what a node could have kept. One operator command
//! (`vault-bootstrap rotate`) that
//! 1. rekeys the recovery key, so the old shares and the old `core/recovery-key` stop
//!    working; the new shares are escrowed as a new generation ([`escrow::generation`])
//!    write-once and read back before the server takes them (the rekey needs verification:
//!    until the shares are given back, the old key stays in force), and the generation is
//!    recorded current the moment they are in force;
//! 2. rotates the keyring, and the root key where the server offers that;
//! 3. replaces the node credentials (snapshot and lifecycle AppRoles): new role_id, every
//!    old secret_id destroyed, every token from an AppRole login revoked, new credentials
//!    escrowed in the new generation;
//! 4. records the rotation finished.
//!
//! Every step is safe to repeat, and a run resumes whatever an earlier one left: a current
//! generation not finished gets steps 2-4; an attempt whose shares are all escrowed is
//! brought into force (verified, or found in force by a probe rekey that is cancelled); one
//! whose shares are not all escrowed, or that a probe finds not in force, is abandoned and a
//! new one begun. An attempt is abandoned only on the server's explicit word that its shares
//! are not the key in force. Runs must not overlap (the operator runs one at a time).

pub mod server;

use crate::aws::kms::Kms;
use crate::aws::s3::{ObjectStore, PutOutcome};
use crate::clock::now_unix;
use crate::error::{exit, Error, Result};
use crate::escrow::generation::{self, Claim, Finished, Generations, Mark, Record};
use crate::escrow::{self, crash_point, Layout};
use crate::secret::Secret;
use server::{KeyServer, Update};
use std::time::Duration;

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub generation: u32,
    /// The generation it replaced; with nothing to do, the one `--from-generation` named.
    pub supersedes: u32,
    /// Whether an earlier, interrupted run's attempt was finished rather than a new one.
    pub resumed: bool,
    /// Attempts this run found dead and marked abandoned.
    pub abandoned: Vec<u32>,
    /// The keyring, root key and credential steps this run took; None when it had nothing
    /// to do (`--from-generation` of a generation already replaced).
    pub finished: Option<Steps>,
}

/// The steps after the new recovery key is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steps {
    pub keyring_term: Option<u64>,
    pub root_key_rotated: bool,
    /// Old secret_ids destroyed, per node credential replaced in this run.
    pub credentials: Vec<(&'static str, usize)>,
}

/// What the rotation works with.
pub struct Ctx<'a, S, K> {
    pub s3: &'a S,
    pub kms: &'a K,
    /// The escrow (generation 1; the key by its ARN).
    pub layout: &'a Layout,
    pub server: &'a KeyServer<'a>,
    /// Node credentials to replace.
    pub roles: &'a [crate::approle::Role],
    pub aws: Duration,
}

fn rotation_err(message: String) -> Error {
    Error::Rotation {
        message,
        exit: exit::UNAVAILABLE,
    }
}

/// Runs (or resumes) one rotation. With `from`, rotates only away from that generation:
/// when it is already replaced, finishes what is unfinished and returns the current one.
pub async fn rotate<S: ObjectStore, K: Kms>(
    c: &Ctx<'_, S, K>,
    from: Option<u32>,
) -> Result<Outcome> {
    if crate::init::post_init_record(c.s3, c.layout, c.aws)
        .await?
        .is_none()
    {
        return Err(Error::Rotation {
            message: "post-init of this cluster is not recorded done (the node credentials may not exist yet): let the initializer finish it, or `vault-bootstrap escrow finish`, first; nothing was changed".into(),
            exit: exit::TEMPFAIL,
        });
    }
    let mut abandoned = Vec::new();
    // An abandoned attempt is followed by a fresh one; attempts abandoned again and again
    // mean something other than a crash is wrong.
    for _ in 0..3 {
        let cur = generation::current(c.s3, c.layout, c.aws).await?;
        if cur.pgp {
            return Err(Error::Usage {
                message: "the escrowed recovery keys are PGP-encrypted to their holders: this command cannot read them to authorise a rekey, nor verify new ones. Rekey by hand with the holders (`bao operator rotate-keys -target=recovery -init -verify -pgp-keys=...`), then rotate the keyring and the node credentials (docs/operations.md \"After a compromise\")".into(),
            });
        }
        let gens = &cur.generations;
        finish_marks(c, gens).await?;
        if let Some(n) = gens.unfinished() {
            // Its key is in force: what is left is the keyring, root key and credentials.
            let claim = read_claim(c, n).await?;
            let done = finish(c, &claim).await?;
            return Ok(Outcome {
                resumed: true,
                abandoned,
                ..done
            });
        }
        let open = gens.open_attempt();
        let now = cur.layout.generation;
        match from {
            Some(f) if f > now => {
                return Err(Error::Usage {
                    message: format!(
                    "--from-generation {f}: the current generation is {now}; nothing was changed"
                ),
                })
            }
            Some(f) if f < now && open.is_none() => {
                tracing::info!(
                    current = now,
                    from = f,
                    "generation {f} is already replaced: nothing to do"
                );
                return Ok(Outcome {
                    generation: now,
                    supersedes: f,
                    resumed: false,
                    abandoned,
                    finished: None,
                });
            }
            _ => {}
        }
        let (claim, resumed) = match open {
            Some(n) => (read_claim(c, n).await?, true),
            None => (new_claim(c, gens, &cur).await?, false),
        };
        let n = claim.generation;
        match bring_into_force(c, &cur, &claim).await? {
            Force::InForce => {
                record(c, &claim).await?;
                let done = finish(c, &claim).await?;
                return Ok(Outcome {
                    resumed,
                    abandoned,
                    ..done
                });
            }
            Force::Abandon(why) => {
                tracing::warn!(generation = n, "abandoning rotation attempt {n}: {why}");
                let mark = Mark {
                    generation: n,
                    unix: now_unix(),
                    why,
                };
                generation::write_json_once(
                    c.s3,
                    c.layout,
                    &c.layout.generation_file(n, generation::ABANDONED),
                    &mark,
                    c.aws,
                )
                .await?;
                abandoned.push(n);
            }
        }
    }
    Err(rotation_err(format!(
        "rotation attempts {abandoned:?} were each abandoned: the server does not take the shares this command escrows. Nothing is lost (the generation in force still works); look at the server's log"
    )))
}

/// Makes the claim's generation current (its key is in force), and marks what it replaced.
async fn record<S: ObjectStore, K>(c: &Ctx<'_, S, K>, claim: &Claim) -> Result<()> {
    let n = claim.generation;
    let key = c.layout.generation_file(n, generation::RECORD);
    let record = Record {
        generation: n,
        cluster: c.layout.cluster.clone(),
        supersedes: claim.supersedes,
        rotated_unix: now_unix(),
        recovery_shares: claim.recovery_shares,
        recovery_threshold: claim.recovery_threshold,
        kms_key_id: c.layout.kms_key_id.clone(),
    };
    generation::write_json_once(c.s3, c.layout, &key, &record, c.aws).await?;
    tracing::info!(generation = n, record = %c.layout.url(&key), "generation {n} is current: its shares are the ones in force");
    crash_point("rotation-recorded");
    let gens = generation::scan(c.s3, c.layout, c.aws).await?;
    finish_marks(c, &gens).await
}

enum Force {
    InForce,
    Abandon(String),
}

async fn read_claim<S: ObjectStore, K>(c: &Ctx<'_, S, K>, n: u32) -> Result<Claim> {
    let key = c.layout.generation_file(n, generation::CLAIM);
    generation::read_json(c.s3, c.layout, &key, c.aws)
        .await?
        .ok_or_else(|| {
            rotation_err(format!(
                "{} was listed but cannot be read",
                c.layout.url(&key)
            ))
        })
}

async fn new_claim<S: ObjectStore, K>(
    c: &Ctx<'_, S, K>,
    gens: &Generations,
    cur: &generation::Current,
) -> Result<Claim> {
    let claim = Claim {
        generation: gens.next(),
        supersedes: cur.layout.generation,
        claimed_unix: now_unix(),
        recovery_shares: cur.shares,
        recovery_threshold: cur.threshold,
    };
    let key = c
        .layout
        .generation_file(claim.generation, generation::CLAIM);
    if generation::write_json_once(c.s3, c.layout, &key, &claim, c.aws).await? == PutOutcome::Exists
    {
        return Err(Error::Rotation {
            message: format!(
                "{} appeared while this run claimed it: another rotation is running; let it finish, then run this again to check",
                c.layout.url(&key)
            ),
            exit: exit::TEMPFAIL,
        });
    }
    tracing::info!(
        generation = claim.generation,
        supersedes = claim.supersedes,
        "rotation claimed"
    );
    crash_point("rotation-claimed");
    Ok(claim)
}

/// Brings the claim's recovery key into force, its shares escrowed first; or says why the
/// attempt is dead.
async fn bring_into_force<S: ObjectStore, K: Kms>(
    c: &Ctx<'_, S, K>,
    cur: &generation::Current,
    claim: &Claim,
) -> Result<Force> {
    let new = c.layout.at(claim.generation);
    let staged = staged_shares(c, &new, claim.recovery_shares).await?;
    if staged == claim.recovery_shares {
        // An earlier run escrowed every share: they are in force, or about to be, or dead.
        // Every one must decrypt (a holder of one that does not would hold nothing).
        let shares = decrypt_shares(c, &new, claim.recovery_shares).await?;
        let shares = &shares[..usize::from(claim.recovery_threshold).min(shares.len())];
        if let Some(nonce) = c.server.restart_verification().await? {
            if c.server.verify(&nonce, shares).await? {
                tracing::info!(
                    generation = claim.generation,
                    "the escrowed shares verified: the new recovery key is in force"
                );
                return Ok(Force::InForce);
            }
        }
        return settle_by_probe(c, shares, claim, "its shares are escrowed, but the server does not hold them (the rekey was lost before verification: a leader change or a restart)").await;
    }
    // Any rekey in progress now is one whose shares no escrow holds: it never came into
    // force (verification is required), and its shares must never.
    c.server.cancel().await?;
    if staged > 0 {
        return Ok(Force::Abandon(format!(
            "{staged} of its {} shares were escrowed before a crash; the others are lost, and write-once objects are never overwritten",
            claim.recovery_shares
        )));
    }
    let old = decrypt_shares(c, &cur.layout, usize::from(cur.threshold)).await?;
    let nonce = c
        .server
        .start(claim.recovery_shares, claim.recovery_threshold)
        .await?;
    let mut done = None;
    for share in &old {
        match c.server.update(&nonce, share).await? {
            Update::Progress => continue,
            Update::Done {
                keys,
                verification_nonce,
            } => {
                done = Some((keys, verification_nonce));
                break;
            }
            Update::WrongKey(e) => {
                let _ = c.server.cancel().await;
                return Err(Error::Escrow {
                    message: format!(
                        "the escrowed shares of generation {} do not make the recovery key in force ({e}): the escrow and the server disagree. Nothing was changed; check `escrow verify` and the generation records",
                        cur.layout.generation
                    ),
                });
            }
        }
    }
    let Some((keys, verification_nonce)) = done else {
        let _ = c.server.cancel().await;
        return Err(rotation_err(format!(
            "{} shares of generation {} did not complete the rekey",
            old.len(),
            cur.layout.generation
        )));
    };
    if keys.len() != claim.recovery_shares {
        let _ = c.server.cancel().await;
        return Err(rotation_err(format!(
            "the rekey returned {} shares, {} were asked for",
            keys.len(),
            claim.recovery_shares
        )));
    }
    // The new shares exist only in this process now; the key in force is still the old one.
    crash_point("rotation-rekeyed");
    let mut sealed = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let name = Layout::share_item(i + 1);
        let (_, ct) = escrow::put_item(c.s3, c.kms, &new, &name, key, c.aws).await?;
        crash_point(&format!("rotation-staged-{name}"));
        sealed.push((name, ct));
    }
    for (name, ct) in &sealed {
        escrow::check_stored(c.s3, &new, name, ct, c.aws).await?;
    }
    tracing::info!(
        generation = claim.generation,
        shares = sealed.len(),
        "the new shares are escrowed and read back"
    );
    crash_point("rotation-escrowed");
    let threshold = usize::from(claim.recovery_threshold).min(keys.len());
    if c.server
        .verify(&verification_nonce, &keys[..threshold])
        .await?
    {
        tracing::info!(
            generation = claim.generation,
            "the new recovery key is in force; the old shares no longer work"
        );
        crash_point("rotation-verified");
        return Ok(Force::InForce);
    }
    settle_by_probe(
        c,
        &keys[..threshold],
        claim,
        "the server refused the new shares at verification",
    )
    .await
}

/// After a verification that did not say it completed: in force if a probe says so, dead
/// only if the server says these shares are not the key in force, else an error (retry).
async fn settle_by_probe<S, K>(
    c: &Ctx<'_, S, K>,
    shares: &[Secret],
    claim: &Claim,
    why_dead: &str,
) -> Result<Force> {
    match probe(c, shares, claim).await? {
        Some(true) => {
            tracing::info!(
                generation = claim.generation,
                "the escrowed shares are the recovery key in force"
            );
            Ok(Force::InForce)
        }
        Some(false) => Ok(Force::Abandon(why_dead.to_owned())),
        None => Err(Error::Rotation {
            message: format!(
                "cannot tell whether generation {}'s shares are in force: the server's answers to a probe rekey said neither yes nor no",
                claim.generation
            ),
            exit: exit::TEMPFAIL,
        }),
    }
}

/// How many of the generation's shares are in the escrow.
async fn staged_shares<S: ObjectStore, K>(
    c: &Ctx<'_, S, K>,
    new: &Layout,
    shares: usize,
) -> Result<usize> {
    let mut n = 0;
    for i in 1..=shares {
        let key = new.object(&Layout::share_item(i));
        if crate::retry::retry("look for an escrowed share", c.aws, || {
            c.s3.get_opt(&c.layout.bucket, &key)
        })
        .await?
        .is_some()
        {
            n += 1;
        }
    }
    Ok(n)
}

/// Shares 1..=`count` of generation `at`, decrypted.
async fn decrypt_shares<S: ObjectStore, K: Kms>(
    c: &Ctx<'_, S, K>,
    at: &Layout,
    count: usize,
) -> Result<Vec<Secret>> {
    let mut v = Vec::new();
    for i in 1..=count {
        v.push(escrow::decrypt_item(c.s3, c.kms, at, &Layout::share_item(i), c.aws).await?);
    }
    Ok(v)
}

/// Whether `shares` make the recovery key in force: a rekey is begun and given them, and
/// cancelled whatever they answer (it needs verification, so nothing changes). None when
/// the answers say neither.
async fn probe<S, K>(c: &Ctx<'_, S, K>, shares: &[Secret], claim: &Claim) -> Result<Option<bool>> {
    c.server.cancel().await?;
    let nonce = c
        .server
        .start(claim.recovery_shares, claim.recovery_threshold)
        .await?;
    let mut verdict = None;
    for share in shares {
        match c.server.update(&nonce, share).await {
            Ok(Update::Progress) => continue,
            Ok(Update::Done { .. }) => {
                verdict = Some(true);
                break;
            }
            Ok(Update::WrongKey(_)) => {
                verdict = Some(false);
                break;
            }
            Err(e) => {
                let _ = c.server.cancel().await;
                return Err(e);
            }
        }
    }
    c.server.cancel().await?;
    Ok(verdict)
}

/// With the new recovery key in force and recorded: keyring, root key, node credentials,
/// then the record that the rotation is finished.
async fn finish<S: ObjectStore, K: Kms>(c: &Ctx<'_, S, K>, claim: &Claim) -> Result<Outcome> {
    let n = claim.generation;
    let new = c.layout.at(n);
    // Repeating a rotation of the keyring or the root key is harmless: one more term.
    let keyring_term = c.server.rotate_keyring().await?;
    tracing::info!(term = ?keyring_term, "keyring rotated");
    crash_point("rotation-keyring");
    let root_key_rotated = c.server.rotate_root_key().await?;
    if root_key_rotated {
        tracing::info!("root key rotated");
    } else {
        tracing::warn!("this server offers no root-key rotation without shares: the root key is unchanged (docs/operations.md \"After a compromise\")");
    }
    let mut credentials = Vec::new();
    for role in c.roles {
        let key = new.object(role.item);
        let escrowed = crate::retry::retry("look for a node credential", c.aws, || {
            c.s3.get_opt(&c.layout.bucket, &key)
        })
        .await?
        .is_some();
        if escrowed {
            // An earlier run replaced it: its new secret_id is the one escrowed, keep it.
            continue;
        }
        let cidrs = c.server.role_cidrs(role.name).await?;
        let destroyed = c.server.revoke_role_secrets(role.name).await?;
        crash_point(&format!("rotation-revoked-{}", role.name));
        crate::approle::provision(
            role,
            &cidrs,
            c.server.client,
            c.server.token,
            c.s3,
            c.kms,
            &new,
            c.aws,
        )
        .await?;
        tracing::info!(
            role = role.name,
            destroyed,
            "node credential replaced and escrowed in generation {n}"
        );
        credentials.push((role.name, destroyed));
    }
    // Tokens an old secret_id logged in with live at most their TTL; end them now.
    c.server.revoke_approle_tokens().await?;
    crash_point("rotation-credentials");
    let finished = Finished {
        generation: n,
        finished_unix: now_unix(),
        keyring_term,
        root_key_rotated,
    };
    let key = c.layout.generation_file(n, generation::FINISHED);
    generation::write_json_once(c.s3, c.layout, &key, &finished, c.aws).await?;
    tracing::info!(generation = n, "rotation to generation {n} finished");
    Ok(Outcome {
        generation: n,
        supersedes: claim.supersedes,
        resumed: false,
        abandoned: Vec::new(),
        finished: Some(Steps {
            keyring_term,
            root_key_rotated,
            credentials,
        }),
    })
}

/// Marks every replaced generation superseded (a run may have stopped right after the
/// record that replaced it).
async fn finish_marks<S: ObjectStore, K>(c: &Ctx<'_, S, K>, gens: &Generations) -> Result<()> {
    for old in gens.unmarked_replaced() {
        let mark = Mark {
            generation: old,
            unix: now_unix(),
            why: format!("replaced by generation {}", gens.current()),
        };
        generation::write_json_once(
            c.s3,
            c.layout,
            &c.layout.generation_file(old, generation::SUPERSEDED),
            &mark,
            c.aws,
        )
        .await?;
        tracing::info!(generation = old, "generation {old} marked superseded");
    }
    Ok(())
}
