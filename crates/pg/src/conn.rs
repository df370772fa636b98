//! Connecting to PostgreSQL the way libpq does: keyword/value conninfo strings and
//! `postgresql://` URIs, `PG*` environment variables, connection services
//! (`pg_service.conf`), the password file (`.pgpass`) and TLS with libpq's `sslmode`s.
//!
//! Precedence, as in libpq: the conninfo string, then the service it (or `PGSERVICE`)
//! names, then `PG*` variables, then built-in defaults.
//!
//! The wire protocol is `postgres` (sfackler's synchronous client over tokio-postgres);
//! TLS is rustls. What libpq does that this does not: GSSAPI/Kerberos, `sslmode=allow`
//! is treated as `prefer`, and certificate revocation lists are not consulted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postgres::config::{SslMode as WireSslMode, TargetSessionAttrs};
use postgres::{Client, SimpleQueryMessage};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection string: {0}")]
    Conninfo(String),
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("cannot connect to PostgreSQL at {target}: {message}")]
    Connect { target: String, message: String },
    #[error("query failed ({sql}): {message}")]
    Query { sql: String, message: String },
    /// The query is left out: what the server refused says more to an operator.
    #[error("PostgreSQL at {target} refused: {message}; connect as a superuser, or grant the role the privileges in docs/cli.md (\"PostgreSQL privileges\")")]
    Privilege { target: String, message: String },
    #[error("unexpected answer to {sql}: {message}")]
    Answer { sql: String, message: String },
    /// The server ended the session (a restart, `pg_terminate_backend`, a timeout, a
    /// crash): no query on it can succeed again, and what it held ended with it.
    #[error("PostgreSQL at {target} ended the session ({message})")]
    SessionEnded { target: String, message: String },
    #[error("PostgreSQL at {target} cannot read its own control file in {attempts} tries (\"{message}\"): global/pg_control is corrupt on disk, and the server would not start again on it; run CHECKPOINT, which rewrites it from memory, and try again")]
    ControlFileChecksum {
        target: String,
        message: String,
        attempts: u32,
    },
}

/// Whether a `pg_control_*()` function failed because the file it read fails its
/// checksum: a read meeting the server's rewrite of it half done, or a corrupt file.
/// They raise it as an internal error (XX000), in the server's `lc_messages`; their
/// failures to open or read the file have codes of their own.
fn is_control_file_checksum_error(error: &postgres::Error) -> bool {
    error.code() == Some(&postgres::error::SqlState::INTERNAL_ERROR)
        || error_text(error).contains("calculated CRC checksum does not match value stored in file")
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, ConnError> {
        match text {
            "disable" => Ok(SslMode::Disable),
            "allow" | "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(ConnError::Conninfo(format!(
                "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            ))),
        }
    }
}

/// Where and how to connect, fully resolved. `Display` shows it without the password.
#[derive(Clone)]
pub struct ConnectOptions {
    params: BTreeMap<String, String>,
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectOptions({self})")
    }
}

impl fmt::Display for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = ["host", "hostaddr", "port", "user", "dbname", "sslmode"]
            .iter()
            .filter_map(|k| self.params.get(*k).map(|v| format!("{k}={v}")))
            .collect();
        f.write_str(&shown.join(" "))
    }
}

const ENVIRONMENT: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("dbname", "PGDATABASE"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("passfile", "PGPASSFILE"),
    ("options", "PGOPTIONS"),
    ("application_name", "PGAPPNAME"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
];

impl ConnectOptions {
    /// Resolves `conninfo` (keyword/value or URI; `None` or empty for defaults) against the
    /// service file, the environment and libpq's defaults.
    pub fn resolve(conninfo: Option<&str>) -> Result<ConnectOptions, ConnError> {
        Self::resolve_with(conninfo, &|name| std::env::var(name).ok())
    }

    fn resolve_with(
        conninfo: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConnectOptions, ConnError> {
        let mut params = parse_conninfo(conninfo.unwrap_or("").trim())?;
        let service = params.get("service").cloned().or_else(|| env("PGSERVICE"));
        if let Some(service) = service {
            for (key, value) in read_service(&service, env)? {
                params.entry(key).or_insert(value);
            }
        }
        for (key, var) in ENVIRONMENT {
            if let Some(value) = env(var).filter(|v| !v.is_empty()) {
                params.entry(key.to_string()).or_insert(value);
            }
        }
        if !params.contains_key("host") && !params.contains_key("hostaddr") {
            params.insert("host".into(), default_socket_dir());
        }
        params.entry("port".into()).or_insert_with(|| "5432".into());
        if !params.contains_key("user") {
            let user = env("USER").or_else(|| env("LOGNAME")).ok_or_else(|| {
                ConnError::Conninfo(
                    "no user name: set user= in the connection string or PGUSER".into(),
                )
            })?;
            params.insert("user".into(), user);
        }
        if !params.contains_key("dbname") {
            let user = params["user"].clone();
            params.insert("dbname".into(), user);
        }
        params
            .entry("sslmode".into())
            .or_insert_with(|| "prefer".into());
        params
            .entry("application_name".into())
            .or_insert_with(|| "pgvault".into());
        SslMode::parse(&params["sslmode"])?;
        if !params.contains_key("password") {
            let passfile = params
                .get("passfile")
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")));
            if let Some(passfile) = passfile {
                if let Some(password) = password_from_file(&passfile, &params) {
                    params.insert("password".into(), password);
                }
            }
        }
        Ok(ConnectOptions { params })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// The same server, another database.
    pub fn with_dbname(&self, dbname: &str) -> ConnectOptions {
        let mut params = self.params.clone();
        params.insert("dbname".into(), dbname.to_string());
        ConnectOptions { params }
    }

    /// The resolved settings as libpq environment variables, for PostgreSQL's own client
    /// tools (`pg_dump`, `psql`, …): nothing secret appears on their command line.
    pub fn client_environment(&self) -> Vec<(&'static str, String)> {
        ENVIRONMENT
            .iter()
            .filter_map(|(key, var)| self.params.get(*key).map(|v| (*var, v.clone())))
            .collect()
    }

    fn ssl_mode(&self) -> SslMode {
        self.get("sslmode")
            .and_then(|m| SslMode::parse(m).ok())
            .unwrap_or(SslMode::Prefer)
    }

    fn wire_config(&self) -> Result<postgres::Config, ConnError> {
        let mut config = postgres::Config::new();
        let hosts: Vec<&str> = self
            .get("host")
            .map(|h| h.split(',').collect())
            .unwrap_or_default();
        for host in &hosts {
            config.host(host);
        }
        if let Some(addrs) = self.get("hostaddr") {
            for addr in addrs.split(',') {
                let ip = addr.parse().map_err(|_| {
                    ConnError::Conninfo(format!("hostaddr {addr:?} is not an IP address"))
                })?;
                config.hostaddr(ip);
            }
        }
        for port in self.get("port").unwrap_or("5432").split(',') {
            let port = port
                .parse()
                .map_err(|_| ConnError::Conninfo(format!("port {port:?} is not a number")))?;
            config.port(port);
        }
        if let Some(user) = self.get("user") {
            config.user(user);
        }
        if let Some(password) = self.get("password") {
            config.password(password);
        }
        if let Some(dbname) = self.get("dbname") {
            config.dbname(dbname);
        }
        if let Some(options) = self.get("options") {
            config.options(options);
        }
        if let Some(name) = self.get("application_name") {
            config.application_name(name);
        }
        if let Some(timeout) = self.get("connect_timeout") {
            let seconds: u64 = timeout.parse().map_err(|_| {
                ConnError::Conninfo(format!(
                    "connect_timeout {timeout:?} is not a number of seconds"
                ))
            })?;
            if seconds > 0 {
                config.connect_timeout(Duration::from_secs(seconds.max(2)));
            }
        } else {
            config.connect_timeout(Duration::from_secs(30));
        }
        match self.get("target_session_attrs") {
            None | Some("any") => {}
            Some("read-write") => {
                config.target_session_attrs(TargetSessionAttrs::ReadWrite);
            }
            Some(other) => {
                return Err(ConnError::Conninfo(format!(
                    "target_session_attrs {other:?} is not supported (any or read-write)"
                )))
            }
        }
        config.ssl_mode(match self.ssl_mode() {
            SslMode::Disable => WireSslMode::Disable,
            SslMode::Prefer => WireSslMode::Prefer,
            _ => WireSslMode::Require,
        });
        Ok(config)
    }

    fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, ConnError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConnError::Tls(e.to_string()))?;
        let mode = self.ssl_mode();
        // libpq: with a root certificate present, `require` verifies like `verify-ca`.
        let root_file = match self.get("sslrootcert") {
            Some(path) => Some(PathBuf::from(path)),
            None => std::env::var_os("HOME")
                .map(|h| Path::new(&h).join(".postgresql/root.crt"))
                .filter(|p| p.exists()),
        };
        let verify = match mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require => root_file.is_some(),
            SslMode::Prefer | SslMode::Disable => false,
        };
        let builder = if verify {
            let roots = root_store(root_file.as_deref())?;
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| ConnError::Tls(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier {
                    webpki: Some(webpki),
                    check_host: mode == SslMode::VerifyFull,
                    provider,
                }))
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier {
                    webpki: None,
                    check_host: false,
                    provider,
                }))
        };
        let config = match (self.get("sslcert"), self.get("sslkey")) {
            (Some(cert), Some(key)) if Path::new(cert).exists() => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| ConnError::Tls(format!("sslcert {cert}: {e}")))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| ConnError::Tls(format!("sslkey {key}: {e}")))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| ConnError::Tls(e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }
}

fn root_store(file: Option<&Path>) -> Result<RootCertStore, ConnError> {
    let mut roots = RootCertStore::empty();
    match file {
        Some(path) if path.as_os_str() == "system" => {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ConnError::Tls(format!("sslrootcert {}: {e}", path.display())))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| ConnError::Tls(format!("sslrootcert {}: {e}", path.display())))?;
            }
        }
        None => {
            return Err(ConnError::Tls(
                "sslmode verify-ca/verify-full needs a root certificate: set sslrootcert (a file, or \"system\")".into(),
            ))
        }
    }
    Ok(roots)
}

/// libpq's certificate policy: no verification below verify-ca, the chain only for
/// verify-ca, chain and host name for verify-full. Signatures are always checked.
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_host: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_host => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn default_socket_dir() -> String {
    ["/var/run/postgresql", "/tmp"]
        .iter()
        .find(|d| Path::new(d).is_dir())
        .unwrap_or(&"/tmp")
        .to_string()
}

/// Parses a keyword/value conninfo or a `postgres://`/`postgresql://` URI into libpq
/// keywords. Unknown keywords are refused, like libpq does.
pub fn parse_conninfo(text: &str) -> Result<BTreeMap<String, String>, ConnError> {
    let params = if text.starts_with("postgresql://") || text.starts_with("postgres://") {
        parse_uri(text)?
    } else {
        parse_keywords(text)?
    };
    for key in params.keys() {
        if !KNOWN_KEYWORDS.contains(&key.as_str()) {
            return Err(ConnError::Conninfo(format!(
                "unknown keyword {key:?} (known: {})",
                KNOWN_KEYWORDS.join(", ")
            )));
        }
    }
    Ok(params)
}

const KNOWN_KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "options",
    "application_name",
    "fallback_application_name",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "connect_timeout",
    "target_session_attrs",
    "service",
    "keepalives",
    "keepalives_idle",
    "client_encoding",
];

fn parse_keywords(text: &str) -> Result<BTreeMap<String, String>, ConnError> {
    let mut params = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(params);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnError::Conninfo(format!(
                "missing \"=\" after {key:?} in {text:?} (expected key=value pairs or a postgresql:// URI)"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => break,
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(ConnError::Conninfo(format!(
                            "unterminated quoted value for {key:?}"
                        )))
                    }
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(next) = chars.next() {
                        value.push(next);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        params.insert(key, value);
    }
}

fn percent_decode(text: &str) -> Result<String, ConnError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConnError::Conninfo(format!("bad percent-encoding in {text:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnError::Conninfo(format!("{text:?} is not UTF-8")))
}

fn parse_uri(text: &str) -> Result<BTreeMap<String, String>, ConnError> {
    let mut params = BTreeMap::new();
    let rest = text.split_once("://").map(|(_, r)| r).unwrap_or_default();
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let hosts = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                params.insert("user".into(), percent_decode(user)?);
            }
            if let Some(password) = password {
                params.insert("password".into(), percent_decode(password)?);
            }
            hosts
        }
        None => authority,
    };
    if !hosts.is_empty() {
        let mut names = Vec::new();
        let mut ports = Vec::new();
        for host in hosts.split(',') {
            let (name, port) = if let Some(v6) = host.strip_prefix('[') {
                let (addr, after) = v6.split_once(']').ok_or_else(|| {
                    ConnError::Conninfo(format!("unterminated IPv6 address in {text:?}"))
                })?;
                (
                    addr.to_string(),
                    after.strip_prefix(':').map(str::to_string),
                )
            } else {
                match host.split_once(':') {
                    Some((n, p)) => (percent_decode(n)?, Some(p.to_string())),
                    None => (percent_decode(host)?, None),
                }
            };
            names.push(name);
            ports.push(port.unwrap_or_default());
        }
        if names.iter().any(|n| !n.is_empty()) {
            params.insert("host".into(), names.join(","));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            let ports: Vec<String> = ports
                .into_iter()
                .map(|p| if p.is_empty() { "5432".into() } else { p })
                .collect();
            params.insert("port".into(), ports.join(","));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        params.insert("dbname".into(), percent_decode(db)?);
    }
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| ConnError::Conninfo(format!("URI parameter {pair:?} has no \"=\"")))?;
        let key = match percent_decode(key)?.as_str() {
            "ssl" if value == "true" => {
                params.insert("sslmode".into(), "require".into());
                continue;
            }
            other => other.to_string(),
        };
        params.insert(key, percent_decode(value)?);
    }
    Ok(params)
}

/// The settings of `service` from the user's or the system's service file.
fn read_service(
    service: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, ConnError> {
    let mut files = Vec::new();
    match env("PGSERVICEFILE") {
        Some(file) => files.push(PathBuf::from(file)),
        None => {
            if let Some(home) = env("HOME") {
                files.push(Path::new(&home).join(".pg_service.conf"));
            }
        }
    }
    let sysconf = env("PGSYSCONFDIR").unwrap_or_else(|| "/etc/postgresql-common".into());
    files.push(Path::new(&sysconf).join("pg_service.conf"));
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        if let Some(settings) = service_section(&text, service) {
            return Ok(settings);
        }
    }
    Err(ConnError::Conninfo(format!(
        "service {service:?} not found in {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )))
}

fn service_section(text: &str, service: &str) -> Option<Vec<(String, String)>> {
    let mut in_section = false;
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = name.trim() == service;
            if in_section {
                found = Some(Vec::new());
            }
            continue;
        }
        if in_section {
            if let (Some(settings), Some((k, v))) = (found.as_mut(), line.split_once('=')) {
                settings.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    found
}

/// libpq's password file lookup: `host:port:database:user:password`, `*` matches
/// anything, `\` escapes. Ignored (with a warning) when group or others can read it.
fn password_from_file(file: &Path, params: &BTreeMap<String, String>) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access; ignoring it (chmod 0600 it)",
            file.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    let host = params
        .get("host")
        .map(String::as_str)
        .unwrap_or("localhost");
    let host = if host.starts_with('/') {
        "localhost"
    } else {
        host.split(',').next().unwrap_or(host)
    };
    let port = params.get("port").map(String::as_str).unwrap_or("5432");
    let port = port.split(',').next().unwrap_or(port);
    let wanted = [
        host,
        port,
        params.get("dbname").map(String::as_str).unwrap_or(""),
        params.get("user").map(String::as_str).unwrap_or(""),
    ];
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        if fields.len() < 5 {
            continue;
        }
        if fields[..4]
            .iter()
            .zip(wanted)
            .all(|(field, want)| field == "*" || field == want)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(f)) = (chars.next(), fields.last_mut()) {
                    f.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    fields
}

/// `text` as an SQL string literal.
/// An SQL identifier, always quoted: `a"b` → `"a""b"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A value in a keyword/value connection string: `it's` → `'it\'s'`.
pub fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// One open session. Queries use the simple protocol and return text, which is all
/// pgvault needs and works through connection poolers.
pub struct Connection {
    client: Client,
    target: String,
}

impl Connection {
    pub fn connect(options: &ConnectOptions) -> Result<Connection, ConnError> {
        let target = options.to_string();
        let config = options.wire_config()?;
        let tls = options.tls()?;
        let client = config.connect(tls).map_err(|e| ConnError::Connect {
            target: target.clone(),
            message: error_text(&e),
        })?;
        Ok(Connection { client, target })
    }

    /// Where this session is connected, without the password.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Runs statements, discarding results.
    pub fn execute(&mut self, sql: &str) -> Result<(), ConnError> {
        let result = self.client.batch_execute(sql);
        result.map_err(|e| self.query_error(sql, &e))
    }

    /// Every row of the last statement's result, as text (`None` for NULL).
    pub fn query_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ConnError> {
        let mut attempt = 1;
        let messages = loop {
            match self.client.simple_query(sql) {
                Ok(messages) => break messages,
                // The functions reading pg_control: read again, as a read of the file.
                Err(e) if sql.contains("pg_control_") && is_control_file_checksum_error(&e) => {
                    if attempt == crate::control::READ_ATTEMPTS {
                        return Err(ConnError::ControlFileChecksum {
                            target: self.target.clone(),
                            message: error_text(&e),
                            attempts: attempt,
                        });
                    }
                    attempt += 1;
                    std::thread::sleep(crate::control::BETWEEN_ATTEMPTS);
                }
                Err(e) => return Err(self.query_error(sql, &e)),
            }
        };
        let mut rows = Vec::new();
        for message in messages {
            if let SimpleQueryMessage::Row(row) = message {
                rows.push(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_string))
                        .collect(),
                );
            }
        }
        Ok(rows)
    }

    fn query_error(&self, sql: &str, error: &postgres::Error) -> ConnError {
        let message = error_text(error);
        let fatal = (error.as_db_error()).is_some_and(|db| {
            matches!(
                db.parsed_severity(),
                Some(postgres::error::Severity::Fatal | postgres::error::Severity::Panic)
            )
        });
        if fatal || error.is_closed() {
            let target = self.target.clone();
            return ConnError::SessionEnded { target, message };
        }
        if error.code() == Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            let target = self.target.clone();
            return ConnError::Privilege { target, message };
        }
        let sql = sql.to_string();
        ConnError::Query { sql, message }
    }

    /// The first column of the first row; `None` when there is no row or it is NULL.
    pub fn query_one_value(&mut self, sql: &str) -> Result<Option<String>, ConnError> {
        Ok(self
            .query_rows(sql)?
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().next().flatten()))
    }
}

/// The server's message (with detail and hint) rather than the driver's wrapper text.
fn error_text(error: &postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(&format!(": {cause_text}"));
        }
        source = cause.source();
    }
    text
}

/// The server's WAL archiver, from `pg_stat_archiver`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiverStatus {
    pub last_archived_wal: Option<String>,
    pub failed_count: u64,
    pub last_failed_wal: Option<String>,
    pub last_failed_time: Option<String>,
    /// The last attempt failed: its failure is newer than its last success.
    pub failing: bool,
}

impl ArchiverStatus {
    pub fn read(conn: &mut Connection) -> Result<ArchiverStatus, ConnError> {
        let row = conn
            .query_rows(
                "SELECT last_archived_wal, failed_count::text, last_failed_wal, \
                 last_failed_time::text, (last_failed_time IS NOT NULL AND \
                 (last_archived_time IS NULL OR last_failed_time > last_archived_time))::text \
                 FROM pg_stat_archiver",
            )?
            .into_iter()
            .next()
            .unwrap_or_default();
        let field = |i: usize| row.get(i).cloned().flatten();
        Ok(ArchiverStatus {
            last_archived_wal: field(0),
            failed_count: field(1).and_then(|n| n.parse().ok()).unwrap_or(0),
            last_failed_wal: field(2),
            last_failed_time: field(3),
            failing: field(4).as_deref() == Some("true"),
        })
    }

    /// What an error about WAL segment `awaited` (a file name) that did not arrive should
    /// say about the archiver.
    pub fn explain(&self, awaited: &str) -> String {
        match (&self.last_failed_wal, &self.last_failed_time) {
            (Some(wal), Some(time)) if self.failing => format!(
                "the archiver is failing: it last failed on {wal} at {time} ({} failures so far); the PostgreSQL server log has archive_command's error",
                self.failed_count
            ),
            _ => match self.last_archived_wal.as_deref() {
                Some(last) if archived_past(last, awaited) => format!(
                    "pg_stat_archiver reports {last} archived, so archive_command returned success for {awaited}, but it is not in this repository: archive_command sends WAL somewhere else (another repository, config file or --cluster) or, if asynchronous, has not uploaded it yet; `pgvault setup --apply` sets an archive_command that pushes to this repository"
                ),
                last => format!(
                    "the archiver is not failing (last archived: {}): is it behind or stopped? see pg_stat_archiver and the server log",
                    last.unwrap_or("none")
                ),
            },
        }
    }
}

/// Whether archived file `last` (a segment, or a `.partial` or `.backup` file named after
/// one) is segment `awaited` or one after it on the same timeline. History files name no
/// segment.
fn archived_past(last: &str, awaited: &str) -> bool {
    // Fixed-width upper-case hex: (log, seg) order is the names' order.
    match (segment_part(last), segment_part(awaited)) {
        (Some((last_timeline, last)), Some((timeline, awaited))) => {
            last_timeline == timeline && last >= awaited
        }
        _ => false,
    }
}

/// The timeline and (log, seg) hex of the segment a WAL file name starts with.
fn segment_part(name: &str) -> Option<(&str, &str)> {
    let head = name.get(..24)?;
    let parsed = crate::wal::WalFileName::parse(head).ok()?;
    parsed.is_segment().then(|| head.split_at(8))
}

/// What pgvault needs to know about a running server.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub server_version_num: u32,
    pub system_identifier: u64,
    pub wal_segment_size: u64,
    pub wal_level: String,
    pub archive_mode: String,
    pub archive_command: String,
    /// PostgreSQL 15+: when set, the server ignores archive_command.
    pub archive_library: String,
    pub restore_command: String,
    pub data_checksums: bool,
    pub data_directory: String,
    /// Where the server read its settings, host-based and ident rules from (absolute).
    pub config_file: String,
    pub hba_file: String,
    pub ident_file: String,
    pub in_recovery: bool,
    pub timeline: u32,
}

const CLUSTER_INFO_SQL: &str = "SELECT current_setting('server_version_num'), \
     (SELECT system_identifier::text FROM pg_control_system()), \
     (SELECT bytes_per_wal_segment::text FROM pg_control_init()), \
     current_setting('wal_level'), current_setting('archive_mode'), \
     current_setting('archive_command'), coalesce(current_setting('archive_library', true), ''), \
     coalesce(current_setting('restore_command', true), ''), \
     current_setting('data_checksums'), current_setting('data_directory'), \
     pg_is_in_recovery()::text, \
     (SELECT timeline_id::text FROM pg_control_checkpoint()), \
     current_setting('config_file'), current_setting('hba_file'), current_setting('ident_file')";

impl ClusterInfo {
    pub fn read(conn: &mut Connection) -> Result<ClusterInfo, ConnError> {
        let answer = |message: String| ConnError::Answer {
            sql: "server settings".into(),
            message,
        };
        let row = conn
            .query_rows(CLUSTER_INFO_SQL)?
            .into_iter()
            .next()
            .ok_or_else(|| answer("no row".into()))?;
        let field = |i: usize| -> Result<String, ConnError> {
            row.get(i)
                .cloned()
                .flatten()
                .ok_or_else(|| answer(format!("column {} is NULL", i + 1)))
        };
        let number = |i: usize| -> Result<u64, ConnError> {
            let text = field(i)?;
            text.parse()
                .map_err(|_| answer(format!("{text:?} is not a number")))
        };
        let info = ClusterInfo {
            server_version_num: number(0)? as u32,
            system_identifier: number(1)?,
            wal_segment_size: number(2)?,
            wal_level: field(3)?,
            archive_mode: field(4)?,
            archive_command: field(5)?,
            archive_library: field(6)?,
            restore_command: field(7)?,
            data_checksums: field(8)? == "on",
            data_directory: field(9)?,
            in_recovery: field(10)? == "true",
            timeline: number(11)? as u32,
            config_file: field(12)?,
            hba_file: field(13)?,
            ident_file: field(14)?,
        };
        crate::wal::check_segment_size(info.wal_segment_size).map_err(|e| answer(e.to_string()))?;
        Ok(info)
    }

    pub fn major(&self) -> u32 {
        self.server_version_num / 10000
    }

    /// `15.4`, as operators write versions.
    pub fn version_text(&self) -> String {
        format!("{}.{}", self.major(), self.server_version_num % 10000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn an_archiver_past_the_awaited_segment_says_it_archives_elsewhere() {
        let awaited = "000000010000000200000034";
        for (last, past) in [
            ("000000010000000200000034", true),
            ("000000010000000200000034.00000028.backup", true),
            ("000000010000000300000000", true),
            ("000000010000000200000033", false),
            ("000000010000000100000035", false),
            ("000000020000000200000035", false),
            ("00000002.history", false),
        ] {
            let status = ArchiverStatus {
                last_archived_wal: Some(last.into()),
                ..ArchiverStatus::default()
            };
            let text = status.explain(awaited);
            assert_eq!(text.contains("somewhere else"), past, "{last}: {text}");
            assert_eq!(text.contains("is not failing"), !past, "{last}: {text}");
        }
        let failing = ArchiverStatus {
            last_archived_wal: Some("000000010000000200000035".into()),
            last_failed_wal: Some("000000010000000200000036".into()),
            last_failed_time: Some("2026-12-03 10:51:14+00".into()),
            failed_count: 3,
            failing: true,
        };
        assert!(failing
            .explain(awaited)
            .starts_with("the archiver is failing"));
    }

    #[test]
    fn keyword_value_strings_parse_like_libpq() {
        let params =
            parse_conninfo(r"host=db1 port = 5433 dbname='my db' password='it\'s' user=a\ b")
                .expect("parse");
        assert_eq!(params["host"], "db1");
        assert_eq!(params["port"], "5433");
        assert_eq!(params["dbname"], "my db");
        assert_eq!(params["password"], "it's");
        assert_eq!(params["user"], "a b");
        assert!(parse_conninfo("host").is_err());
        assert!(parse_conninfo("hots=x").is_err());
        assert!(parse_conninfo("dbname='open").is_err());
    }

    #[test]
    fn uris_parse_like_libpq() {
        let params = parse_conninfo(
            "postgresql://us%40er:p%3Ass@h1:5433,[::1]/db%2F1?sslmode=require&application_name=x",
        )
        .expect("parse");
        assert_eq!(params["user"], "us@er");
        assert_eq!(params["password"], "p:ss");
        assert_eq!(params["host"], "h1,::1");
        assert_eq!(params["port"], "5433,5432");
        assert_eq!(params["dbname"], "db/1");
        assert_eq!(params["sslmode"], "require");
        let params = parse_conninfo("postgres:///db?host=/tmp").expect("socket");
        assert_eq!(params["host"], "/tmp");
        assert_eq!(params["dbname"], "db");
        assert!(parse_conninfo("postgresql://h/db?bogus=1").is_err());
    }

    #[test]
    fn conninfo_then_service_then_environment_then_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let services = dir.path().join("services.conf");
        std::fs::write(
            &services,
            "# comment\n[other]\nhost=nope\n[main]\nhost=svc-host\nport=6000\ndbname=svcdb\n",
        )
        .expect("write");
        let env = env_of(vec![
            ("PGSERVICEFILE", services.display().to_string()),
            ("PGUSER", "envuser".into()),
            ("PGPORT", "7000".into()),
            ("PGSSLMODE", "disable".into()),
            ("USER", "osuser".into()),
        ]);
        let options =
            ConnectOptions::resolve_with(Some("service=main port=5999"), &env).expect("resolve");
        assert_eq!(options.get("host"), Some("svc-host"));
        assert_eq!(options.get("port"), Some("5999"));
        assert_eq!(options.get("dbname"), Some("svcdb"));
        assert_eq!(options.get("user"), Some("envuser"));
        assert_eq!(options.get("sslmode"), Some("disable"));
        assert!(!options.to_string().contains("password"));
        let err = ConnectOptions::resolve_with(Some("service=missing"), &env)
            .expect_err("missing service");
        assert!(err.to_string().contains("missing"), "{err}");
        let err =
            ConnectOptions::resolve_with(Some("sslmode=sometimes"), &env).expect_err("bad sslmode");
        assert!(err.to_string().contains("verify-full"), "{err}");
    }

    #[test]
    fn pgpass_matches_wildcards_and_escapes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother:*:*:*:wrong\nlocalhost:5432:*:alice:a\\:b\\\\c\n*:*:*:*:fallback\n",
        )
        .expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut params = BTreeMap::new();
        params.insert("host".to_string(), "/var/run/postgresql".to_string());
        params.insert("port".to_string(), "5432".to_string());
        params.insert("dbname".to_string(), "x".to_string());
        params.insert("user".to_string(), "alice".to_string());
        assert_eq!(
            password_from_file(&file, &params).as_deref(),
            Some("a:b\\c")
        );
        params.insert("user".to_string(), "bob".to_string());
        assert_eq!(
            password_from_file(&file, &params).as_deref(),
            Some("fallback")
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(password_from_file(&file, &params), None);
    }
}
