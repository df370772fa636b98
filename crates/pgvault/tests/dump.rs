//! Logical dumps against real servers: a rich source cluster (several databases, roles
//! with memberships and passwords, contrib extensions, partitioned tables, sequences,
//! views, functions, triggers, large objects, ACLs, comments, per-database settings) is
//! dumped (on 15, and on 12 and 13 for the upgrade to 17), restored into fresh servers of
//! the same and of a newer major version, and compared: `pg_dump --schema-only` of
//! source and target (by the same, newest pg_dump), per-table row counts and checksums,
//! roles. Plus --as, --table, to-file/to-dir,
//! dedup between consecutive dumps, the bad inputs and a dump killed half-way.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testkit::pg::{Cluster, ClusterOptions, PgBin};

mod common;
use common::*;

fn server(major: u32) -> Option<Cluster> {
    match Cluster::start(ClusterOptions {
        major,
        ..ClusterOptions::default()
    }) {
        Ok(cluster) => Some(cluster),
        Err(reason) => {
            testkit::pg::skip_or_panic(&reason);
            None
        }
    }
}

const APP_SCHEMA: &str = r#"
CREATE EXTENSION hstore;
CREATE EXTENSION pg_trgm;
CREATE SCHEMA sales AUTHORIZATION app_owner;
CREATE TABLE sales.orders (id bigserial, placed date NOT NULL, amount numeric(12,2), attrs hstore,
    PRIMARY KEY (id, placed)) PARTITION BY RANGE (placed);
CREATE TABLE sales.orders_2025 PARTITION OF sales.orders FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE sales.orders_2026 PARTITION OF sales.orders FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO sales.orders (placed, amount, attrs)
    SELECT date '2025-01-01' + (g % 700), g * 1.5, hstore('k', g::text) FROM generate_series(1, 5000) g;
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN NEW.note := coalesce(NEW.note, 'touched'); RETURN NEW; END $$;
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, note text);
CREATE TRIGGER customers_touch BEFORE INSERT ON customers FOR EACH ROW EXECUTE FUNCTION touch();
CREATE INDEX customers_name_trgm ON customers USING gin (name gin_trgm_ops);
INSERT INTO customers (name, note) SELECT 'customer ' || g, CASE WHEN g % 2 = 0 THEN md5(g::text) END
    FROM generate_series(1, 3000) g;
CREATE SEQUENCE invoice_no START 1000;
SELECT nextval('invoice_no') FROM generate_series(1, 5);
CREATE VIEW big_orders AS SELECT * FROM sales.orders WHERE amount > 5000;
SELECT lo_from_bytea(0, 'large object payload');
GRANT SELECT ON customers TO reader;
GRANT USAGE ON SCHEMA sales TO reader;
COMMENT ON TABLE customers IS 'people who buy';
"#;

/// Roles, two databases with a rich schema, per-database settings.
fn rich_source(source: &Cluster) {
    source.psql(
        "CREATE ROLE app_owner LOGIN PASSWORD 'owner-secret'; CREATE ROLE reader NOLOGIN; \
         CREATE ROLE alice LOGIN PASSWORD 'alice-secret' IN ROLE reader",
    );
    source.psql("CREATE DATABASE app OWNER app_owner");
    source.psql("CREATE DATABASE \"shop floor\"");
    source.psql("ALTER DATABASE app SET work_mem = '8MB'");
    source.psql_db("app", APP_SCHEMA);
    source.psql_db(
        "shop floor",
        "CREATE TABLE items (sku text PRIMARY KEY, price int); \
         INSERT INTO items SELECT 'sku-' || g, g FROM generate_series(1, 2000) g",
    );
}

/// Per table: row count and a checksum of the rows, in a stable order.
fn data_fingerprint(cluster: &Cluster, database: &str) -> String {
    let tables = cluster.psql_db(
        database,
        "SELECT string_agg(format('%I.%I', table_schema, table_name), ' ' ORDER BY table_schema, table_name) \
         FROM information_schema.tables WHERE table_type = 'BASE TABLE' \
         AND table_schema NOT IN ('pg_catalog', 'information_schema')",
    );
    let mut out = Vec::new();
    for table in tables.split_whitespace() {
        out.push(format!(
            "{table}: {}",
            cluster.psql_db(
                database,
                &format!(
                    "SELECT count(*) || ' ' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '-') FROM {table} t"
                )
            )
        ));
    }
    out.push(format!(
        "large objects: {}",
        cluster.psql_db(
            database,
            "SELECT count(*) || ' ' || coalesce(md5(string_agg(encode(lo_get(oid), 'hex'), ',' ORDER BY oid)), '-') FROM pg_largeobject_metadata"
        )
    ));
    out.join("\n")
}

/// The schema as the newest pg_dump prints it, without the lines that name versions or
/// carry a random key (`\restrict`, PostgreSQL 17.6+/18). View bodies are left out too:
/// the server prints them (PostgreSQL 16 stopped qualifying columns with the table
/// name), so they differ across majors; the views' results are compared instead.
fn schema(cluster: &Cluster, database: &str, pg_dump: &Path) -> String {
    let out = Command::new(pg_dump)
        .args(["--schema-only", "-h", "127.0.0.1", "-U", "postgres", "-p"])
        .arg(cluster.port().to_string())
        .arg(database)
        .output()
        .expect("pg_dump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut in_view = false;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            if l.starts_with("CREATE VIEW") {
                in_view = true;
            }
            if in_view {
                in_view = !l.ends_with(';');
                return l.starts_with("CREATE VIEW");
            }
            !l.starts_with("-- Dumped from")
                && !l.starts_with("-- Dumped by")
                && !l.starts_with("\\restrict")
                && !l.starts_with("\\unrestrict")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn roles(cluster: &Cluster) -> String {
    cluster.psql(
        "SELECT string_agg(rolname || ':' || rolcanlogin || ':' || coalesce(rolpassword, '-'), ' ' ORDER BY rolname) \
         FROM pg_authid WHERE rolname IN ('app_owner', 'reader', 'alice')",
    ) + &cluster.psql(
        "SELECT string_agg(r.rolname || '>' || m.rolname, ' ') FROM pg_auth_members am \
         JOIN pg_roles r ON r.oid = am.roleid JOIN pg_roles m ON m.oid = am.member \
         WHERE m.rolname = 'alice'",
    )
}

fn dump_json(setup: &Setup, source: &Cluster, extra: &[&str]) -> serde_json::Value {
    let conninfo = source.conninfo();
    let mut args = vec!["dump", "--pg-conn", &conninfo, "--output", "json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&setup.ok(&args)).expect("dump JSON")
}

/// Restores the latest dump into `target` with the tools of `newest` and compares it with
/// `source`: schema, data, roles, a view's result, a per-database setting, the owner.
fn restore_like_the_source(setup: &Setup, source: &Cluster, target: &Cluster, newest: &PgBin) {
    let major = target.major();
    setup.ok(&[
        "dump",
        "restore",
        "--target-conn",
        &target.conninfo(),
        "--pg-bin",
        &newest.dir.display().to_string(),
        "--jobs",
        "1",
    ]);
    for db in ["app", "shop floor"] {
        let (want, got) = (
            schema(source, db, &newest.tool("pg_dump")),
            schema(target, db, &newest.tool("pg_dump")),
        );
        if want != got {
            let diff: Vec<String> = want
                .lines()
                .zip(got.lines())
                .filter(|(a, b)| a != b)
                .take(5)
                .map(|(a, b)| format!("-{a}\n+{b}"))
                .collect();
            panic!(
                "schema of {db} differs on PostgreSQL {major}:\n{}",
                diff.join("\n")
            );
        }
        assert_eq!(
            data_fingerprint(source, db),
            data_fingerprint(target, db),
            "{db} on {major}"
        );
    }
    assert_eq!(roles(source), roles(target), "roles on PostgreSQL {major}");
    let view = "SELECT count(*) || ' ' || sum(amount) FROM big_orders";
    assert_eq!(source.psql_db("app", view), target.psql_db("app", view));
    assert_eq!(target.psql_db("app", "SHOW work_mem"), "8MB");
    assert_eq!(
        target.psql_db(
            "app",
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'"
        ),
        "app_owner"
    );
}

/// The upgrade path off the oldest supported majors: a 12 and a 13 cluster dumped (by
/// the newest pg_dump pgvault finds for them) and restored into 17.
#[test]
fn dumps_of_postgresql_12_and_13_restore_into_17() {
    for major in [12, 13] {
        let setup = Setup::local();
        let Some(source) = server(major) else { return };
        rich_source(&source);
        let dump = dump_json(&setup, &source, &[]);
        assert!(
            dump["databases"].to_string().contains("shop floor"),
            "{dump}"
        );
        let Some(target) = server(17) else { return };
        let newest = PgBin::find(17).expect("binaries");
        restore_like_the_source(&setup, &source, &target, &newest);
    }
}

#[test]
fn dump_and_restore_a_rich_cluster_into_the_same_and_a_newer_major() {
    let setup = Setup::local();
    let Some(source) = server(15) else { return };
    rich_source(&source);
    let dump = dump_json(&setup, &source, &[]);
    let databases = dump["databases"].to_string();
    assert!(
        databases.contains("\"app\"")
            && databases.contains("shop floor")
            && databases.contains("postgres"),
        "{dump}"
    );
    assert!(!databases.contains("template0"), "{dump}");
    assert!(dump["stored_bytes"].as_u64() > Some(0));
    let config = dump["config_files"].to_string();
    assert!(
        config.contains("postgresql.conf") && config.contains("pg_hba.conf"),
        "{dump}"
    );

    let list = setup.ok(&["dump", "list"]);
    assert!(list.contains("shop floor"), "{list}");
    let id = dump["id"].as_str().expect("id");
    let show: serde_json::Value = serde_json::from_str(&setup.ok(&[
        "dump",
        "show",
        &id[..10],
        "--database",
        "app",
        "--output",
        "json",
    ]))
    .expect("show JSON");
    let toc = show["toc"].to_string();
    for needle in [
        "customers",
        "orders_2025",
        "big_orders",
        "customers_touch",
        "hstore",
    ] {
        assert!(toc.contains(needle), "{needle} missing from {toc}");
    }

    for major in [15, 17] {
        let Some(target) = server(major) else { return };
        let newest = PgBin::find(major.max(15)).expect("binaries");
        restore_like_the_source(&setup, &source, &target, &newest);

        // Restoring again must not clobber: then --if-exists drop replaces, in parallel.
        let err = setup.fails(&[
            "dump",
            "restore",
            "--database",
            "app",
            "--target-conn",
            &target.conninfo(),
            "--pg-bin",
            &newest.dir.display().to_string(),
        ]);
        assert!(
            err.contains("exists on the target") && err.contains("--if-exists drop"),
            "{err}"
        );
        target.psql_db("app", "DELETE FROM customers WHERE id < 100");
        let out = setup.run(&[
            "dump",
            "restore",
            "--database",
            "app",
            "--if-exists",
            "drop",
            "--jobs",
            "2",
            "--target-conn",
            &target.conninfo(),
            "--pg-bin",
            &newest.dir.display().to_string(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("staging"),
            "parallel restore says it stages"
        );
        assert_eq!(
            data_fingerprint(&source, "app"),
            data_fingerprint(&target, "app")
        );
    }

    // --as beside the original, on the source itself.
    setup.ok(&[
        "dump",
        "restore",
        "--database",
        "app",
        "--as",
        "app_copy",
        "--target-conn",
        &source.conninfo(),
    ]);
    assert_eq!(
        data_fingerprint(&source, "app"),
        data_fingerprint(&source, "app_copy")
    );

    // One table into a database that lost it.
    source.psql_db("app_copy", "DROP TABLE customers CASCADE");
    setup.ok(&[
        "dump",
        "restore",
        "--database",
        "app",
        "--as",
        "app_copy",
        "--table",
        "customers",
        "--target-conn",
        &source.conninfo(),
    ]);
    assert_eq!(
        source.psql_db(
            "app_copy",
            "SELECT count(*) || ' ' || md5(string_agg(c::text, '|' ORDER BY id)) FROM customers c"
        ),
        source.psql_db(
            "app",
            "SELECT count(*) || ' ' || md5(string_agg(c::text, '|' ORDER BY id)) FROM customers c"
        ),
    );

    // Files for manual use.
    let sql = setup.path("all.sql");
    setup.ok(&["dump", "restore", "--to-file", &sql.display().to_string()]);
    let text = std::fs::read_to_string(&sql).expect("sql");
    assert!(
        text.contains("CREATE ROLE alice")
            && text.contains("CREATE DATABASE app")
            && text.contains("COPY public.customers")
    );
    let dir = setup.path("files");
    setup.ok(&["dump", "restore", "--to-dir", &dir.display().to_string()]);
    assert!(
        dir.join("globals.sql").is_file()
            && dir.join("app.dump").is_file()
            && dir.join("shop floor.dump").is_file()
    );
    assert!(dir.join("config").join("pg_hba.conf").is_file());
}

#[test]
fn a_second_dump_stores_only_what_changed() {
    let setup = Setup::local();
    let Some(source) = server(15) else { return };
    source.psql("CREATE DATABASE bench");
    // Data that does not compress to nothing (unlike pgbench's), so that stored bytes
    // measure deduplication rather than compression.
    source.psql_db(
        "bench",
        "CREATE TABLE events (id int PRIMARY KEY, payload text); \
         INSERT INTO events SELECT g, md5(g::text) || md5((g * 3)::text) || md5((g * 7)::text) \
         FROM generate_series(1, 600000) g",
    );
    let first = dump_json(&setup, &source, &["--database", "bench"]);
    source.psql_db(
        "bench",
        "UPDATE events SET payload = 'changed' WHERE id % 100000 = 7",
    );
    source.psql_db("bench", "INSERT INTO events VALUES (0, 'new row')");
    let second = dump_json(&setup, &source, &["--database", "bench"]);
    let (a, b) = (
        first["stored_bytes"].as_u64().expect("stored"),
        second["stored_bytes"].as_u64().expect("stored"),
    );
    let size = second["size_bytes"].as_u64().expect("size");
    eprintln!("first dump stored {a} bytes, second {b} bytes, archive {size} bytes");
    assert!(size > 50_000_000, "a dump big enough to measure: {second}");
    assert!(
        b * 10 < a,
        "the second dump stores under 10% of the first: {first}\n{second}"
    );

    // info lists both; retention applies to dumps too.
    let info: serde_json::Value =
        serde_json::from_str(&setup.ok(&["info", "--output", "json"])).expect("info JSON");
    assert_eq!(
        info["clusters"][0]["dumps"].as_array().map(Vec::len),
        Some(2),
        "{info}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&setup.ok(&["expire", "--keep-last", "1", "--output", "json"]))
            .expect("expire JSON");
    assert_eq!(report["dumps_expired"][0]["id"], first["id"], "{report}");
    let list: serde_json::Value =
        serde_json::from_str(&setup.ok(&["dump", "list", "--output", "json"])).expect("JSON");
    assert_eq!(list["dumps"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["dumps"][0]["id"], second["id"]);
    setup.ok(&["verify"]);
}

#[test]
fn dump_bad_input() {
    let setup = Setup::local();
    let Some(source) = server(15) else { return };
    rich_source(&source);
    let conninfo = source.conninfo();
    let err = setup.fails(&["dump", "--pg-conn", &conninfo, "--database", "nope"]);
    assert!(
        err.contains("\"nope\" does not exist") && err.contains("shop floor"),
        "{err}"
    );
    // A pg_dump older than the server.
    if let Ok(old) = PgBin::find(14) {
        let err = setup.fails(&[
            "dump",
            "--pg-conn",
            &conninfo,
            "--pg-bin",
            &old.dir.display().to_string(),
        ]);
        assert!(
            err.contains("older than the server") && err.contains("--pg-bin"),
            "{err}"
        );
    }
    let missing = setup.path("no-tools");
    std::fs::create_dir_all(&missing).expect("mkdir");
    let err = setup.fails(&[
        "dump",
        "--pg-conn",
        &conninfo,
        "--pg-bin",
        &missing.display().to_string(),
    ]);
    assert!(err.contains("pg_dump not found"), "{err}");
    let err = setup.fails(&["dump", "restore", "--target-conn", &conninfo]);
    assert!(
        err.contains("no dumps") && err.contains("pgvault dump"),
        "{err}"
    );

    dump_json(&setup, &source, &["--database", "app"]);
    let err = setup.fails(&[
        "dump",
        "restore",
        "--dump",
        "abcdef",
        "--target-conn",
        &conninfo,
    ]);
    assert!(err.contains("no dump \"abcdef\""), "{err}");
    let err = setup.fails(&[
        "dump",
        "restore",
        "--database",
        "shop floor",
        "--target-conn",
        &conninfo,
    ]);
    assert!(err.contains("not in this dump"), "{err}");
    let err = setup.fails(&[
        "dump",
        "restore",
        "--database",
        "app",
        "--as",
        "x",
        "--table",
        "nosuch",
        "--target-conn",
        &conninfo,
    ]);
    assert!(
        err.contains("\"nosuch\" is not in the dump") && err.contains("customers"),
        "{err}"
    );
    let err = setup.fails(&[
        "dump",
        "restore",
        "--database",
        "app",
        "--target-conn",
        &conninfo,
    ]);
    assert!(err.contains("exists on the target"), "{err}");
    let before = source.psql_db("app", "SELECT count(*) FROM customers");
    assert_eq!(before, "3000", "the refused restore touched nothing");
    let port = testkit::free_port();
    let err = setup.fails(&[
        "dump",
        "restore",
        "--database",
        "app",
        "--as",
        "y",
        "--target-conn",
        &format!("host=127.0.0.1 port={port} user=postgres connect_timeout=3"),
    ]);
    assert!(err.contains("cannot reach the target server"), "{err}");

    let wrong = setup.path("wrong-passphrase");
    std::fs::write(&wrong, "not the passphrase\n").expect("write");
    let err = setup.fails(&[
        "--passphrase-file",
        &wrong.display().to_string(),
        "dump",
        "list",
    ]);
    assert!(err.contains("passphrase"), "{err}");
}

/// `kill -9` in the middle of a dump: nothing is listed, verify and gc are happy, and
/// the next dump works.
#[test]
fn a_killed_dump_leaves_no_listed_dump() {
    let setup = Setup::local();
    let Some(source) = server(15) else { return };
    source.psql("CREATE DATABASE big");
    source.psql_db(
        "big",
        "CREATE TABLE t AS SELECT g, md5(g::text) || md5((g * 7)::text) AS h FROM generate_series(1, 3000000) g",
    );
    let mut child = setup
        .cmd(&[
            "dump",
            "--pg-conn",
            &source.conninfo(),
            "--database",
            "big",
            "--jobs",
            "1",
        ])
        .spawn()
        .expect("start dump");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the dump should still run"
    );
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let list: serde_json::Value =
        serde_json::from_str(&setup.ok(&["dump", "list", "--output", "json"])).expect("JSON");
    assert_eq!(
        list["dumps"],
        serde_json::json!([]),
        "a killed dump is not listed"
    );
    setup.ok(&["unlock"]);
    setup.ok(&["verify"]);
    setup.ok(&["gc"]);
    let dump = dump_json(&setup, &source, &["--database", "big"]);
    assert_eq!(dump["databases"], serde_json::json!(["big"]));
    setup.ok(&["verify"]);
}
