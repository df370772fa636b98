//! A moto S3 server shared by one test binary.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::free_port;

/// Runs moto's server in-process with a watchdog thread that exits once the parent (this test
/// binary) is gone: a `static` is never dropped, so `Drop` alone would leak the server.
///
/// S3 evaluates `If-None-Match: *` and stores the object as one atomic step; moto checks,
/// then spends a while storing a large body, so two racing conditional PUTs could both
/// succeed. Its PUT handler runs under one lock here, making the emulator as strict as S3.
const MOTO_LAUNCHER: &str = r#"
import os, sys, threading, time
parent = os.getppid()
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
import moto.s3.responses as s3_responses
unlocked_put = s3_responses.S3Response.put_object
put_lock = threading.Lock()
def atomic_put(self, *args, **kwargs):
    with put_lock:
        return unlocked_put(self, *args, **kwargs)
s3_responses.S3Response.put_object = atomic_put
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"#;

pub struct Moto {
    child: Child,
    pub port: u16,
    pub log: std::path::PathBuf,
}

impl Moto {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates `bucket` (moto accepts unsigned requests).
    pub fn create_bucket(&self, bucket: &str) -> Result<(), String> {
        let (status, body) = http_request(self.port, "PUT", &format!("/{bucket}"))?;
        if status == 200 || body.contains("BucketAlreadyOwnedByYou") {
            Ok(())
        } else {
            Err(format!("creating bucket {bucket}: HTTP {status}: {body}"))
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Uploads one object (moto accepts unsigned requests), for fixtures.
    pub fn put_object(&self, bucket: &str, key: &str, body: &[u8]) -> Result<(), String> {
        let (status, text) =
            http_request_with(self.port, "PUT", &format!("/{bucket}/{key}"), body)?;
        if status == 200 {
            Ok(())
        } else {
            Err(format!("PUT {bucket}/{key}: HTTP {status}: {text}"))
        }
    }
}

/// Minimal HTTP/1.1 client: returns the status code and the body.
pub fn http_request(port: u16, method: &str, path: &str) -> Result<(u16, String), String> {
    http_request_with(port, method, path, &[])
}

fn http_request_with(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, String), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .and_then(|_| stream.write_all(body))
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad HTTP response from {addr}: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn moto_installed() -> Result<(), String> {
    match Command::new("python3")
        .args(["-c", "import moto.server"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(_) => Err("python3 cannot import moto (pip install 'moto[server]')".to_string()),
        Err(e) => Err(format!("python3 not runnable: {e}")),
    }
}

fn start_moto() -> Result<Moto, String> {
    moto_installed()?;
    let mut last_error = String::new();
    for _attempt in 0..3 {
        let port = free_port();
        let log =
            std::env::temp_dir().join(format!("pgvault-moto-{}-{port}.log", std::process::id()));
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let log_err = log_file.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("python3")
            .args(["-c", MOTO_LAUNCHER, &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawn moto: {e}"))?;
        let mut moto = Moto { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = moto.child.try_wait() {
                last_error = format!("moto exited with {status} (log: {})", moto.log.display());
                break;
            }
            if let Ok((status, _)) = http_request(port, "GET", "/") {
                if status < 500 {
                    return Ok(moto);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if last_error.is_empty() {
            last_error = format!("moto did not answer on port {port} within 30 s");
        }
    }
    Err(last_error)
}

/// The moto server of this test binary, started on first use. `None` (after printing why)
/// when moto is unavailable outside CI; under `CI=true` that is a test failure instead.
pub fn moto() -> Option<&'static Moto> {
    static MOTO: OnceLock<Result<Moto, String>> = OnceLock::new();
    crate::shared_server(&MOTO, start_moto, "S3 tests need a moto server")
}
