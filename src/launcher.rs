//! Starting the Vault server: through systemd (production) or as the agent's own child
//! (`launcher = "exec"`: tests and containers).

use crate::config::{Flavor, LauncherKind, VaultConfig};
use crate::error::{Error, Result};
use crate::vault_api::Liveness;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use tokio::process::{Child, Command};

/// A started server.
pub enum Running {
    /// systemd owns the process; `untouched` when it was already running with this
    /// configuration and the agent did not start or restart it.
    Unit { unit: String, untouched: bool },
    /// The agent owns the process.
    Child(Child),
}

impl Liveness for Child {
    fn exited(&mut self) -> Option<String> {
        match self.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }
}

/// The binary must exist and be executable before anything is started.
pub fn check_binary(path: &Path) -> Result<()> {
    let missing = |problem: &str| Error::BinaryMissing {
        path: path.into(),
        problem: problem.into(),
    };
    let meta = std::fs::metadata(path).map_err(|_| missing("does not exist"))?;
    if !meta.is_file() {
        return Err(missing("is not a file"));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(missing("is not executable"));
    }
    Ok(())
}

/// Variables an operator sets for the agent (`rejoin`, `status`, `snapshot restore`) that
/// the server binary must not inherit: a token in a long-lived server's environment is
/// readable in `/proc/<pid>/environ` for as long as the server runs.
pub const OPERATOR_ONLY_ENV: &[&str] = &["VAULT_TOKEN", "BAO_TOKEN"];

/// A command running the server binary, without the operator's token in its environment.
pub fn binary_command(binary: &Path) -> Command {
    without_operator_env(binary)
}

/// Any command the agent runs: the operator's token stays with the agent.
fn without_operator_env(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    for v in OPERATOR_ONLY_ENV {
        c.env_remove(v);
    }
    c
}

/// Resolves `vault.flavor = "auto"` by asking the binary for its version.
pub async fn resolve_flavor(v: &VaultConfig) -> Flavor {
    match v.flavor {
        Flavor::Auto => {}
        f => return f,
    }
    let out = binary_command(&v.binary)
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .await;
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let name = v
        .binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if text.contains("OpenBao") || (text.is_empty() && name.contains("bao")) {
        Flavor::Openbao
    } else {
        Flavor::Vault
    }
}

/// Fails with the address named when another process listens on a port the server needs.
pub fn check_ports_free(ip: IpAddr, api_port: u16, cluster_port: u16) -> Result<()> {
    for (port, what) in [(api_port, "api"), (cluster_port, "cluster")] {
        let addr = SocketAddr::new(ip, port);
        if let Err(e) = TcpListener::bind(addr) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                return Err(Error::PortInUse {
                    addr: addr.to_string(),
                    what,
                });
            }
            return Err(Error::Command {
                command: format!("bind {addr}"),
                message: e.to_string(),
            });
        }
    }
    Ok(())
}

/// Runs `systemctl ARGS` and returns its exit status, whatever it is (for queries such as
/// `is-active`, whose answer is the status).
pub async fn systemctl_status(args: &[&str]) -> Result<std::process::ExitStatus> {
    Ok(systemctl_output(args).await?.status)
}

/// Runs `systemctl ARGS`; a non-zero exit is an error carrying systemctl's stderr.
pub async fn systemctl(args: &[&str]) -> Result<()> {
    let out = systemctl_output(args).await?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        command: format!("systemctl {}", args.join(" ")),
        message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

async fn systemctl_output(args: &[&str]) -> Result<std::process::Output> {
    without_operator_env("systemctl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| Error::Command {
            command: format!("systemctl {}", args.join(" ")),
            message: e.to_string(),
        })
}

/// Starts (or, when its configuration changed, restarts) the server.
///
/// The systemd launcher never blocks on the start job (`--no-block`): `vault-bootstrap.service`
/// may be ordered before `vault.service`, and waiting there would deadlock. The caller polls
/// `sys/health` instead.
pub async fn start(v: &VaultConfig, bind: IpAddr, config_changed: bool) -> Result<Running> {
    check_binary(&v.binary)?;
    match v.launcher {
        LauncherKind::Systemd => {
            let active = systemctl_status(&["is-active", "--quiet", &v.unit])
                .await?
                .success();
            let verb = match (active, config_changed) {
                (true, true) => "restart",
                (true, false) => {
                    tracing::info!(unit = %v.unit, "unit already active, configuration unchanged");
                    return Ok(Running::Unit {
                        unit: v.unit.clone(),
                        untouched: true,
                    });
                }
                (false, _) => "start",
            };
            systemctl(&[verb, "--no-block", &v.unit]).await?;
            tracing::info!(unit = %v.unit, verb, "asked systemd to start the server");
            Ok(Running::Unit {
                unit: v.unit.clone(),
                untouched: false,
            })
        }
        LauncherKind::Exec => {
            check_ports_free(bind, v.api_port, v.cluster_port)?;
            let child = binary_command(&v.binary)
                .arg("server")
                .arg(format!("-config={}", v.config_file.display()))
                .stdin(Stdio::null())
                .kill_on_drop(false)
                .spawn()
                .map_err(|e| Error::Command {
                    command: format!("{} server", v.binary.display()),
                    message: e.to_string(),
                })?;
            tracing::info!(pid = child.id().unwrap_or(0), binary = %v.binary.display(), "spawned the server");
            Ok(Running::Child(child))
        }
    }
}

/// Stops the server, whichever launcher started it: `systemctl stop` (it waits for the
/// unit's own stop, `TimeoutStopSec=`), or the exec launcher's recorded PID when it is still
/// that server (nothing of ours running is not an error).
pub async fn stop_server(v: &VaultConfig, state_dir: &Path) -> Result<()> {
    match v.launcher {
        LauncherKind::Systemd => systemctl(&["stop", &v.unit]).await,
        LauncherKind::Exec => {
            let Ok(Reloader::Pid(pid)) = reloader_for(v, state_dir) else {
                return Ok(());
            };
            // A raft server shuts down in well under a second; 30 s covers a slow disk.
            stop_pid(pid, std::time::Duration::from_secs(30)).await
        }
    }
}

/// File in `agent.state_dir` holding the PID of a server the exec launcher started, so
/// `refresh-tls` can reload it.
pub const PID_FILE: &str = "server.pid";

/// The reloader for the configured launcher, outside `boot` (e.g. `refresh-tls`): the unit,
/// or the PID the exec launcher recorded, checked to still be that server.
pub fn reloader_for(v: &VaultConfig, state_dir: &Path) -> Result<Reloader> {
    match v.launcher {
        LauncherKind::Systemd => Ok(Reloader::Unit(v.unit.clone())),
        LauncherKind::Exec => {
            let p = state_dir.join(PID_FILE);
            let pid: u32 = std::fs::read_to_string(&p)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| Error::Command {
                    command: "find the server".into(),
                    message: format!("no server PID in {}: is `boot` running?", p.display()),
                })?;
            // Never signal a recycled PID: it must still be `<binary> server`.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let binary = v.binary.as_os_str().as_encoded_bytes();
            if args.first() != Some(&binary) || args.get(1) != Some(&&b"server"[..]) {
                return Err(Error::Command {
                    command: "find the server".into(),
                    message: format!(
                        "PID {pid} from {} is not {} server",
                        p.display(),
                        v.binary.display()
                    ),
                });
            }
            Ok(Reloader::Pid(pid))
        }
    }
}

/// `systemctl kill` option naming the unit's main process as the only one to signal; the
/// spelling of systemd 252 and later (Debian 12, Amazon Linux 2023).
pub const KILL_WHOM_MAIN: &str = "--kill-whom=main";
/// The same option as systemd before 252 spells it (Ubuntu 22.04 has 249); 252 still accepts it.
pub const KILL_WHO_MAIN: &str = "--kill-who=main";

/// The `systemctl` arguments that send SIGHUP to `unit`'s main process, the server; `whom` is
/// [`KILL_WHOM_MAIN`] or [`KILL_WHO_MAIN`].
///
/// Not `systemctl reload`: that runs the unit's `ExecReload=`, an external program the image
/// may lack (`/bin/kill` is in procps, which a minimal Debian has not: the reload job failed
/// 203/EXEC and the agent exited 71 on every restart). systemd carries out `kill` itself. Only
/// the main process: plugin processes share the unit's cgroup and SIGHUP could end them.
/// PID 1 authorizes `kill` from root by CAP_KILL (`start`/`reload` by CAP_SYS_ADMIN): the
/// agent's units grant both.
pub fn sighup_args<'a>(unit: &'a str, whom: &'static str) -> [&'a str; 4] {
    ["kill", whom, "--signal=SIGHUP", unit]
}

/// Whether systemctl refused `--kill-whom` as an unknown option (systemd before 252).
fn predates_kill_whom(stderr: &str) -> bool {
    stderr.contains("unrecognized option") && stderr.contains("--kill-whom")
}

/// How to ask a running server to reload its configuration (SIGHUP): re-reads TLS files
/// and, on OpenBao, creates the audit devices declared in vault.hcl.
#[derive(Debug, Clone)]
pub enum Reloader {
    Pid(u32),
    /// SIGHUP through systemd ([`sighup_args`]); never `systemctl reload`.
    Unit(String),
    /// The child has exited (tokio no longer knows its PID). Never a PID of 0: kill(0, ..)
    /// would signal the agent's whole process group.
    Gone,
}

impl Reloader {
    pub fn of(running: &Running) -> Reloader {
        match running {
            Running::Unit { unit, .. } => Reloader::Unit(unit.clone()),
            Running::Child(c) => c.id().map_or(Reloader::Gone, Reloader::Pid),
        }
    }

    pub async fn reload(&self) -> Result<()> {
        match self {
            Reloader::Pid(pid) => nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .map_err(|e| Error::Command {
                command: format!("kill -HUP {pid}"),
                message: e.to_string(),
            }),
            Reloader::Unit(unit) => match systemctl(&sighup_args(unit, KILL_WHOM_MAIN)).await {
                Err(Error::Command { message, .. }) if predates_kill_whom(&message) => {
                    tracing::info!(unit = %unit, "systemctl predates --kill-whom (systemd < 252): sending SIGHUP with --kill-who");
                    systemctl(&sighup_args(unit, KILL_WHO_MAIN)).await
                }
                r => r,
            },
            Reloader::Gone => Err(Error::ServerExited {
                status: "it had already exited when asked to reload".into(),
            }),
        }
    }
}

fn signal_child(child: &Child, sig: nix::sys::signal::Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

/// Stops a child started by [`start`] (SIGTERM, then waits up to `grace`, then SIGKILL).
pub async fn stop_child(child: &mut Child, grace: std::time::Duration) {
    signal_child(child, nix::sys::signal::Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Stops the server at `pid`, started by another agent process (SIGTERM, up to `grace`,
/// then SIGKILL): its ports would keep a new server from starting. Raft's log is
/// crash-safe, so a SIGKILL loses nothing a SIGTERM would have kept.
pub async fn stop_pid(pid: u32, grace: std::time::Duration) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    let target = nix::unistd::Pid::from_raw(pid as i32);
    let _ = kill(target, Signal::SIGTERM);
    if wait_gone(pid, grace).await {
        return Ok(());
    }
    tracing::warn!(
        pid,
        grace_secs = grace.as_secs(),
        "the server did not stop after SIGTERM; sending SIGKILL"
    );
    let _ = kill(target, Signal::SIGKILL);
    if wait_gone(pid, std::time::Duration::from_secs(10)).await {
        return Ok(());
    }
    Err(Error::Command {
        command: format!("stop the server (pid {pid})"),
        message: "it is still running 10 s after SIGKILL".into(),
    })
}

/// Waits (bounded) until process `pid` is gone: no such process, or a zombie (its parent,
/// the other agent, reaps it) none of whose threads still runs. A multi-threaded server's
/// main thread shows `Z` while other threads are still exiting, and those keep its
/// listening sockets open until the last one is done.
async fn wait_gone(pid: u32, bound: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return true;
        };
        let zombie = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z');
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count())
            .unwrap_or(0);
        if zombie && threads <= 1 {
            return true;
        }
        if start.elapsed() >= bound {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Stays with the child until it exits, forwarding SIGTERM/SIGINT (stop) and SIGHUP
/// (reload) to it; returns the exit code to leave with (128 + signal when it was killed).
pub async fn supervise(mut child: Child) -> Result<i32> {
    use nix::sys::signal::Signal;
    use tokio::signal::unix::{signal, SignalKind};
    let mk = |k| {
        signal(k).map_err(|e| Error::Command {
            command: "install signal handler".into(),
            message: e.to_string(),
        })
    };
    let mut term = mk(SignalKind::terminate())?;
    let mut int = mk(SignalKind::interrupt())?;
    let mut hup = mk(SignalKind::hangup())?;
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| Error::Command { command: "wait for the server".into(), message: e.to_string() })?;
                use std::os::unix::process::ExitStatusExt;
                let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                tracing::info!(%status, "the server exited");
                return Ok(code);
            }
            _ = term.recv() => { tracing::info!("SIGTERM: stopping the server"); signal_child(&child, Signal::SIGTERM); }
            _ = int.recv() => { tracing::info!("SIGINT: stopping the server"); signal_child(&child, Signal::SIGINT); }
            _ = hup.recv() => { tracing::info!("SIGHUP: asking the server to reload"); signal_child(&child, Signal::SIGHUP); }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_pid_kills_a_server_that_ignores_sigterm() {
        // Another process's child, as a boot agent's server is for rejoin: spawned here but
        // reaped by nobody until the end, so "gone" means a zombie with no live thread.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "trap '' TERM; while :; do sleep 1; done"])
            .spawn()
            .unwrap();
        let pid = child.id();
        // Let the shell install its trap before the signal arrives.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let t = std::time::Instant::now();
        stop_pid(pid, std::time::Duration::from_secs(1))
            .await
            .unwrap();
        assert!(
            t.elapsed() >= std::time::Duration::from_secs(1),
            "SIGTERM was ignored: the grace must pass"
        );
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }

    #[test]
    fn sighup_goes_to_the_main_process_through_systemd() {
        assert_eq!(
            sighup_args("vault.service", KILL_WHOM_MAIN),
            [
                "kill",
                "--kill-whom=main",
                "--signal=SIGHUP",
                "vault.service"
            ]
        );
        // What systemctl 249 prints for the newer spelling, and what it must not match.
        assert!(predates_kill_whom(
            "systemctl: unrecognized option '--kill-whom=main'"
        ));
        assert!(!predates_kill_whom(
            "Failed to kill unit vault.service: Unit vault.service not loaded."
        ));
    }

    #[test]
    fn missing_binary_is_named() {
        let e = check_binary(Path::new("/nonexistent/vault")).unwrap_err();
        assert_eq!(e.exit_code(), 72);
        assert!(e.to_string().contains("/nonexistent/vault"));
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vault");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_binary(&f)
            .unwrap_err()
            .to_string()
            .contains("not executable"));
    }

    #[test]
    fn the_server_never_inherits_the_operator_token() {
        let c = binary_command(Path::new("/usr/local/bin/vault"));
        let removed: Vec<_> = c
            .as_std()
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        for v in OPERATOR_ONLY_ENV {
            assert!(removed.iter().any(|r| r == v), "{v} is passed on");
        }
    }

    #[test]
    fn taken_port_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let e = check_ports_free("127.0.0.1".parse().unwrap(), port, 1).unwrap_err();
        assert_eq!(e.exit_code(), 69);
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    }
}
