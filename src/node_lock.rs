//! One changing command per node at a time.
//!
//! `boot` (started by systemd, maybe restarted by it), `rejoin` (an operator over SSM) and
//! `refresh-tls` (a timer) all rewrite `vault.hcl` and the TLS files and restart or signal
//! the server. Run together on one node they would interleave: a boot could start the server
//! on raft data a rejoin is moving aside. Each takes an exclusive `flock` on
//! `<state_dir>/node.lock` before its first change and keeps it until the node is settled
//! (not while it merely supervises the server afterwards). The kernel drops the lock when
//! the process dies, so a killed agent never leaves a stale lock behind.
//!
//! The file holds the holder's command and PID, for the message the other command prints.

use crate::error::{Error, Result};
use crate::fsutil::{self, Owner};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

pub const LOCK_FILE: &str = "node.lock";

/// How long a command waits for another one to finish before it gives up (exit 75, and
/// systemd restarts `boot` later). A rejoin that waits for a voter can take minutes; a boot
/// restarted by systemd is cheap to retry.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// Held while alive; dropping it (or the process dying) releases the lock.
#[derive(Debug)]
pub struct NodeLock {
    _lock: Flock<File>,
}

/// Takes this node's lock for `command`, waiting up to `wait` for a holder to finish.
pub async fn acquire(state_dir: &Path, command: &str, wait: Duration) -> Result<NodeLock> {
    fsutil::ensure_dir(state_dir, 0o700, Owner::default())?;
    let path = state_dir.join(LOCK_FILE);
    let started = Instant::now();
    let mut announced = false;
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::write(&path, e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                // Who holds it, for the other command's message. Not a secret, not critical:
                // a failed write only makes that message vaguer.
                let _ = lock.set_len(0);
                let _ = lock.rewind();
                let _ = writeln!(lock, "{command} (pid {})", std::process::id());
                return Ok(NodeLock { _lock: lock });
            }
            Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "unknown holder".to_owned(),
                    h => h.to_owned(),
                };
                if started.elapsed() >= wait {
                    return Err(Error::NodeBusy {
                        holder,
                        waited_secs: wait.as_secs(),
                    });
                }
                if !announced {
                    tracing::warn!(%holder, wait_secs = wait.as_secs(), "another vault-bootstrap command is changing this node; waiting for it to finish");
                    announced = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err((_, errno)) => {
                return Err(Error::write(&path, format!("flock: {errno}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_holder_waits_then_names_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path(), "rejoin", DEFAULT_WAIT).await.unwrap();
        let e = acquire(dir.path(), "boot", Duration::from_millis(300))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("rejoin (pid {})", std::process::id())),
            "{msg}"
        );
        assert_eq!(e.exit_code(), 75);
        drop(first);
        // Released: the next command gets it at once.
        let again = acquire(dir.path(), "boot", Duration::from_millis(300)).await;
        assert!(again.is_ok());
    }
}
