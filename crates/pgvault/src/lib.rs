//! The `pgvault` command line: argument parsing, settings and the verbs. Errors end as
//! one `error: …` line on stderr and exit 1; usage errors exit 2 (clap's convention).

pub mod cli;
pub mod commands;
pub mod config;
pub mod context;
pub mod jobs;
pub mod legacy;
pub mod output;
pub mod retention;
pub mod schedule;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command};
use context::Context;

/// Exits on a command-line error. clap lists the choices for a bad value on a line of
/// their own; here they are part of the one error line, as every other error is.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() == ErrorKind::InvalidValue {
        if let (
            Some(ContextValue::String(arg)),
            Some(ContextValue::String(value)),
            Some(ContextValue::Strings(choices)),
        ) = (
            e.get(ContextKind::InvalidArg),
            e.get(ContextKind::InvalidValue),
            e.get(ContextKind::ValidValue),
        ) {
            eprintln!(
                "error: invalid value {value:?} for {arg}: use {}",
                either(choices)
            );
            std::process::exit(2);
        }
    }
    e.exit()
}

/// "a", "a or b", "a, b or c".
fn either(choices: &[String]) -> String {
    match choices.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Runs the command line of this process.
pub fn main() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|e| usage_error(e));
    init_logging(&cli);
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` joins the context chain on one line.
            let mut message = format!("{e:#}").replace('\n', " ");
            if let Some(advice) = storage_advice(&e) {
                message.push_str(advice);
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// What to do about a storage failure, where the storage layer cannot say it: it knows
/// neither the commands nor the retries made above it.
pub(crate) fn storage_advice(e: &anyhow::Error) -> Option<&'static str> {
    use repo::storage::StorageError;
    let storage_error =
        e.chain()
            .find_map(|cause| match cause.downcast_ref::<repo::RepoError>() {
                Some(repo::RepoError::Storage(s)) => Some(s),
                _ => cause.downcast_ref::<StorageError>(),
            })?;
    match storage_error {
        s if s.is_retryable() => Some(
            " (retries exhausted: check that the storage endpoint is reachable and try again)",
        ),
        StorageError::NoSpace { .. } => Some(
            " (make room there, or let `pgvault expire` drop what the retention no longer needs and `pgvault gc` free its space, then run the command again)",
        ),
        _ => None,
    }
}

fn init_logging(cli: &Cli) {
    // OpenDAL warns about writers dropped after a failed conditional write: noise for
    // operators, whose error already says what failed.
    let level = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "error",
        (false, 0) => "warn,opendal=error",
        (false, 1) => "info,opendal=error",
        (false, _) => "debug",
    };
    let filter = EnvFilter::try_from_env("PGVAULT_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let ctx = Context::new(&cli.global)?;
    match &cli.command {
        Command::Init(args) => commands::admin::init(&ctx, args)?,
        Command::Key(command) => commands::admin::key(&ctx, command)?,
        Command::Snapshot(command) => commands::snapshot::run(&ctx, command)?,
        Command::Verify(args) => commands::verify::verify_command(&ctx, args)?,
        Command::Gc(args) => commands::admin::gc_command(&ctx, args)?,
        Command::Unlock(args) => commands::admin::unlock(&ctx, args)?,
        Command::RebuildIndex => commands::admin::rebuild_index(&ctx)?,
        Command::Setup(args) => commands::setup::setup(&ctx, args)?,
        Command::Check(args) => commands::setup::check(&ctx, args)?,
        Command::ArchivePush(args) => commands::push::archive_push(&ctx, args)?,
        Command::ArchiveGet(args) => match commands::get::archive_get(&ctx, args)? {
            commands::get::Fetched::Written => {}
            // Quietly: PostgreSQL asks for files that do not exist as part of recovery.
            commands::get::Fetched::Missing => return Ok(ExitCode::from(1)),
        },
        Command::Backup(args) => commands::backup::backup(&ctx, args)?,
        Command::Restore(args) => commands::restore::restore(&ctx, args)?,
        Command::Dump(args) => commands::dump::dump_command(&ctx, args)?,
        Command::Legacy(command) => commands::legacy::legacy_command(&ctx, command)?,
        Command::Info => commands::info::info(&ctx)?,
        Command::Expire(args) => commands::expire::expire(&ctx, args)?,
        Command::Daemon(args) => commands::daemon::daemon(ctx, args)?,
        Command::Repo(cli::RepoCommand::Copy(args)) => commands::copy::repo_copy(&ctx, args)?,
        Command::Cluster(cli::ClusterCommand::Remove(args)) => {
            commands::expire::remove_cluster(&ctx, args)?
        }
        Command::Standby(cli::StandbyCommand::Create(args)) => {
            commands::replication::standby_create(&ctx, args)?
        }
        Command::Replication(cli::ReplicationCommand::Status(args)) => {
            commands::replication::status(&ctx, args)?
        }
        Command::ArchivePushWorker { pg_wal } => commands::push::push_worker(&ctx, pg_wal)?,
        Command::ArchiveGetWorker => commands::get::get_worker(&ctx)?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use repo::storage::StorageError;

    #[test]
    fn storage_failures_get_advice_wherever_they_are_in_the_chain() {
        let full = || StorageError::NoSpace {
            location: "/backups".into(),
            key: "data/2d/2dcc".into(),
        };
        let direct = anyhow::Error::new(full()).context("backing up /pgdata");
        let wrapped = anyhow::Error::new(repo::RepoError::Storage(full())).context("backing up");
        for e in [direct, wrapped] {
            assert!(
                storage_advice(&e).is_some_and(|advice| advice.contains("`pgvault expire`")),
                "{e:#}"
            );
        }
        let transient = anyhow::Error::new(StorageError::Transient {
            location: "s3://b".into(),
            key: "k".into(),
            detail: "timeout".into(),
        });
        assert!(storage_advice(&transient).is_some_and(|a| a.contains("retries exhausted")));
        let missing = anyhow::Error::new(StorageError::NotFound {
            location: "s3://b".into(),
            key: "k".into(),
        });
        assert_eq!(storage_advice(&missing), None);
    }
}
