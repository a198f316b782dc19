//! Real PostgreSQL for tests: a schema of its own in the machine's
//! server (127.0.0.1:5432, trust auth, database `test`), dropped when the
//! test ends; or, for a test that stops and starts the server, a server of
//! its own (`initdb` into a temp dir, on a free loopback port), stopped by
//! PID on drop.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The machine's server.
pub const SHARED: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A schema of the test's own, dropped (with its tables) on drop.
pub struct Schema {
    /// The server's URL.
    pub url: String,
    /// The schema's name.
    pub name: String,
}

impl Schema {
    /// A new, empty schema name in the shared server, which must answer.
    pub async fn new() -> Schema {
        Schema::on(SHARED).await
    }

    /// A new schema name on the server at `url`.
    pub async fn on(url: &str) -> Schema {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let schema = Schema {
            url: url.to_owned(),
            name,
        };
        // Reachable, or a message that says what to start.
        if let Err(e) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            panic!(
                "PostgreSQL is not reachable at {url} ({e}): the tests need one on 127.0.0.1:5432 \
                 with trust auth and a database `test`"
            );
        }
        schema
    }

    /// A client of the server.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// The one value of `sql` (with `{s}` naming the schema), as text.
    pub async fn value(&self, sql: &str) -> Option<String> {
        let client = self.client().await;
        let sql = sql.replace("{s}", &self.name);
        client
            .query_one(&format!("SELECT ({sql})::text"), &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        // Best effort: a server stopped by the test has nothing to drop.
        let _ = Command::new("psql")
            .args([
                &self.url,
                "-q",
                "-c",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
            ])
            .output();
    }
}

/// A connected client of `url`.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// A PostgreSQL server of the test's own.
pub struct Server {
    /// Its loopback port.
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Server {
    /// `initdb` and start a server on a free loopback port.
    pub fn start() -> Server {
        let bin = bindir();
        let dir = tempfile::tempdir().unwrap();
        // The server refuses to run as root: it runs as `postgres` then,
        // and needs its directory.
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown the server's directory to postgres");
        }
        let server = Server {
            port: free_port(),
            dir,
            bin,
        };
        let data = server.data();
        server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        server.resume();
        server
    }

    /// Its URL, database `postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the stopped server again on its port, and waits until it
    /// answers.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "postgres did not listen again");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server as a crash would (no checkpoint, connections cut).
    pub fn crash(&self) {
        self.run(
            "pg_ctl",
            &["-D", self.data().to_str().unwrap(), "-m", "immediate", "-w", "stop"],
        );
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = command.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.data().join("postmaster.pid")).ok();
        if let Some(pid) = pid.as_deref().and_then(|p| p.lines().next()) {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}

/// Where the server's programs are: Debian's newest
/// `/usr/lib/postgresql/VERSION/bin`, or where `initdb` is on the path.
fn bindir() -> PathBuf {
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let bin = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max();
    if let Some((_, bin)) = debian {
        return bin;
    }
    let out = Command::new("sh").args(["-c", "command -v initdb"]).output();
    match out {
        Ok(out) if out.status.success() => PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default(),
        _ => panic!("initdb not found: a test starts a PostgreSQL server of its own (Debian: apt install postgresql)"),
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("bound").port()
}

/// `tollgate usage SUBCOMMAND --postgres … --schema …` on `schema`, then
/// `args`; the environment's Redis and PostgreSQL left out.
pub fn usage(subcommand: &str, schema: &Schema, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command
        .args(["usage", subcommand, "--postgres", &schema.url, "--schema", &schema.name])
        .args(args)
        .env_remove("TOLLGATE_REDIS")
        .env_remove("TOLLGATE_POSTGRES");
    command
}

/// Runs `command` and returns its stdout; it must succeed.
pub fn stdout(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Loads every record of the Redis store at `urls` (`shards` logical
/// shards) into a schema of its own, and reconciles the two: not a unit
/// of difference on any account.
pub async fn loaded_and_reconciled(urls: &[String], shards: u32) {
    let schema = Schema::new().await;
    let shards = shards.to_string();
    let mut redis: Vec<&str> = urls.iter().flat_map(|u| ["--redis", u.as_str()]).collect();
    redis.extend(["--shards", &shards]);
    let mut load = usage("load", &schema, &redis);
    load.arg("--once");
    stdout(&mut load);
    let loaded: i64 = schema
        .value("SELECT count(*) FROM {s}.usage_records")
        .await
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(loaded > 0, "the streams held records to load");
    let report = stdout(&mut usage("reconcile", &schema, &redis));
    assert!(
        report.ends_with(" 0 differences\n") && !report.starts_with("0 accounts"),
        "{report}"
    );
}
