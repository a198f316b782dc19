//! Real Redis for tests: `redis-server` processes on free loopback ports,
//! each in its own temp directory, stopped by PID (on `stop` or drop).
//! Never the machine's shared Redis on 6379. A [`RedisCluster`] is N
//! masters joined with `redis-cli --cluster create`, optionally each with a
//! replica, so a test can kill a master and wait for its failover.

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

/// Calls of the commands `keep` names between two readings of
/// [`RedisServer::commandstats`].
pub fn calls_between(before: &[(String, u64)], after: &[(String, u64)], keep: impl Fn(&str) -> bool) -> u64 {
    after
        .iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, calls)| calls - before.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c))
        .sum()
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
        // A port picked free can be taken before redis binds it; a cluster
        // node also needs port + 10000 (its bus) free, and fails at once
        // above 55535: retry.
        for _ in 0..20 {
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

    /// Calls per command name since the server started (`INFO
    /// commandstats`: every command Redis ran, those inside scripts
    /// included).
    pub fn commandstats(&self) -> Vec<(String, u64)> {
        self.cli(&["INFO", "commandstats"])
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .collect()
    }

    /// A figure of `INFO` (e.g. `used_memory`, `used_cpu_user`).
    pub fn info<T: std::str::FromStr>(&self, field: &str) -> T {
        let prefix = format!("{field}:");
        self.cli(&["INFO"])
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("INFO has no {field}"))
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

/// The `cluster-node-timeout` of [`RedisCluster::start_with_replicas`]:
/// short, so a killed master is failed over in about three seconds. (A node
/// that cannot answer for this long, on a starved machine, is failed over
/// too.)
pub const FAILOVER_NODE_TIMEOUT_MS: u64 = 1000;

/// What a node says of the live nodes: (port, master?, slot ranges), by port.
type Roles = Vec<(u16, bool, Vec<(u16, u16)>)>;

/// A Redis Cluster on loopback.
pub struct RedisCluster {
    /// Every node: the masters for [`RedisCluster::start`]; masters and
    /// replicas, in no particular order, for
    /// [`RedisCluster::start_with_replicas`] (roles change on failover: see
    /// [`RedisCluster::masters`]). A killed node stays here, stopped.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` cluster-enabled servers, assigns every slot, and
    /// waits until each node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| RedisServer::start(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]))
            .collect();
        create(&nodes, 0);
        let cluster = RedisCluster { nodes };
        cluster.wait("cluster_state:ok on every node", Duration::from_secs(15), |c| {
            c.live().all(|n| state_ok(n.port)).then_some(())
        });
        cluster
    }

    /// Starts `masters` masters (at least 3) each with one replica (so
    /// `2 * masters` nodes) and a [`FAILOVER_NODE_TIMEOUT_MS`] node
    /// timeout, assigns every slot, and waits until every node reports
    /// `cluster_state:ok`, all agree on the roles and slots, and every
    /// master has a replica whose link to it is up.
    pub fn start_with_replicas(masters: usize) -> RedisCluster {
        assert!(masters >= 3, "redis-cli --cluster create needs at least 3 masters");
        let timeout = FAILOVER_NODE_TIMEOUT_MS.to_string();
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            timeout.as_str(),
            // Replicas sync at once (the default waits 5 s for more of them).
            "--repl-diskless-sync-delay",
            "0",
        ];
        let nodes: Vec<RedisServer> = (0..2 * masters).map(|_| RedisServer::start(&args)).collect();
        create(&nodes, 1);
        let cluster = RedisCluster { nodes };
        cluster.wait("every master with a synced replica", Duration::from_secs(30), |c| {
            (c.settled() && c.replicated(masters)).then_some(())
        });
        cluster
    }

    /// Seed URLs of every node (masters and replicas, stopped ones too): a
    /// cluster client learns the roles from any of them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The ports of the live masters that serve slots, as the first live
    /// node sees them.
    pub fn masters(&self) -> Vec<u16> {
        let Some(first) = self.live().next() else {
            return Vec::new();
        };
        cluster_nodes(first.port)
            .into_iter()
            .filter(|n| n.master && !n.failing && !n.slots.is_empty() && self.is_live(n.port))
            .map(|n| n.port)
            .collect()
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT` on a live node).
    pub fn slot_of(&self, key: &str) -> u16 {
        let port = self.live().next().expect("a live node").port;
        let out = cli(port, &["CLUSTER", "KEYSLOT", key]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key:?} answered {out:?}"))
    }

    /// Kills (SIGKILL, by PID) the master serving the slot of `key`, once
    /// every live node agrees which it is (waits up to 15 s), and returns
    /// its port. Its replica is promoted after about two node timeouts:
    /// see [`RedisCluster::wait_for_promotion`].
    pub fn kill_master_of(&mut self, key: &str) -> u16 {
        let slot = self.slot_of(key);
        let what = format!("an agreed master for slot {slot} of {key:?}");
        let port = self.wait(&what, Duration::from_secs(15), |c| c.serving(slot));
        self.node_mut(port).stop();
        port
    }

    /// The node replicating the master on `master` (its port).
    pub fn replica_of(&self, master: u16) -> u16 {
        let nodes = cluster_nodes(master);
        let id = &nodes.iter().find(|n| n.port == master).expect("the master itself").id;
        nodes
            .iter()
            .find(|n| n.master_id.as_ref() == Some(id))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no replica of {master}: {nodes:?}"))
    }

    /// Kills (SIGKILL, by PID) the node on `port`, asking nobody first.
    pub fn kill(&mut self, port: u16) {
        self.node_mut(port).stop();
    }

    /// Sends `signal` (`STOP`, `CONT`) to the node on `port`.
    pub fn signal(&self, port: u16, signal: &str) {
        let pid = self
            .nodes
            .iter()
            .find(|n| n.port == port)
            .and_then(RedisServer::pid)
            .unwrap_or_else(|| panic!("no running node on {port}"));
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Waits up to `timeout` until every live node reports
    /// `cluster_state:ok` and names the same live, non-failing master for
    /// the slot of `key`, and returns that master's port. (At once, with
    /// the current master, if none was killed.)
    pub fn wait_for_promotion(&self, key: &str, timeout: Duration) -> u16 {
        let slot = self.slot_of(key);
        let what = format!("a live master for slot {slot} of {key:?}");
        self.wait(&what, timeout, |c| c.serving(slot))
    }

    /// Starts the stopped node on `port` again, with its old cluster config
    /// (`nodes.conf`; its data is gone, or stale from a replica's sync),
    /// and waits up to 30 s until the cluster
    /// is settled: every live node reports `cluster_state:ok`, all agree on
    /// the roles and slots, and every replica's link is up. A master killed
    /// and failed over rejoins as a replica of its successor; one restarted
    /// before any failover comes back as the (now empty) master.
    pub fn restart_node(&mut self, port: u16) {
        self.node_mut(port).restart();
        let what = format!("node {port} back in a settled cluster");
        self.wait(&what, Duration::from_secs(30), |c| c.settled().then_some(()));
    }

    /// The nodes still running.
    fn live(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.pid().is_some())
    }

    fn is_live(&self, port: u16) -> bool {
        self.live().any(|n| n.port == port)
    }

    fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// The live master every live node names for `slot`, if each reports
    /// `cluster_state:ok`; `None` while they disagree or none serves it.
    fn serving(&self, slot: u16) -> Option<u16> {
        let mut agreed: Option<u16> = None;
        for node in self.live() {
            if !state_ok(node.port) {
                return None;
            }
            let owner = cluster_nodes(node.port)
                .into_iter()
                .find(|n| n.master && !n.failing && n.serves(slot))?
                .port;
            if agreed.is_some_and(|a| a != owner) {
                return None;
            }
            agreed = Some(owner);
        }
        agreed.filter(|port| self.is_live(*port))
    }

    /// Every live node reports `cluster_state:ok` and the same roles and
    /// slots for the live nodes, none failing or unlinked; every live
    /// replica's link to its master is up.
    fn settled(&self) -> bool {
        let live: Vec<u16> = self.live().map(|n| n.port).collect();
        let mut agreed: Option<Roles> = None;
        for &port in &live {
            if !state_ok(port) {
                return false;
            }
            let view = cluster_nodes(port);
            let mut summary = Vec::new();
            for node in view.iter().filter(|n| live.contains(&n.port)) {
                if node.failing || !node.connected {
                    return false;
                }
                summary.push((node.port, node.master, node.slots.clone()));
            }
            summary.sort();
            if summary.len() != live.len() || agreed.as_ref().is_some_and(|a| *a != summary) {
                return false;
            }
            agreed = Some(summary);
            let replica = view.iter().any(|n| n.myself && !n.master);
            if replica && !cli(port, &["INFO", "replication"]).contains("master_link_status:up") {
                return false;
            }
        }
        true
    }

    /// The first live node sees `masters` masters serving slots, each with
    /// a replica not failing.
    fn replicated(&self, masters: usize) -> bool {
        let Some(first) = self.live().next() else {
            return false;
        };
        let view = cluster_nodes(first.port);
        let serving: Vec<&ClusterNode> = view.iter().filter(|n| n.master && !n.slots.is_empty()).collect();
        serving.len() == masters
            && serving.iter().all(|m| {
                view.iter()
                    .any(|r| !r.failing && r.master_id.as_deref() == Some(m.id.as_str()))
            })
    }

    /// Polls `probe` every 50 ms until it finds something; after `timeout`
    /// panics with what every live node sees.
    fn wait<T>(&self, what: &str, timeout: Duration, mut probe: impl FnMut(&RedisCluster) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = probe(self) {
                return found;
            }
            if Instant::now() >= deadline {
                let views: Vec<String> = self
                    .live()
                    .map(|n| format!("node {}:\n{}", n.port, cli(n.port, &["CLUSTER", "NODES"])))
                    .collect();
                panic!(
                    "waited {timeout:?} for {what}; the live nodes see:\n{}",
                    views.join("\n")
                );
            }
            sleep(Duration::from_millis(50));
        }
    }
}

/// `redis-cli --cluster create` over `nodes`, with `replicas` per master.
fn create(nodes: &[RedisServer], replicas: usize) {
    let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
    let replicas = replicas.to_string();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", replicas.as_str(), "--cluster-yes"])
        .output()
        .expect("run redis-cli --cluster create");
    assert!(
        out.status.success(),
        "cluster create failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The node on `port` reports `cluster_state:ok`.
fn state_ok(port: u16) -> bool {
    cli(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
}

/// `CLUSTER NODES` as the node on `port` answers it (empty if it does not).
pub fn cluster_nodes(port: u16) -> Vec<ClusterNode> {
    cli(port, &["CLUSTER", "NODES"])
        .lines()
        .filter_map(ClusterNode::parse)
        .collect()
}

/// One line of `CLUSTER NODES`: a node as another (or itself) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// Its node id.
    pub id: String,
    /// Its client port (0 while unknown).
    pub port: u16,
    /// The line describes the answering node itself.
    pub myself: bool,
    /// A master (else a replica).
    pub master: bool,
    /// Flagged `fail` or `fail?` by the answering node.
    pub failing: bool,
    /// The id of the master it replicates, for a replica.
    pub master_id: Option<String>,
    /// The answering node's cluster-bus link to it is up.
    pub connected: bool,
    /// The slot ranges it serves, inclusive (slots being imported or
    /// migrated left out).
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    /// It serves `slot`.
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(first, last)| (first..=last).contains(&slot))
    }

    /// `id ip:port@cport[,hostname] flags master ping pong epoch link slot...`
    fn parse(line: &str) -> Option<ClusterNode> {
        let mut fields = line.split_whitespace();
        let id = fields.next()?.to_owned();
        let address = fields.next()?.split('@').next()?;
        let port = address.rsplit_once(':')?.1.parse::<u16>().unwrap_or(0);
        let flags: Vec<&str> = fields.next()?.split(',').collect();
        let master_id = fields.next()?;
        let connected = fields.nth(3)? == "connected";
        let slots = fields
            .filter(|s| !s.starts_with('['))
            .filter_map(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                Some((first.parse::<u16>().ok()?, last.parse::<u16>().ok()?))
            })
            .collect();
        Some(ClusterNode {
            id,
            port,
            myself: flags.contains(&"myself"),
            master: flags.contains(&"master"),
            failing: flags.contains(&"fail") || flags.contains(&"fail?"),
            master_id: (master_id != "-").then(|| master_id.to_owned()),
            connected,
            slots,
        })
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
