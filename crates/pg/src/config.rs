//! The server's configuration files as the server finds them: `postgresql.conf` and what
//! it includes (`include`, `include_if_exists`, `include_dir`), `pg_hba.conf` with its
//! `@file` lists, and from PostgreSQL 16 on the include directives of `pg_hba.conf` and
//! `pg_ident.conf`. Relative names are relative to the directory of the file naming them,
//! as the server reads them.

use std::fs;
use std::path::{Path, PathBuf};

/// How deep the server follows includes (`CONF_FILE_MAX_DEPTH`).
const MAX_DEPTH: usize = 10;

/// One `name = value` line of a settings file, the value unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub name: String,
    pub value: String,
    pub line: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path} line {line}: {problem}")]
    Syntax {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: includes nested more than {MAX_DEPTH} deep (an include loop?)")]
    TooDeep { path: PathBuf },
}

/// The settings of one file in the server's syntax: `name [=] value` per line, `#`
/// comments, values bare or in single quotes (`''` and backslash escapes inside).
/// Errors are (line, problem).
pub fn parse_settings(text: &str) -> Result<Vec<Setting>, (usize, String)> {
    let mut settings = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let rest = raw.trim_start();
        if rest.is_empty() || rest.starts_with('#') {
            continue;
        }
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'))
            .unwrap_or(rest.len());
        if name_len == 0 || rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Err((line, format!("expected a setting name, found {raw:?}")));
        }
        let name = rest[..name_len].to_ascii_lowercase();
        let mut rest = rest[name_len..].trim_start();
        if let Some(after) = rest.strip_prefix('=') {
            rest = after.trim_start();
        }
        let (value, after) = match rest.strip_prefix('\'') {
            Some(quoted) => {
                unquote(quoted).ok_or_else(|| (line, "unterminated quoted string".to_string()))?
            }
            None => {
                let end = rest
                    .find(|c: char| c.is_whitespace() || c == '#')
                    .unwrap_or(rest.len());
                if end == 0 {
                    return Err((line, format!("{name} has no value")));
                }
                (rest[..end].to_string(), &rest[end..])
            }
        };
        let after = after.trim_start();
        if !(after.is_empty() || after.starts_with('#')) {
            return Err((
                line,
                format!("unexpected {after:?} after the value of {name}"),
            ));
        }
        settings.push(Setting { name, value, line });
    }
    Ok(settings)
}

/// The text of a single-quoted string after its opening quote, unescaped, and what
/// follows its closing quote; `None` when it does not end on the line.
fn unquote(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '\'' if matches!(chars.peek(), Some((_, '\''))) => {
                chars.next();
                value.push('\'');
            }
            '\'' => return Some((value, &text[at + 1..])),
            '\\' => {
                let (_, escaped) = chars.next()?;
                value.push(match escaped {
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    other => other,
                });
            }
            other => value.push(other),
        }
    }
    None
}

/// A file the server reads for its configuration, with its bytes as read.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub data: Vec<u8>,
}

/// What [`configuration_files`] found, and what it could not read or follow.
#[derive(Debug, Default)]
pub struct Found {
    pub files: Vec<ConfigFile>,
    pub problems: Vec<ConfigError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syntax {
    Settings,
    /// `pg_hba.conf`, `pg_ident.conf` and the `@file` lists: whitespace- and
    /// comma-separated tokens, double quotes.
    Lines,
    /// Read by others than the server, which name no further files.
    Opaque,
}

/// What Debian's postgresql-common keeps beside a cluster's `postgresql.conf` for
/// `pg_ctlcluster` (whether and how to start it, `pg_ctl` options, its environment): a
/// cluster restored on a new host needs them as much as the server's own files.
const DEBIAN_CLUSTER_FILES: [&str; 3] = ["start.conf", "pg_ctl.conf", "environment"];

/// Every file the server reads for its configuration, starting from its `config_file`,
/// `hba_file` and `ident_file` settings, each once, in the order found, and Debian's
/// cluster files beside `config_file` where they are. A missing `include_if_exists` file
/// is left out, as the server leaves it out.
pub fn configuration_files(
    config_file: &Path,
    hba_file: &Path,
    ident_file: &Path,
    major: u32,
) -> Found {
    let mut found = Found::default();
    let mut walk = Walk {
        major,
        found: &mut found,
    };
    walk.file(config_file, Syntax::Settings, false, 0);
    walk.file(hba_file, Syntax::Lines, false, 0);
    walk.file(ident_file, Syntax::Lines, false, 0);
    if let Some(dir) = config_file.parent() {
        for name in DEBIAN_CLUSTER_FILES {
            walk.file(&dir.join(name), Syntax::Opaque, true, 0);
        }
    }
    found
}

struct Walk<'f> {
    major: u32,
    found: &'f mut Found,
}

impl Walk<'_> {
    fn file(&mut self, path: &Path, syntax: Syntax, if_exists: bool, depth: usize) {
        let path = &lexically_normal(path);
        if self.found.files.iter().any(|file| file.path == *path) {
            return;
        }
        if depth > MAX_DEPTH {
            self.found.problems.push(ConfigError::TooDeep {
                path: path.to_path_buf(),
            });
            return;
        }
        let data = match fs::read(path) {
            Ok(data) => data,
            Err(e) if if_exists && e.kind() == std::io::ErrorKind::NotFound => return,
            Err(source) => {
                self.found.problems.push(ConfigError::Io {
                    path: path.to_path_buf(),
                    source,
                });
                return;
            }
        };
        let text = String::from_utf8_lossy(&data).into_owned();
        self.found.files.push(ConfigFile {
            path: path.to_path_buf(),
            data,
        });
        let base = path.parent().unwrap_or(Path::new("/"));
        match syntax {
            Syntax::Settings => match parse_settings(&text) {
                Ok(settings) => {
                    for setting in settings {
                        let target = base.join(&setting.value);
                        match setting.name.as_str() {
                            "include" => self.file(&target, syntax, false, depth + 1),
                            "include_if_exists" => self.file(&target, syntax, true, depth + 1),
                            "include_dir" => self.dir(&target, syntax, depth + 1),
                            _ => {}
                        }
                    }
                }
                Err((line, problem)) => self.found.problems.push(ConfigError::Syntax {
                    path: path.to_path_buf(),
                    line,
                    problem,
                }),
            },
            Syntax::Opaque => {}
            Syntax::Lines => {
                for tokens in line_tokens(&text) {
                    let directive = tokens.first().filter(|(_, quoted)| !quoted);
                    if let (true, Some((keyword, _)), Some((name, _))) =
                        (self.major >= 16, directive, tokens.get(1))
                    {
                        let target = base.join(name);
                        match keyword.as_str() {
                            "include" => {
                                self.file(&target, syntax, false, depth + 1);
                                continue;
                            }
                            "include_if_exists" => {
                                self.file(&target, syntax, true, depth + 1);
                                continue;
                            }
                            "include_dir" => {
                                self.dir(&target, syntax, depth + 1);
                                continue;
                            }
                            _ => {}
                        }
                    }
                    for (token, quoted) in &tokens {
                        if let Some(list) = token.strip_prefix('@').filter(|_| !quoted) {
                            self.file(&base.join(list), syntax, false, depth + 1);
                        }
                    }
                }
            }
        }
    }

    /// `include_dir`: its files ending in `.conf` and not starting with `.`, by name.
    fn dir(&mut self, dir: &Path, syntax: Syntax, depth: usize) {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(source) => {
                self.found.problems.push(ConfigError::Io {
                    path: dir.to_path_buf(),
                    source,
                });
                return;
            }
        };
        let mut names: Vec<_> = entries
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_type().is_ok_and(|t| !t.is_dir()))
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".conf") && !name.starts_with('.'))
            .collect();
        names.sort();
        for name in names {
            self.file(&dir.join(name), syntax, false, depth);
        }
    }
}

/// `path` without `.` and with each `..` taking away the name before it, as text: the
/// names the server was given, without following links.
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !normal.pop() {
                    normal.push(component);
                }
            }
            other => normal.push(other),
        }
    }
    normal
}

/// The tokens of each line of `pg_hba.conf`-like text, each with whether it was quoted:
/// separated by whitespace or commas, `#` comments outside quotes, a backslash at the end
/// of a line continuing it.
fn line_tokens(text: &str) -> Vec<Vec<(String, bool)>> {
    let mut lines = Vec::new();
    let mut pending = String::new();
    for raw in text.lines() {
        match raw.strip_suffix('\\') {
            Some(start) => {
                pending.push_str(start);
                pending.push(' ');
                continue;
            }
            None => pending.push_str(raw),
        }
        let line = std::mem::take(&mut pending);
        let mut tokens = Vec::new();
        let mut token = String::new();
        let (mut quoted, mut in_quotes) = (false, false);
        for c in line.chars() {
            match c {
                '"' => {
                    in_quotes = !in_quotes;
                    quoted = true;
                }
                '#' if !in_quotes => break,
                c if !in_quotes && (c.is_whitespace() || c == ',') => {
                    if !token.is_empty() || quoted {
                        tokens.push((std::mem::take(&mut token), quoted));
                    }
                    quoted = false;
                }
                c => token.push(c),
            }
        }
        if !token.is_empty() || quoted {
            tokens.push((token, quoted));
        }
        if !tokens.is_empty() {
            lines.push(tokens);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_read_as_the_server_reads_them() {
        let text = "# comment\n\
            shared_buffers = 128MB   # trailing\n\
            Work_Mem 4MB\n\
            data_directory = '/var/lib/postgresql/15/main'\n\
            archive_command='pgvault archive-push \\'%p\\' it''s'\n\
            \n\
            include_dir 'conf.d'\n\
            custom.setting=on\n";
        let settings = parse_settings(text).expect("valid");
        let pairs: Vec<(&str, &str)> = settings
            .iter()
            .map(|s| (s.name.as_str(), s.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("shared_buffers", "128MB"),
                ("work_mem", "4MB"),
                ("data_directory", "/var/lib/postgresql/15/main"),
                ("archive_command", "pgvault archive-push '%p' it's"),
                ("include_dir", "conf.d"),
                ("custom.setting", "on"),
            ]
        );
        assert_eq!(settings[2].line, 4);
        assert_eq!(
            parse_settings("a = 'open\n").expect_err("unterminated").0,
            1
        );
        assert_eq!(parse_settings("x = 1\n= 2\n").expect_err("no name").0, 2);
        assert!(parse_settings("a = 1 2\n").is_err());
        assert!(parse_settings("a =\n").is_err());
    }

    #[test]
    fn hba_lines_split_on_whitespace_and_commas_with_quotes() {
        let tokens = line_tokens(
            "host  \"my db\",@dbs  all 127.0.0.1/32 scram-sha-256 # c\n\
             # only a comment\n\
             local all \\\n  all peer\n",
        );
        let plain = |line: &Vec<(String, bool)>| -> Vec<String> {
            line.iter().map(|(t, _)| t.clone()).collect()
        };
        assert_eq!(
            plain(&tokens[0]),
            [
                "host",
                "my db",
                "@dbs",
                "all",
                "127.0.0.1/32",
                "scram-sha-256"
            ]
        );
        assert!(tokens[0][1].1 && !tokens[0][2].1);
        assert_eq!(plain(&tokens[1]), ["local", "all", "all", "peer"]);
        assert_eq!(tokens.len(), 2);
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }

    #[test]
    fn includes_are_followed_from_the_three_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let etc = dir.path().join("etc");
        let shared = dir.path().join("shared");
        write(
            &etc.join("postgresql.conf"),
            "include_dir = 'conf.d'\n\
             include_if_exists 'missing.conf'\n\
             include '../shared/common.conf'\n\
             include 'postgresql.conf'\n",
        );
        write(&etc.join("conf.d/20-b.conf"), "work_mem = 1MB\n");
        write(
            &etc.join("conf.d/10-a.conf"),
            "include_if_exists 'extra.conf'\n",
        );
        write(&etc.join("conf.d/extra.conf"), "x = 1\n");
        write(&etc.join("conf.d/.hidden.conf"), "x = 2\n");
        write(&etc.join("conf.d/notes.txt"), "not read\n");
        write(&shared.join("common.conf"), "max_connections = 50\n");
        write(
            &etc.join("pg_hba.conf"),
            "local all @admins peer\n\
             include hba.d/more.conf\n\
             host \"@quoted\" all 127.0.0.1/32 trust\n",
        );
        write(&etc.join("admins"), "alice, bob\n@more_admins\n");
        write(&etc.join("more_admins"), "carol\n");
        write(&etc.join("hba.d/more.conf"), "local all all trust\n");
        write(&etc.join("pg_ident.conf"), "include_dir ident.d\n");
        write(&etc.join("ident.d/map.conf"), "m root postgres\n");
        write(&etc.join("start.conf"), "auto\n");
        write(&etc.join("environment"), "# @not_a_list\n");
        let names = |major| -> Vec<String> {
            let found = configuration_files(
                &etc.join("postgresql.conf"),
                &etc.join("pg_hba.conf"),
                &etc.join("pg_ident.conf"),
                major,
            );
            assert!(found.problems.is_empty(), "{:?}", found.problems);
            (found.files.iter())
                .map(|f| {
                    let relative = f.path.strip_prefix(dir.path()).expect("inside");
                    relative.display().to_string()
                })
                .collect()
        };
        assert_eq!(
            names(16),
            [
                "etc/postgresql.conf",
                "etc/conf.d/10-a.conf",
                "etc/conf.d/extra.conf",
                "etc/conf.d/20-b.conf",
                "shared/common.conf",
                "etc/pg_hba.conf",
                "etc/admins",
                "etc/more_admins",
                "etc/hba.d/more.conf",
                "etc/pg_ident.conf",
                "etc/ident.d/map.conf",
                "etc/start.conf",
                "etc/environment",
            ]
        );
        // Before 16 the hba and ident files have no include directives.
        assert_eq!(
            names(15)[5..],
            [
                "etc/pg_hba.conf",
                "etc/admins",
                "etc/more_admins",
                "etc/pg_ident.conf",
                "etc/start.conf",
                "etc/environment"
            ]
        );
    }

    #[test]
    fn what_cannot_be_read_or_followed_is_reported_and_the_rest_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("postgresql.conf");
        write(&conf, "include 'gone.conf'\ninclude 'loop.conf'\n");
        write(&dir.path().join("loop.conf"), "include 'loop2.conf'\n");
        write(
            &dir.path().join("loop2.conf"),
            "bad line here\ninclude 'loop.conf'\n",
        );
        let found = configuration_files(&conf, &dir.path().join("hba"), &conf, 15);
        let problems: Vec<String> = found.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("gone.conf"), "{problems:?}");
        assert!(problems[1].contains("loop2.conf line 1"), "{problems:?}");
        assert!(problems[2].contains("hba"), "{problems:?}");
        assert_eq!(found.files.len(), 3);
    }
}
