//! An Azurite (Azure Blob emulator) server shared by one test binary, on 127.0.0.1.
//!
//! Azurite comes from npm (`scripts/ensure-deps.sh` installs it under
//! `$PGVAULT_TOOLS/azurite`); containers are created with the Python Azure SDK, which
//! signs requests the way the service expects.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::free_port;

/// Azurite's fixed development account.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct Azurite {
    _child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Azurite {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={};",
            self.endpoint()
        )
    }

    /// Creates `container` (succeeds when it exists).
    pub fn create_container(&self, container: &str) -> Result<(), String> {
        let script = "import sys\n\
from azure.storage.blob import BlobServiceClient\n\
from azure.core.exceptions import ResourceExistsError\n\
try:\n    BlobServiceClient.from_connection_string(sys.argv[1]).create_container(sys.argv[2])\n\
except ResourceExistsError:\n    pass\n";
        let out = Command::new("python3")
            .args(["-c", script, &self.connection_string(), container])
            .output()
            .map_err(|e| format!("python3: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "creating container {container}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

fn azurite_binary() -> Result<PathBuf, String> {
    let tools = std::env::var("PGVAULT_TOOLS").unwrap_or_else(|_| "/var/tmp/pgvault-tools".into());
    let path = PathBuf::from(tools).join("azurite/node_modules/.bin/azurite-blob");
    if !path.exists() {
        return Err(format!(
            "{} not found (scripts/ensure-deps.sh installs Azurite from npm)",
            path.display()
        ));
    }
    let sdk = Command::new("python3")
        .args(["-c", "import azure.storage.blob"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !sdk.is_ok_and(|s| s.success()) {
        return Err(
            "python3 cannot import azure.storage.blob (pip install azure-storage-blob)".into(),
        );
    }
    Ok(path)
}

fn start_azurite() -> Result<Azurite, String> {
    let binary = azurite_binary()?;
    let port = free_port();
    let data = std::env::temp_dir().join(format!("pgvault-azurite-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let log = data.with_extension("log");
    let child = crate::spawn_watched(
        "azurite",
        &format!(
            "{} --blobHost 127.0.0.1 --blobPort {port} --location {} --skipApiVersionCheck --loose",
            binary.display(),
            data.display()
        ),
        &format!("rm -rf {}", data.display()),
        &log,
    )?;
    let azurite = Azurite {
        _child: child,
        port,
        log,
    };
    if crate::wait_until(Duration::from_secs(60), || {
        crate::s3::http_request(port, "GET", "/").is_ok()
    }) {
        return Ok(azurite);
    }
    Err(format!(
        "Azurite did not answer on port {port} within 60 s (log: {})",
        azurite.log.display()
    ))
}

/// The Azurite server of this test binary, started on first use. `None` (after printing
/// why) when it is unavailable outside CI; under `CI=true` that is a test failure.
pub fn azurite() -> Option<&'static Azurite> {
    static AZURITE: OnceLock<Result<Azurite, String>> = OnceLock::new();
    crate::shared_server(&AZURITE, start_azurite, "Azure tests need Azurite")
}
