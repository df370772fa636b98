//! An OpenSSH server on 127.0.0.1 for the SFTP backend, shared by one test binary: a
//! dedicated account that is chrooted, key-only and limited to `internal-sftp`, as on
//! a classic backup server.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::Duration;

use crate::free_port;

/// The account the tests log in as.
pub const USER: &str = "pgvault-sftp";

pub struct SshServer {
    _child: Child,
    pub port: u16,
    /// Private key accepted for [`USER`] (owned by root, mode 600).
    pub key: PathBuf,
    /// known_hosts with this server's host key.
    pub known_hosts: PathBuf,
    /// The chroot: the account sees `/data` in it.
    pub chroot: PathBuf,
    pub dir: PathBuf,
}

impl SshServer {
    /// `sftp://USER@127.0.0.1:PORT/data/<sub>`.
    pub fn url(&self, sub: &str) -> String {
        format!("sftp://{USER}@127.0.0.1:{}/data/{sub}", self.port)
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn keygen(path: &Path) -> Result<(), String> {
    let path = path.to_str().ok_or("non-UTF-8 path")?;
    run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", path])
}

fn start_sshd() -> Result<SshServer, String> {
    if !Path::new("/usr/sbin/sshd").exists() {
        return Err("/usr/sbin/sshd not found (apt install openssh-server)".into());
    }
    if !nix_is_root() {
        return Err("the SFTP server tests run sshd and need root".into());
    }
    let known_user = Command::new("id")
        .arg(USER)
        .output()
        .is_ok_and(|o| o.status.success());
    if !known_user {
        run(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ],
        )?;
    }
    // sshd refuses accounts whose password is locked ("!"); "*" allows key logins only.
    run("usermod", &["-p", "*", USER])?;
    let port = free_port();
    let id = format!("{}-{port}", std::process::id());
    let dir = std::env::temp_dir().join(format!("pgvault-sshd-{id}"));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // Every component of a chroot must be root-owned and not writable by others.
    let chroot = PathBuf::from("/srv/pgvault-sftp").join(&id);
    fs::create_dir_all(chroot.join("data")).map_err(|e| e.to_string())?;
    for d in [Path::new("/srv/pgvault-sftp"), chroot.as_path()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    }
    run(
        "chown",
        &[USER, chroot.join("data").to_str().ok_or("path")?],
    )?;
    fs::create_dir_all("/run/sshd").map_err(|e| e.to_string())?;

    let host_key = dir.join("host_ed25519");
    let key = dir.join("client_ed25519");
    keygen(&host_key)?;
    keygen(&key)?;
    let client_pub = fs::read_to_string(key.with_extension("pub")).map_err(|e| e.to_string())?;
    fs::write(dir.join("authorized_keys"), client_pub).map_err(|e| e.to_string())?;
    let host_pub = fs::read_to_string(host_key.with_extension("pub")).map_err(|e| e.to_string())?;
    let known_hosts = dir.join("known_hosts");
    fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_pub}")).map_err(|e| e.to_string())?;
    let config = dir.join("sshd_config");
    fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\n\
             AuthorizedKeysFile {}\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nSubsystem sftp internal-sftp\n\
             Match User {USER}\n  ChrootDirectory {}\n  ForceCommand internal-sftp\n\
             \x20 AllowTcpForwarding no\n  X11Forwarding no\n",
            host_key.display(),
            dir.join("sshd.pid").display(),
            dir.join("authorized_keys").display(),
            chroot.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let child = crate::spawn_watched(
        "sshd",
        &format!("/usr/sbin/sshd -D -e -f {}", config.display()),
        &format!("rm -rf {} {}", dir.display(), chroot.display()),
        &dir.join("sshd.log"),
    )?;
    let server = SshServer {
        _child: child,
        port,
        key,
        known_hosts,
        chroot,
        dir,
    };
    if crate::wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }) {
        return Ok(server);
    }
    Err(format!(
        "sshd did not listen on port {port} within 20 s (log: {})",
        server.dir.join("sshd.log").display()
    ))
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The SSH server of this test binary, started on first use. `None` (after printing why)
/// when it cannot run outside CI; under `CI=true` that is a test failure.
pub fn sshd() -> Option<&'static SshServer> {
    static SSHD: OnceLock<Result<SshServer, String>> = OnceLock::new();
    crate::shared_server(&SSHD, start_sshd, "SFTP tests need sshd")
}
