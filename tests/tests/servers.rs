//! `faultbox test` against real servers from Debian packages, started as
//! binary-mode services on free ports with their data in scratch
//! directories: PostgreSQL (run as the `postgres` account through
//! `user=`) and Redis.
//!
//! scripts/setup installs both; a missing server fails these tests with a
//! message saying so rather than skipping them.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::{Scratch, faultbox, finish};

fn postgres_bin() -> String {
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (run scripts/setup)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    found.sort();
    found
        .pop()
        .expect("no /usr/lib/postgresql/*/bin/postgres (run scripts/setup)")
        .to_string_lossy()
        .into_owned()
}

/// Runs `faultbox test` on `text` (written to `dir/spec.star`) with JSON
/// on stdout; returns the exit code, the document and stderr.
fn run(dir: &Scratch, text: &str) -> (i32, Value, String) {
    let path = dir.path("spec.star");
    std::fs::write(&path, text).expect("write spec");
    let out = Command::new("timeout")
        .args(["-k", "5", "180"])
        .arg(faultbox())
        .args(["test", &path, "--format", "json"])
        .output()
        .expect("run faultbox");
    let run = finish(out);
    let doc = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}\n{}", run.stdout, run.stderr));
    (run.code, doc, run.stderr)
}

fn test_of<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["tests"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {doc:#}"))
}

/// A fresh cluster in `dir/pg`, owned by the postgres account.
fn initdb(dir: &Scratch) -> String {
    let data = dir.path("pg/data");
    let pg = dir.path("pg");
    std::fs::create_dir_all(&pg).expect("pg dir");
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres", &pg])
        .status()
        .expect("chown");
    assert!(status.success());
    // The scratch dir's parents must be traversable by postgres.
    let _ = Command::new("chmod")
        .args(["o+x", &dir.0.to_string_lossy()])
        .status();
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(Path::new(&postgres_bin()).join("initdb"))
        .args(["-D", &data, "--auth=trust", "-U", "postgres", "--no-sync"])
        .output()
        .expect("initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    data
}

#[test]
fn postgres_panics_when_its_wal_fsync_fails_and_faultbox_reports_it() {
    let dir = Scratch::new("pg");
    let data = initdb(&dir);
    let text = format!(
        r#"
load("@faultbox/recipes/postgres.star", "postgres")

port = free_port()
db = service(
    "db",
    "{bin}/postgres",
    interface("main", "postgres", port),
    args = ["-D", "{data}", "-p", str(port), "-k", "{sock}", "-c", "listen_addresses=127.0.0.1"],
    user = "postgres",
    healthcheck = ready(timeout = "30s"),
    ops = {{"wal_sync": op(syscalls = ["fsync"], path = "**/pg_wal/**")}},
)

def test_disk_full_on_insert():
    assert_true(db.main.exec(sql = "CREATE TABLE IF NOT EXISTS items (id int)").ok)
    r = fault(
        db.main,
        postgres.disk_full(query = "insert into items*"),
        run = lambda: db.main.exec(sql = "INSERT INTO items VALUES ($1)".replace("$1", "7")),
    )
    assert_true(r.error.startswith("53100: could not extend file"), r.error)
    deadlock = fault(db.main, error(query = "UPDATE*", code = "40P01", message = "deadlock detected"), run = lambda: db.main.exec(sql = "update items set id = 9"))
    assert_eq(deadlock.error, "40P01: deadlock detected")
    # The session is still usable, and the row never reached the server.
    assert_eq(db.main.query(sql = "SELECT count(*) AS n FROM items WHERE id = 7").data, [{{"n": "0"}}])
    assert_true(db.main.exec(sql = "INSERT INTO items VALUES (8)").ok, "other statements pass")

def test_whoami():
    rows = db.main.query(sql = "SELECT current_user AS u, pg_backend_pid() > 0 AS ok")
    assert_true(rows.ok, rows.error)
    assert_eq(rows.data, [{{"u": "postgres", "ok": "t"}}])

def test_wal_fsync_eio():
    assert_true(db.main.exec(sql = "CREATE TABLE t (id int)").ok)
    r = fault(db, wal_sync = deny("EIO"), run = lambda: db.main.exec(sql = "INSERT INTO t VALUES (1)"))
    # PostgreSQL must not report a commit it could not make durable: it
    # PANICs, the session dies, and the server goes into crash recovery.
    assert_true(not r.ok, "the INSERT must fail")
    assert_eventually(service = "db", op = "wal_sync", decision = "deny(input/output error)")
    after = db.main.query(sql = "SELECT 1")
    assert_true(not after.ok, "right after the PANIC the server is recovering")
    return r.error
"#,
        bin = postgres_bin(),
        sock = dir.path("pg"),
    );
    let (code, doc, stderr) = run(&dir, &text);
    assert_eq!(code, 0, "{stderr}");
    let disk = test_of(&doc, "test_disk_full_on_insert");
    assert_eq!(disk["result"], "pass", "{disk:#}");
    assert_eq!(disk["faults"][0]["interface"], "main");
    assert_eq!(disk["faults"][0]["hits"], 1);
    let who = test_of(&doc, "test_whoami");
    assert_eq!(who["result"], "pass", "{who:#}");
    let t = test_of(&doc, "test_wal_fsync_eio");
    assert_eq!(t["result"], "pass", "{t:#}");
    assert_eq!(t["faults"][0]["syscall"], "wal_sync");
    assert_eq!(t["faults"][0]["hits"], 1);
    let denied: Vec<&Value> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["fields"]["decision"] == "deny(input/output error)")
        .collect();
    assert_eq!(denied.len(), 1);
    assert!(
        denied[0]["fields"]["path"]
            .as_str()
            .is_some_and(|p| p.contains("/pg_wal/")),
        "{:#}",
        denied[0]
    );
    assert!(
        matches!(
            denied[0]["fields"]["syscall"].as_str(),
            Some("fdatasync" | "fsync")
        ),
        "{:#}",
        denied[0]
    );
    // What the client saw: the server's PANIC or the dropped connection.
    let seen = t["return_value"].as_str().unwrap_or_default();
    assert!(
        seen.contains("could not fdatasync") || seen.contains("closed the connection"),
        "{seen}"
    );
}

/// With `appendfsync always`, Redis exits on the first AOF error: the
/// fault that killed it must still count (its counters come with the
/// shim's last words, not from a barrier the dead target cannot answer).
#[test]
fn a_fault_that_makes_its_target_exit_is_still_counted() {
    let dir = Scratch::new("redis-exit");
    let text = format!(
        r#"
port = free_port()
redis = service(
    "redis",
    "/usr/bin/redis-server",
    interface("main", "redis", port),
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", "{data}",
            "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
    healthcheck = tcp("localhost:%d" % port),
    ops = {{"aof": op(syscalls = ["write"], path = "**/appendonlydir/*")}},
)

def test_aof_error_kills_redis():
    fault(redis, aof = deny("EIO"), run = lambda: redis.main.command("SET", "b", "2"))
    assert_eventually(type = "service_exited", service = "redis")
"#,
        data = dir.path("data"),
    );
    let (code, doc, stderr) = run(&dir, &text);
    assert_eq!(code, 0, "{stderr}");
    let t = test_of(&doc, "test_aof_error_kills_redis");
    assert_eq!(t["faults"][0]["hits"], 1, "{:#}", t["faults"]);
    let codes: Vec<&str> = t["diagnostics"]
        .as_array()
        .map(|d| d.iter().filter_map(|x| x["code"].as_str()).collect())
        .unwrap_or_default();
    assert!(!codes.contains(&"FAULT_NOT_FIRED"), "{codes:?}");
}

#[test]
fn redis_refuses_writes_while_its_append_only_file_cannot_be_written() {
    let dir = Scratch::new("redis");
    let text = format!(
        r#"
port = free_port()
redis = service(
    "redis",
    "/usr/bin/redis-server",
    interface("main", "tcp", port),
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", "{data}",
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
    healthcheck = tcp("localhost:%d" % port),
    ops = {{"aof": op(syscalls = ["write"], path = "**/appendonlydir/*")}},
)

def test_aof_enospc():
    assert_eq(redis.main.send(data = "SET a 1"), "+OK")
    def during():
        # The first write is acknowledged before its AOF flush fails;
        # from then on Redis refuses writes but still serves reads.
        return [redis.main.send(data = "SET b 2"), redis.main.send(data = "SET c 3"), redis.main.send(data = "GET a")]
    got = fault(redis, aof = deny("ENOSPC"), run = during)
    assert_eq(got[0], "+OK")
    assert_eq(got[1], "-MISCONF Errors writing to the AOF file: No space left on device")
    assert_eq(got[2], "$1")
    # Once the disk has room again, Redis writes its AOF and accepts writes.
    assert_eq(redis.main.send(data = "SET d 4"), "+OK")
"#,
        data = dir.path("data"),
    );
    let (code, doc, stderr) = run(&dir, &text);
    assert_eq!(code, 0, "{stderr}");
    let t = test_of(&doc, "test_aof_enospc");
    assert!(t["faults"][0]["hits"].as_u64().unwrap_or(0) >= 1, "{t:#}");
    let paths: Vec<&str> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["fields"]["op"] == "aof")
        .filter_map(|e| e["fields"]["path"].as_str())
        .collect();
    assert!(
        !paths.is_empty() && paths.iter().all(|p| p.contains("/appendonlydir/")),
        "{paths:?}"
    );
}

#[test]
fn redis_protocol_faults_answer_chosen_commands_for_the_server() {
    let dir = Scratch::new("redis-proxy");
    let text = format!(
        r#"
port = free_port()
redis = service(
    "redis",
    "/usr/bin/redis-server",
    interface("main", "redis", port),
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", "{data}", "--save", ""],
    healthcheck = tcp("localhost:%d" % port),
)

load("@faultbox/recipes/redis.star", recipes = "redis")

OOM = "OOM command not allowed when used memory > 'maxmemory'."

def test_oom_on_writes_only():
    assert_eq(redis.main.send(data = "SET a 1"), "+OK")
    def during():
        return [redis.main.send(data = "SET b 2"), redis.main.send(data = "GET a"), redis.main.send(data = "DEL a")]
    got = fault(redis.main, recipes.oom(command = "SET"), error(command = "DEL", key = "other"), run = during)
    assert_eq(got, ["-" + OOM, "$1", ":1"])
    assert_eq(redis.main.send(data = "GET b"), "$-1", "the refused SET never reached the server")

def test_duplicated_command_runs_twice_on_the_server():
    got = fault(redis.main, duplicate(command = "INCR"), run = lambda: redis.main.send(data = "INCR hits"))
    assert_eq(got, ":1", "the client sees one answer")
    # The copy travels on a connection of its own; read until it landed.
    seen = [redis.main.send(data = "INCRBY hits 0") for _ in range(200)]
    assert_eq(seen[-1], ":2", "the server ran INCR twice")

def test_cache_miss():
    redis.main.send(data = "SET user:1 alice")
    got = fault(redis.main, response(command = "get", key = "user:*"), run = lambda: redis.main.send(data = "GET user:1"))
    assert_eq(got, "$-1")
    assert_eq(redis.main.send(data = "GET user:1"), "$5")
"#,
        data = dir.path("data"),
    );
    let (code, doc, stderr) = run(&dir, &text);
    assert_eq!(code, 0, "{stderr}");
    let t = test_of(&doc, "test_oom_on_writes_only");
    let hits = support::hits(t);
    assert_eq!(hits, [1, 0], "{t:#}");
    assert_eq!(t["faults"][0]["syscall"], "SET");
    assert!(
        t["diagnostics"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x["code"] == "FAULT_NOT_FIRED")),
        "{t:#}"
    );
}

#[test]
fn redis_steps_speak_resp_through_the_proxy_and_see_injected_errors() {
    let dir = Scratch::new("redis-steps");
    let text = format!(
        r#"
port = free_port()
cache = service(
    "cache",
    "/usr/bin/redis-server",
    interface("main", "redis", port),
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", "{data}", "--save", ""],
    healthcheck = ready(),
)

def test_steps():
    assert_eq(cache.main.ping().data, "PONG")
    assert_true(cache.main.set(key = "k", value = "v", ex = 60).ok)
    assert_eq(cache.main.get(key = "k").data, "v")
    # The leading required arguments may be positional, as the docs write them.
    assert_true(cache.main.set("p", "q").ok)
    assert_eq(cache.main.get("p").data, "q")
    assert_eq(cache.main.get(key = "missing").data, None)
    assert_eq(cache.main.incr(key = "n").data, 1)
    assert_eq(cache.main.rpush(key = "l", value = "a").data, 1)
    assert_eq(cache.main.lpush(key = "l", value = "b").data, 2)
    assert_eq(cache.main.lrange(key = "l", start = 0, stop = -1).data, ["b", "a"])
    assert_eq(cache.main.command("TTL", "k").data, 60)
    wrong = cache.main.incr(key = "k")
    assert_true(not wrong.ok)
    assert_true(wrong.error.startswith("ERR value is not an integer"), wrong.error)
    assert_eq(cache.main.delete(key = "k").data, 1)
    assert_eq(getattr(cache.main, "del")(key = "k").data, 0)

def test_injected_error_and_a_rule_that_must_not_fire():
    def during():
        return [cache.main.set(key = "a", value = "1"), cache.main.get(key = "b")]
    got = fault(cache.main, error(command = "SET", message = "READONLY You can't write against a read only replica."), error(command = "GET", key = "other"), run = during)
    assert_true(not got[0].ok)
    assert_eq(got[0].error, "READONLY You can't write against a read only replica.")
    assert_true(got[1].ok, "GET b does not match key=other")
    assert_eq(cache.main.get(key = "a").data, None, "the refused SET never reached the server")
    assert_true(cache.main.set(key = "a", value = "2").ok, "the connection and the server are fine after")
"#,
        data = dir.path("data"),
    );
    std::fs::create_dir_all(dir.path("data")).expect("data dir");
    let (code, doc, stderr) = run(&dir, &text);
    assert_eq!(code, 0, "{stderr}\n{doc:#}");
    let t = test_of(&doc, "test_injected_error_and_a_rule_that_must_not_fire");
    let hits = support::hits(t);
    assert_eq!(hits, [1, 0], "{t:#}");
    let sent: Vec<&str> = test_of(&doc, "test_steps")["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "step_send")
        .filter_map(|e| e["fields"]["data"].as_str())
        .collect();
    assert!(sent.contains(&"SET k v EX 60"), "{sent:?}");
}

fn memcached() -> &'static str {
    let bin = "/usr/bin/memcached";
    assert!(
        Path::new(bin).exists(),
        "memcached is not installed (run scripts/setup)"
    );
    bin
}

#[test]
fn memcached_faults_answer_with_its_own_error_lines_and_the_connection_lives_on() {
    let dir = Scratch::new("memcached");
    let text = format!(
        r#"
load("@faultbox/recipes/memcached.star", mc = "memcached")
port = free_port()
cache = service(
    "cache",
    "{bin}",
    interface("main", "memcached", port),
    args = ["-p", str(port), "-l", "127.0.0.1", "-U", "0", "-u", "root"],
    healthcheck = ready(),
)

def test_steps():
    assert_eq(cache.main.set(key = "k", value = "v", ttl = 60).data, "STORED")
    assert_eq(cache.main.get(key = "k").data, "v")
    assert_eq(cache.main.get(key = "missing").data, None)
    assert_eq(cache.main.set(key = "n", value = "5").data, "STORED")
    assert_eq(cache.main.incr(key = "n", by = 3).data, 8)
    assert_eq(cache.main.delete(key = "k").data, "DELETED")
    assert_eq(cache.main.delete(key = "k").data, "NOT_FOUND")

def test_faults():
    cache.main.set(key = "user:1", value = "alice")
    def during():
        return [
            cache.main.get(key = "user:1"),
            cache.main.set(key = "other", value = "x"),
            cache.main.get(key = "session:9"),
        ]
    got = fault(cache.main, mc.out_of_memory(command = "set"), response(command = "get", key = "session:*", value = "forged"), error(command = "delete"), run = during)
    assert_eq(got[0].data, "alice", "get user:1 matches no rule")
    assert_true(not got[1].ok)
    assert_eq(got[1].error, "SERVER_ERROR out of memory storing object")
    assert_eq(got[2].data, "forged")
    assert_eq(cache.main.get(key = "other").data, None, "the refused set never reached the server")
    assert_eq(cache.main.get(key = "user:1").data, "alice", "the server is fine after the window")
"#,
        bin = memcached(),
    );
    let (code, doc, stderr) = run(&dir, &text);
    assert_eq!(code, 0, "{stderr}\n{doc:#}");
    let t = test_of(&doc, "test_faults");
    let hits = support::hits(t);
    assert_eq!(hits, [1, 1, 0], "{t:#}");
}

#[test]
fn memcached_over_tls_ready_steps_and_a_verifying_client_all_pass_through_faultbox() {
    let dir = Scratch::new("memcached-tls");
    let (cert, key) = support::server_cert(&dir, "server");
    // memcached -Z speaks nothing but TLS: ready(), the steps and the
    // proxy's upstream leg can only pass by speaking it.
    let text = format!(
        r#"
port = free_port()
db = service(
    "cache",
    "{bin}",
    interface("main", "memcached", port, tls = tls_cert(ca = "{cert}")),
    args = ["-p", str(port), "-l", "127.0.0.1", "-U", "0", "-u", "root",
            "-Z", "-o", "ssl_chain_cert={cert},ssl_key={key}"],
    healthcheck = ready(),
)

{client}
def test_tls_both_legs():
    assert_eq(db.main.set(key = "k", value = "tls").data, "STORED")
    assert_eq(sh("get k"), "exit 0: VALUE k 0 3 | tls | END")
    refused = fault(db.main, error(command = "get", message = "busy"), run = lambda: sh("get k"))
    assert_eq(refused, "exit 0: SERVER_ERROR busy")
    assert_eq(db.main.get(key = "k").data, "tls")
"#,
        bin = memcached(),
        client = sql_client(
            r#"printf '%s\\r\\nquit\\r\\n' \"$ARG\" | openssl s_client -connect 127.0.0.1:$DB_PORT -CAfile $FAULTBOX_CA_FILE -verify_return_error -quiet 2>/dev/null"#
        ),
    );
    let (code, doc, stderr) = run(&dir, &text);
    assert_eq!(code, 0, "{stderr}\n{doc:#}");
    let t = test_of(&doc, "test_tls_both_legs");
    assert_eq!(t["faults"][0]["hits"], 1, "{t:#}");

    // A client that trusts memcached's own certificate, not Faultbox's CA,
    // is refused by the front: the check is real.
    let wrong = text.replace("-CAfile $FAULTBOX_CA_FILE", &format!("-CAfile {cert}"));
    let wrong = wrong.replace(
        r#"    assert_eq(sh("get k"), "exit 0: VALUE k 0 3 | tls | END")"#,
        r#"    bad = sh("get k")
    assert_true(not bad.startswith("exit 0: VALUE"), bad)
    return bad"#,
    );
    let (code, doc, stderr) = run(&dir, &wrong);
    assert_eq!(code, 0, "{stderr}\n{doc:#}");
    let seen = &test_of(&doc, "test_tls_both_legs")["return_value"];
    assert!(
        seen.as_str().is_some_and(|r| !r.contains("VALUE")),
        "{seen}"
    );
}

/// A fresh MariaDB data directory in `dir/mysql`, owned by mysql.
fn install_mariadb(dir: &Scratch) -> String {
    let data = dir.path("mysql");
    let out = Command::new("mariadb-install-db")
        .args([
            "--no-defaults",
            &format!("--datadir={data}"),
            "--user=mysql",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ])
        .output()
        .expect("mariadb-install-db (run scripts/setup)");
    assert!(
        out.status.success(),
        "mariadb-install-db failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = Command::new("chown")
        .args(["-R", "mysql:mysql", &data])
        .status();
    let _ = Command::new("chmod")
        .args(["o+x", &dir.0.to_string_lossy()])
        .status();
    data
}

#[test]
fn mariadb_errors_injected_on_matching_statements_leave_the_session_usable() {
    let dir = Scratch::new("mariadb");
    let data = install_mariadb(&dir);
    let text = format!(
        r#"
load("@faultbox/recipes/mysql.star", "mysql")

port = free_port()
db = service(
    "db",
    "/usr/sbin/mariadbd",
    interface("main", "mysql", port),
    args = ["--no-defaults", "--datadir={data}", "--port=%d" % port, "--bind-address=127.0.0.1",
            "--socket={data}/mysqld.sock", "--skip-grant-tables", "--skip-log-bin"],
    user = "mysql",
    healthcheck = ready(timeout = "60s"),
)

def test_table_full():
    assert_true(db.main.exec(sql = "CREATE DATABASE IF NOT EXISTS shop").ok)
    assert_true(db.main.exec(sql = "CREATE TABLE IF NOT EXISTS shop.items (id INT)").ok)
    r = fault(
        db.main,
        error(query = "insert into shop.items*", code = "HY000", message = "The table 'items' is full"),
        run = lambda: db.main.exec(sql = "INSERT INTO shop.items VALUES (1)"),
    )
    assert_eq(r.error, "1105 (HY000): The table 'items' is full")
    d = fault(db.main, mysql.deadlock(query = "update shop.items*"), run = lambda: db.main.exec(sql = "UPDATE shop.items SET id = 3"))
    assert_eq(d.error, "1213 (40001): Deadlock found when trying to get lock; try restarting transaction")
    assert_eq(db.main.query(sql = "SELECT COUNT(*) AS n FROM shop.items").data, [{{"n": "0"}}])
    assert_true(db.main.exec(sql = "INSERT INTO shop.items VALUES (2)").ok, "other statements pass")
"#
    );
    let (code, doc, stderr) = run(&dir, &text);
    assert_eq!(code, 0, "{stderr}");
    let t = test_of(&doc, "test_table_full");
    assert_eq!(t["faults"][0]["hits"], 1, "{t:#}");
}

/// A `client` service running `command` (a shell command line; `$ARG` is
/// the SQL, `$DB_PORT` the db proxy's port) when sent `SH <sql>`, and
/// `sh(sql)` to do that: a real SQL client run on demand against the
/// proxy's TLS front, trusting only the CA Faultbox generates for the run
/// (`FAULTBOX_CA_FILE`).
fn sql_client(command: &str) -> String {
    format!(
        r#"
cport = free_port()
client = service(
    "client",
    "{helper}",
    interface("main", "tcp", cport),
    args = ["serve", str(cport)],
    env = {{"DB_PORT": db.main.proxy_port, "FBHELPER_SH": "{command}"}},
    depends_on = [db],
    healthcheck = tcp("localhost:%d" % cport),
)

def sh(sql):
    return client.main.send(data = "SH " + sql)
"#,
        helper = support::helper(),
    )
}

#[test]
fn postgres_over_tls_psql_verify_full_sees_injected_errors_and_the_server_sees_tls() {
    let dir = Scratch::new("pg-tls");
    let data = initdb(&dir);
    let (cert, key) = support::server_cert(&dir, "pg/server");
    for (mode, path) in [("644", &cert), ("600", &key)] {
        let _ = Command::new("chown")
            .args(["postgres:postgres", path])
            .status();
        let _ = Command::new("chmod").args([mode, path]).status();
    }
    let bin = postgres_bin();
    let text = format!(
        r#"
port = free_port()
db = service(
    "db",
    "{bin}/postgres",
    interface("main", "postgres", port, tls = tls_cert(ca = "{cert}")),
    args = ["-D", "{data}", "-p", str(port), "-k", "{sock}", "-c", "listen_addresses=127.0.0.1",
            "-c", "ssl=on", "-c", "ssl_cert_file={cert}", "-c", "ssl_key_file={key}"],
    user = "postgres",
    healthcheck = ready(timeout = "30s"),
)

{client}
def test_tls_both_legs():
    # The server sees its own connection from the proxy as TLS.
    ssl = sh("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert_eq(ssl, "exit 0: t")
    assert_eq(sh("CREATE TABLE items (id int)"), "exit 0: CREATE TABLE")
    full = fault(db.main, error(query = "INSERT INTO items*", code = "53100", message = "could not extend file: No space left on device"), run = lambda: sh("INSERT INTO items VALUES (1)"))
    assert_true(full.startswith("exit 1: ERROR:  could not extend file: No space left on device"), full)
    assert_eq(sh("SELECT count(*) FROM items"), "exit 0: 0")
    # Steps speak plaintext to the front; the upstream leg is still TLS.
    step = db.main.query(sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert_eq(step.data, [{{"ssl": "t"}}])
"#,
        sock = dir.path("pg"),
        client = sql_client(&format!(
            "{bin}/psql \\\"host=127.0.0.1 port=$DB_PORT user=postgres dbname=postgres sslmode=verify-full sslrootcert=$FAULTBOX_CA_FILE\\\" -XAtc \\\"$ARG\\\""
        )),
    );
    let (code, doc, stderr) = run(&dir, &text);
    assert_eq!(code, 0, "{stderr}\n{doc:#}");
    let t = test_of(&doc, "test_tls_both_legs");
    assert_eq!(t["faults"][0]["hits"], 1, "{t:#}");

    // The same client trusting the upstream's certificate instead of
    // Faultbox's CA is refused: the checks are real.
    let wrong = text.replace(
        "sslrootcert=$FAULTBOX_CA_FILE",
        &format!("sslrootcert={cert}"),
    );
    let wrong = wrong.replace(
        r#"    ssl = sh("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert_eq(ssl, "exit 0: t")"#,
        r#"    bad = sh("SELECT 1")
    assert_true(bad.startswith("exit 2:") and "certificate verify failed" in bad, bad)
    return bad"#,
    );
    let (code, doc, stderr) = run(&dir, &wrong);
    assert_eq!(code, 0, "{stderr}\n{doc:#}");
    let seen = &test_of(&doc, "test_tls_both_legs")["return_value"];
    assert!(
        seen.as_str()
            .is_some_and(|r| r.contains("certificate verify failed")),
        "{seen}"
    );
}

#[test]
fn mariadb_over_tls_the_client_verifies_faultbox_and_errors_still_apply() {
    let dir = Scratch::new("mariadb-tls");
    let data = install_mariadb(&dir);
    let (cert, key) = support::server_cert(&dir, "mysql/server");
    let _ = Command::new("chown")
        .args(["mysql:mysql", &cert, &key])
        .status();
    let text = format!(
        r#"
port = free_port()
db = service(
    "db",
    "/usr/sbin/mariadbd",
    interface("main", "mysql", port, tls = tls_cert(ca = "{cert}")),
    args = ["--no-defaults", "--datadir={data}", "--port=%d" % port, "--bind-address=127.0.0.1",
            "--socket={data}/mysqld.sock", "--skip-grant-tables", "--skip-log-bin",
            "--ssl-cert={cert}", "--ssl-key={key}"],
    user = "mysql",
    healthcheck = ready(timeout = "60s"),
)

{client}
def test_tls_both_legs():
    # The client insists on a verified TLS front (--ssl-verify-server-cert);
    # the server reports a cipher for its own session, so the back is TLS.
    cipher = sh("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
    assert_true(cipher.startswith("exit 0: Ssl_cipher\t") and len(cipher) > len("exit 0: Ssl_cipher\t"), cipher)
    assert_eq(sh("CREATE DATABASE shop; CREATE TABLE shop.items (id INT)"), "exit 0: ")
    full = fault(db.main, error(query = "INSERT INTO shop.items*", number = 1114, code = "HY000", message = "The table 'items' is full"), run = lambda: sh("INSERT INTO shop.items VALUES (1)"))
    assert_true("ERROR 1114 (HY000)" in full and "The table 'items' is full" in full, full)
    assert_eq(sh("SELECT COUNT(*) FROM shop.items"), "exit 0: 0")
    step = db.main.query(sql = "SELECT COUNT(*) AS n FROM shop.items")
    assert_eq(step.data, [{{"n": "0"}}], step.error)
"#,
        client = sql_client(
            "mariadb --no-defaults -h 127.0.0.1 -P $DB_PORT -u root --ssl --ssl-ca=$FAULTBOX_CA_FILE --ssl-verify-server-cert -N -B -e \\\"$ARG\\\""
        ),
    );
    let (code, doc, stderr) = run(&dir, &text);
    assert_eq!(code, 0, "{stderr}\n{doc:#}");
    let t = test_of(&doc, "test_tls_both_legs");
    assert_eq!(t["faults"][0]["hits"], 1, "{t:#}");
}
