//! Real components for tests: PostgreSQL servers of several major versions and a moto S3
//! server, all on 127.0.0.1. Test helpers panic on set-up failures (that is a failed
//! test), and under `CI=true` a missing component is a failure, never a skip.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};

pub mod azurite;
pub mod gcs;
pub mod pg;
pub mod s3;
pub mod sftp;

/// Starts the shell command `server` in the background for the life of this test binary:
/// its servers live in `static`s, which are never dropped, so a watchdog shell kills the
/// server (SIGKILL: some emulators hang in their SIGTERM handler while clients keep
/// connections) and runs `cleanup` once the test process is gone. Output goes to `log`.
pub(crate) fn spawn_watched(
    what: &str,
    server: &str,
    cleanup: &str,
    log: &std::path::Path,
) -> Result<std::process::Child, String> {
    let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let log_err = log_file.try_clone().map_err(|e| e.to_string())?;
    let watchdog = format!(
        "{server} & child=$!; \
         while kill -0 $PPID 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 0.5; done; \
         kill -9 $child 2>/dev/null; {cleanup}"
    );
    std::process::Command::new("sh")
        .args(["-c", &watchdog])
        .stdin(std::process::Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("spawn {what}: {e}"))
}

/// Polls `ready` every 100 ms until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: std::time::Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if ready() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// How many objects `dir` of a local repository holds (0 when it does not exist). An
/// object is written under a temporary dot-name and then renamed: a test waiting for one
/// (a lock, a pack) must not take the temporary name for it.
pub fn published_objects(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        (entries.flatten())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count()
    })
}

/// The server in `cell`, started by `start` on first use and shared by the test binary.
/// `None` (after printing why) when it cannot run outside CI; under `CI=true` a missing
/// component fails the test, it never skips it.
pub(crate) fn shared_server<T: Send + Sync>(
    cell: &'static std::sync::OnceLock<Result<T, String>>,
    start: fn() -> Result<T, String>,
    what: &str,
) -> Option<&'static T> {
    match cell.get_or_init(start) {
        Ok(server) => Some(server),
        Err(reason) if in_ci() => panic!("{what} under CI=true: {reason}"),
        Err(reason) => {
            eprintln!("SKIPPED: {what}: {reason}");
            None
        }
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A name unique within this test binary run, usable as a bucket or prefix component.
pub fn unique(tag: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
