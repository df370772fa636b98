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
