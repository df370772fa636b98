//! Legacy restore: fixtures made the way old backup managers made them — a real
//! `pg_dumpall` of a real server, `gzip`, `openssl enc`, `split` into numbered parts (at
//! least 10, to prove numeric ordering) plus a JSON metadata file — in a local directory
//! and on the loopback S3 server; restored into fresh servers and compared with the
//! source; imported as dumps; and every bad input refused before anything is replayed.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use testkit::pg::{Cluster, ClusterOptions};

mod common;
use common::*;

const SECRET: &str = "s3cr3t legacy pass";

fn server() -> Option<Cluster> {
    match Cluster::start(ClusterOptions::default()) {
        Ok(cluster) => Some(cluster),
        Err(reason) => {
            testkit::pg::skip_or_panic(&reason);
            None
        }
    }
}

fn sh(script: &str) -> Vec<u8> {
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .stderr(Stdio::piped())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn source_cluster() -> Option<Cluster> {
    let source = server()?;
    source.psql("CREATE ROLE alice LOGIN PASSWORD 'alice-pw'");
    source.psql("CREATE DATABASE app OWNER alice");
    source.psql("CREATE DATABASE crm");
    source.psql_db(
        "app",
        "CREATE TABLE orders (id int PRIMARY KEY, item text, qty int); \
         INSERT INTO orders SELECT g, md5(g::text), g % 7 FROM generate_series(1, 20000) g; \
         CREATE VIEW big AS SELECT * FROM orders WHERE qty > 5",
    );
    source.psql_db(
        "crm",
        "CREATE TABLE contacts AS SELECT g AS id, 'c' || g AS name FROM generate_series(1, 500) g",
    );
    Some(source)
}

fn fingerprint(cluster: &Cluster, database: &str) -> String {
    cluster.psql_db(
        database,
        "SELECT count(*) || ' ' || md5(string_agg(o::text, '|' ORDER BY id)) FROM orders o",
    )
}

/// One backup as a backup manager wrote it: `pg_dumpall | [gzip |] openssl enc <args>`,
/// split into `parts` numbered objects (from `first_index`), or one object when
/// `parts` is 1; plus `<id>.json`. Returns (object name, bytes) and the plain SQL.
fn backup_objects(
    source: &Cluster,
    work: &Path,
    id: &str,
    openssl_args: &str,
    gzip: bool,
    parts: usize,
    first_index: usize,
) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    let dir = work.join(id);
    fs::create_dir_all(&dir).expect("mkdir");
    let dumpall = source.bin().tool("pg_dumpall");
    let sql = dir.join("all.sql");
    sh(&format!(
        "{} -h 127.0.0.1 -p {} -U postgres > {}",
        dumpall.display(),
        source.port(),
        sql.display()
    ));
    let compress = if gzip { "gzip -c" } else { "cat" };
    let encrypted = dir.join("all.enc");
    sh(&format!(
        "{compress} {} | openssl enc -aes256 {openssl_args} -pass pass:'{SECRET}' > {}",
        sql.display(),
        encrypted.display()
    ));
    let mut objects = Vec::new();
    let size = fs::metadata(&encrypted).expect("size").len() as usize;
    if parts == 1 {
        objects.push((id.to_string(), fs::read(&encrypted).expect("read")));
    } else {
        let part_size = size.div_ceil(parts);
        sh(&format!(
            "cd {} && split -b {part_size} -d -a 4 all.enc piece.",
            dir.display()
        ));
        let mut pieces: Vec<_> = fs::read_dir(&dir)
            .expect("ls")
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("piece."))
            })
            .collect();
        pieces.sort();
        assert!(pieces.len() >= parts.min(10), "{} pieces", pieces.len());
        for (i, piece) in pieces.iter().enumerate() {
            objects.push((
                format!("{id}-{}", i + first_index),
                fs::read(piece).expect("read"),
            ));
        }
    }
    objects.push((
        format!("{id}.json"),
        format!("{{\"id\": \"{id}\", \"size\": {size}, \"compression\": \"gzip\"}}").into_bytes(),
    ));
    (objects, fs::read(&sql).expect("sql"))
}

fn write_all(dir: &Path, objects: &[(String, Vec<u8>)]) {
    fs::create_dir_all(dir).expect("mkdir");
    for (name, data) in objects {
        fs::write(dir.join(name), data).expect("write object");
    }
}

#[test]
fn the_newest_backup_is_restored_from_a_directory_and_from_s3() {
    let setup = Setup::local();
    let Some(source) = source_cluster() else {
        return;
    };
    let work = setup.path("fixtures");
    let secret = setup.path("secret");
    fs::write(&secret, format!("{SECRET}\n")).expect("secret");
    let secret = secret.display().to_string();

    // An older backup (one object, sha256), then a newer one in 12 parts from 1 (md5).
    let (older, _) = backup_objects(
        &source,
        &work,
        "pg1-20260101T020000",
        "-md sha256",
        true,
        1,
        1,
    );
    source.psql_db("app", "INSERT INTO orders VALUES (0, 'newest', 1)");
    let (newer, newer_sql) = backup_objects(
        &source,
        &work,
        "pg1-20260102T020000",
        "-md md5",
        true,
        12,
        1,
    );
    let (pbkdf2, pbkdf2_sql) = backup_objects(
        &source,
        &work,
        "pg1-20251231T020000",
        "-pbkdf2 -iter 1000",
        false,
        11,
        0,
    );
    let dir = setup.path("bucket-dir");
    write_all(&dir, &older);
    write_all(&dir, &newer);
    write_all(&dir, &pbkdf2);
    fs::write(dir.join("other-20260103T020000.json"), "{}").expect("another instance");
    let source_dir = dir.display().to_string();

    let list: serde_json::Value = serde_json::from_str(&setup.ok(&[
        "legacy",
        "list",
        "--source",
        &source_dir,
        "--instance",
        "pg1",
        "--output",
        "json",
    ]))
    .expect("JSON");
    let backups = list["backups"].as_array().expect("backups");
    assert_eq!(backups.len(), 3, "{list}");
    assert_eq!(backups[2]["id"], "pg1-20260102T020000");
    assert_eq!(backups[2]["parts"], 12);
    assert_eq!(backups[2]["contiguous"], true);

    // Replay the newest into a fresh server, renaming app.
    let Some(target) = server() else { return };
    let report: serde_json::Value = serde_json::from_str(&setup.ok(&[
        "legacy",
        "restore",
        "--source",
        &source_dir,
        "--instance",
        "pg1",
        "--secret-file",
        &secret,
        "--target-conn",
        &target.conninfo(),
        "--rename",
        "app=app_restored",
        "--output",
        "json",
    ]))
    .expect("JSON");
    assert_eq!(report["backup"], "pg1-20260102T020000");
    assert_eq!(report["key_derivation"], "-md md5");
    assert!(
        report["expected_and_skipped"]
            .to_string()
            .contains("CREATE ROLE postgres"),
        "{report}"
    );
    assert_eq!(
        fingerprint(&source, "app"),
        fingerprint(&target, "app_restored")
    );
    assert_eq!(
        target.psql("SELECT count(*) FROM pg_database WHERE datname = 'app'"),
        "0"
    );
    assert_eq!(
        target.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'"),
        source.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'")
    );
    assert_eq!(
        target.psql_db("crm", "SELECT count(*) FROM contacts"),
        "500"
    );
    // --rename onto an existing database needs --replace.
    let err = setup.fails(&[
        "legacy",
        "restore",
        "--source",
        &source_dir,
        "--instance",
        "pg1",
        "--secret-file",
        &secret,
        "--target-conn",
        &target.conninfo(),
        "--rename",
        "crm=app_restored",
    ]);
    assert!(
        err.contains("already exists") || err.contains("--replace"),
        "{err}"
    );

    // The same from S3, to a file: byte-identical to pg_dumpall's output.
    if let Some(moto) = testkit::s3::moto() {
        moto.create_bucket("legacy").expect("bucket");
        for (name, data) in newer.iter().chain(&older) {
            moto.put_object("legacy", &format!("backups/{name}"), data)
                .expect("upload");
        }
        let out_file = setup.path("from-s3.sql");
        let out = setup
            .cmd(&[
                "legacy",
                "restore",
                "--source",
                "s3://legacy/backups",
                "--source-endpoint",
                &moto.endpoint(),
                "--instance",
                "pg1",
                "--secret-file",
                &secret,
                "--to-file",
                &out_file.display().to_string(),
            ])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            fs::read(&out_file).expect("sql") == newer_sql,
            "S3 restore differs from pg_dumpall"
        );
    } else {
        assert!(!testkit::in_ci(), "S3 server missing under CI");
    }

    // Newer OpenSSL defaults, plain SQL without gzip: -pbkdf2 -iter 1000.
    let out_file = setup.path("pbkdf2.sql");
    setup.ok(&[
        "legacy",
        "restore",
        "--source",
        &source_dir,
        "--instance",
        "pg1",
        "--backup",
        "pg1-20251231T020000",
        "--secret-file",
        &secret,
        "--iter",
        "1000",
        "--to-file",
        &out_file.display().to_string(),
    ]);
    assert!(fs::read(&out_file).expect("sql") == pbkdf2_sql);

    // Import as a dump, then restore it like any other.
    let imported: serde_json::Value = serde_json::from_str(&setup.ok(&[
        "legacy",
        "import",
        "--source",
        &source_dir,
        "--instance",
        "pg1",
        "--secret-file",
        &secret,
        "--output",
        "json",
    ]))
    .expect("JSON");
    assert!(
        imported["databases"].to_string().contains("app"),
        "{imported}"
    );
    let Some(again) = server() else { return };
    setup.ok(&["dump", "restore", "--target-conn", &again.conninfo()]);
    assert_eq!(fingerprint(&source, "app"), fingerprint(&again, "app"));
    let err = setup.fails(&[
        "dump",
        "restore",
        "--database",
        "app",
        "--target-conn",
        &again.conninfo(),
    ]);
    assert!(err.contains("imported pg_dumpall script"), "{err}");
    setup.ok(&["verify"]);
}

#[test]
fn legacy_bad_input_is_refused_before_anything_is_replayed() {
    let setup = Setup::local();
    let Some(source) = source_cluster() else {
        return;
    };
    let work = setup.path("fixtures");
    let secret = setup.path("secret");
    fs::write(&secret, format!("{SECRET}\n")).expect("secret");
    let wrong = setup.path("wrong");
    fs::write(&wrong, "not it\n").expect("secret");
    let (objects, _) = backup_objects(
        &source,
        &work,
        "pg1-20260102T020000",
        "-md md5",
        true,
        10,
        1,
    );
    let dir = setup.path("objects");
    write_all(&dir, &objects);
    let source_dir = dir.display().to_string();
    let Some(target) = server() else { return };
    let conninfo = target.conninfo();
    let restore = |extra: &[&str], secret: &Path| -> String {
        let secret = secret.display().to_string();
        let mut args = vec![
            "legacy",
            "restore",
            "--source",
            &source_dir,
            "--instance",
            "pg1",
            "--secret-file",
            &secret,
            "--target-conn",
            &conninfo,
        ];
        args.extend_from_slice(extra);
        setup.fails(&args)
    };
    let untouched = || {
        assert_eq!(
            target.psql("SELECT count(*) FROM pg_database WHERE datname IN ('app', 'crm')"),
            "0",
            "nothing may be restored"
        );
    };

    let err = restore(&[], &wrong);
    assert!(err.contains("wrong secret"), "{err}");
    untouched();
    let err = restore(&["--backup", "pg1-nope"], &secret);
    assert!(
        err.contains("no backup \"pg1-nope\"") && err.contains("pg1-20260102T020000"),
        "{err}"
    );
    let err = setup.fails(&[
        "legacy",
        "list",
        "--source",
        &source_dir,
        "--instance",
        "nobody",
    ]);
    assert!(err.contains("no backups of instance \"nobody\""), "{err}");

    // A truncated last part.
    let last = dir.join("pg1-20260102T020000-10");
    let data = fs::read(&last).expect("read");
    fs::write(&last, &data[..data.len() - 3]).expect("truncate");
    let err = restore(&[], &secret);
    assert!(err.contains("truncated") && err.contains("-10"), "{err}");
    fs::write(&last, &data).expect("restore the part");

    // A missing part in the middle is named before anything happens.
    let fifth = dir.join("pg1-20260102T020000-5");
    let saved = fs::read(&fifth).expect("read");
    fs::remove_file(&fifth).expect("remove");
    let err = restore(&[], &secret);
    assert!(
        err.contains("missing part(s) pg1-20260102T020000-5"),
        "{err}"
    );
    let listing = setup.ok(&[
        "legacy",
        "list",
        "--source",
        &source_dir,
        "--instance",
        "pg1",
    ]);
    assert!(listing.contains("missing -5"), "{listing}");
    fs::write(&fifth, saved).expect("put back");
    untouched();

    // Data that was never encrypted.
    let plain_dir = setup.path("plain");
    fs::create_dir_all(&plain_dir).expect("mkdir");
    fs::write(plain_dir.join("pg2-20260101T000000.json"), "{}").expect("json");
    let gz = sh("echo 'SELECT 1;' | gzip -c");
    fs::write(
        plain_dir.join("pg2-20260101T000000"),
        [gz.clone(), vec![0; 32 - gz.len() % 16]].concat(),
    )
    .expect("data");
    let err = setup.fails(&[
        "legacy",
        "restore",
        "--source",
        &plain_dir.display().to_string(),
        "--instance",
        "pg2",
        "--secret-file",
        &secret.display().to_string(),
        "--to-file",
        &setup.path("x.sql").display().to_string(),
    ]);
    assert!(err.contains("Salted__"), "{err}");
    untouched();

    // A damaged byte in the middle: gzip notices, psql stops, and says why.
    let third = dir.join("pg1-20260102T020000-3");
    let mut bytes = fs::read(&third).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    fs::write(&third, bytes).expect("damage");
    let err = restore(&[], &secret);
    assert!(
        err.contains("damaged part") || err.contains("SQL error"),
        "{err}"
    );
}
