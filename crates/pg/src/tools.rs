//! Finding PostgreSQL's client tools (`pg_dump`, `pg_dumpall`, `pg_restore`, `psql`) of
//! a usable version: a dump must be taken by a `pg_dump` at least as new as the server,
//! and restored by a `pg_restore` at least as new as the archive's `pg_dump`.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{tool} not found (looked in {searched}): install the PostgreSQL {major} client tools or pass --pg-bin DIR")]
    NotFound {
        tool: String,
        major: u32,
        searched: String,
    },
    #[error("{path} is PostgreSQL {found}, older than the server ({needed}): pass --pg-bin with the bin directory of PostgreSQL {needed} or newer")]
    TooOld {
        path: String,
        found: u32,
        needed: u32,
    },
    #[error("cannot run {path}: {message}")]
    Broken { path: String, message: String },
}

/// A client tool and its major version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    pub path: PathBuf,
    pub major: u32,
    /// As the tool prints it, e.g. "16.4".
    pub version: String,
}

/// Parses `pg_dump (PostgreSQL) 16.4 (Debian 16.4-1)` → ("16.4", 16).
pub fn parse_version(output: &str) -> Option<(String, u32)> {
    let rest = output.split("(PostgreSQL)").nth(1)?.trim();
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let major = version.split('.').next()?.parse().ok()?;
    Some((version, major))
}

/// Runs `path --version`.
pub fn probe(path: &Path) -> Result<Tool, ToolError> {
    let broken = |message: String| ToolError::Broken {
        path: path.display().to_string(),
        message,
    };
    let out = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|e| broken(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (version, major) = parse_version(&text)
        .ok_or_else(|| broken(format!("unexpected --version output {text:?}")))?;
    Ok(Tool {
        path: path.to_path_buf(),
        major,
        version,
    })
}

/// Directories that may hold client tools, best first: the explicit one alone if given;
/// else Debian's `/usr/lib/postgresql/<major>/bin` (the server's own major first, then
/// newer ones, newest first), then `PATH`.
fn candidates(explicit: Option<&Path>, at_least: u32) -> Vec<PathBuf> {
    if let Some(dir) = explicit {
        return vec![dir.to_path_buf()];
    }
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    majors.retain(|m| *m >= at_least);
    majors.sort_by_key(|m| (*m != at_least, std::cmp::Reverse(*m)));
    let mut dirs: Vec<PathBuf> = majors
        .iter()
        .map(|m| PathBuf::from(format!("/usr/lib/postgresql/{m}/bin")))
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs
}

/// Finds `tool` of major version `at_least` or newer.
pub fn find(tool: &str, at_least: u32, explicit: Option<&Path>) -> Result<Tool, ToolError> {
    let dirs = candidates(explicit, at_least);
    let mut too_old = None;
    for dir in &dirs {
        let path = dir.join(tool);
        if !path.is_file() {
            continue;
        }
        let found = probe(&path)?;
        if found.major >= at_least {
            return Ok(found);
        }
        too_old.get_or_insert(found);
    }
    if let Some(old) = too_old {
        return Err(ToolError::TooOld {
            path: old.path.display().to_string(),
            found: old.major,
            needed: at_least,
        });
    }
    Err(ToolError::NotFound {
        tool: tool.to_string(),
        major: at_least,
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 16.4 (Debian 16.4-1.pgdg120+1)\n"),
            Some(("16.4".into(), 16))
        );
        assert_eq!(
            parse_version("psql (PostgreSQL) 18beta1"),
            Some(("18".into(), 18))
        );
        assert_eq!(parse_version("pg_dump 9.6"), None);
    }

    #[test]
    fn an_explicit_directory_is_the_only_candidate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = find("pg_dump", 15, Some(dir.path())).expect_err("empty dir");
        assert!(matches!(err, ToolError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("--pg-bin"));
    }
}
