//! Real Redis for tests: `redis-server` processes on free loopback ports,
//! each in its own temp directory, stopped by PID (on `stop` or drop).
//! Never the machine's shared Redis on 6379. A [`RedisCluster`] is N
//! masters joined with `redis-cli --cluster create`.

#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// One `redis-server` process.
pub struct RedisServer {
    /// Its loopback port.
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("bound").port()
}

/// Runs `redis-cli` against `port` and returns its stdout.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli (package redis-tools)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RedisServer {
    /// Starts a volatile server (no RDB, no AOF) with `extra` arguments.
    pub fn start(extra: &[&str]) -> RedisServer {
        // A port picked free can be taken before redis binds it: retry.
        for _ in 0..5 {
            if let Some(server) = Self::try_start(extra) {
                return server;
            }
        }
        panic!("could not start redis-server");
    }

    fn try_start(extra: &[&str]) -> Option<RedisServer> {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            args: extra.iter().map(|a| a.to_string()).collect(),
        };
        server.spawn().then_some(server)
    }

    /// Spawns the process on this server's port and waits for PONG.
    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir", self.dir.path().to_str().expect("utf-8 temp path")])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (package redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        let pid = format!("process_id:{}", self.child.as_ref().map_or(0, Child::id));
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false; // exited: most likely the port was taken
            }
            // Our process answers, not another test's server on a reused port.
            if self.cli(&["INFO", "server"]).lines().any(|l| l.trim() == pid) {
                return true;
            }
            sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// Runs `redis-cli` against this server, with its password if it has one.
    pub fn cli(&self, args: &[&str]) -> String {
        let password = self
            .args
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| self.args.get(i + 1));
        match password {
            None => cli(self.port, args),
            Some(password) => {
                let auth = ["-a", password.as_str(), "--no-auth-warning"];
                cli(self.port, &auth.iter().chain(args).copied().collect::<Vec<_>>())
            }
        }
    }

    /// Starts the stopped server again on the same port (empty: nothing is
    /// persisted).
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "redis-server did not restart on port {}", self.port);
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id, for tests that crash it on purpose.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process by PID and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of masters on loopback.
pub struct RedisCluster {
    /// The masters.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` cluster-enabled servers, assigns every slot, and
    /// waits until each node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| RedisServer::start(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]))
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while !nodes
            .iter()
            .all(|n| cli(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "cluster did not reach cluster_state:ok");
            sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes }
    }

    /// Seed URLs, one per master.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A TLS port of a [`RedisServer`] and the authority that signed it.
pub struct Tls {
    /// The TLS port (the server's plain port stays open for the harness).
    pub port: u16,
    /// The certificate authority to trust (PEM).
    pub ca: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tls {
    /// `rediss://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts a server that also speaks TLS, with a throwaway authority and a
/// certificate for 127.0.0.1.
pub fn start_tls() -> (RedisServer, Tls) {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=tollgate-test-ca",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write san.ext");
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
    let port = free_port();
    let path = |f: &str| d.join(f).to_string_lossy().into_owned();
    let (cert, key, ca) = (path("server.crt"), path("server.key"), path("ca.crt"));
    let server = RedisServer::start(&[
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]);
    (
        server,
        Tls {
            port,
            ca: d.join("ca.crt"),
            _dir: dir,
        },
    )
}
