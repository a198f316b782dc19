//! A TCP fault proxy for tests: listens on a loopback port, forwards every
//! connection to a target (say a Redis), and injects faults that can be
//! changed while it runs: latency, random drops, stalls and refusals.
//!
//! Each connection is one task running two copy loops (client to server,
//! server to client). Faults live in a `watch` channel, so running loops
//! see changes at once; a stalled loop waits on that channel rather than
//! polling. Dropping the [`FaultProxy`] aborts its accept task, and with it
//! (through the `JoinSet` that task owns) every connection task.
//!
//! Counters are updated by the connection tasks themselves, so they may
//! lag an action (say [`FaultProxy::drop_all`]) by a scheduler tick.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The seed of [`FaultProxy::start`].
pub const DEFAULT_SEED: u64 = 0x7011_6a7e;

/// The faults a [`FaultProxy`] applies; the default is none.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Added before forwarding each chunk read, in both directions (so a
    /// request and its reply take at least twice this).
    pub latency: Duration,
    /// 0: never. Otherwise each new connection, and each chunk read, has a
    /// 1-in-N chance (from the proxy's seeded RNG) of closing both sides.
    pub drop_every: u32,
    /// While true, neither side is read (bytes queue in kernel buffers);
    /// forwarding resumes when it is false again.
    pub stall: bool,
    /// New connections are accepted, then closed at once.
    pub refuse: bool,
}

/// What a [`FaultProxy`] has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted (refused ones included).
    pub connections: u64,
    /// Connections closed at once because [`Faults::refuse`] was set.
    pub refused: u64,
    /// Connections closed by a random drop or by [`FaultProxy::drop_all`].
    pub dropped: u64,
    /// Chunks held back by [`Faults::latency`].
    pub delayed_chunks: u64,
    /// Stall periods (see [`Faults::stall`]) that held back at least one
    /// live connection: each counts once, however many it held.
    pub stalls: u64,
}

/// A running proxy; dropping it closes the listener and every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// What the accept loop, the connections and the handle share.
struct Shared {
    faults: watch::Sender<Faults>,
    /// Bumped by `drop_all`: every connection closes when it changes.
    kill: watch::Sender<u64>,
    rng: Mutex<fastrand::Rng>,
    /// Bumped each time `stall` turns on; `stall_counted` is the last
    /// period counted in `stalls`.
    stall_period: AtomicU64,
    stall_counted: AtomicU64,
    connections: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    delayed_chunks: AtomicU64,
    stalls: AtomicU64,
}

impl Shared {
    /// True with a chance of 1 in `every` (never when `every` is 0).
    fn roll(&self, every: u32) -> bool {
        every != 0 && self.rng.lock().expect("fault proxy rng lock").u32(..every) == 0
    }

    /// A connection is held back by the current stall period.
    fn note_stall(&self) {
        let period = self.stall_period.load(Ordering::SeqCst);
        if self.stall_counted.fetch_max(period, Ordering::SeqCst) < period {
            self.stalls.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The connection was closed by a fault.
#[derive(Debug)]
struct Dropped;

impl FaultProxy {
    /// Starts a proxy to `target` with no faults and [`DEFAULT_SEED`].
    pub async fn start(target: SocketAddr) -> FaultProxy {
        FaultProxy::start_seeded(target, DEFAULT_SEED).await
    }

    /// Starts a proxy to `target` with no faults; random drops come from an
    /// RNG seeded with `seed`.
    pub async fn start_seeded(target: SocketAddr, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy");
        let addr = listener.local_addr().expect("the fault proxy's address");
        let shared = Arc::new(Shared {
            faults: watch::channel(Faults::default()).0,
            kill: watch::channel(0).0,
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            stall_period: AtomicU64::new(0),
            stall_counted: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            delayed_chunks: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, target, shared.clone()));
        FaultProxy { addr, shared, accept }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:PORT/`, for a proxy in front of a Redis.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Replaces the faults; running connections see the change at once.
    pub fn set(&self, faults: Faults) {
        // Under the channel's lock: a loop that sees the stall sees its period.
        self.shared.faults.send_modify(|current| {
            if faults.stall && !current.stall {
                self.shared.stall_period.fetch_add(1, Ordering::SeqCst);
            }
            *current = faults;
        });
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        *self.shared.faults.borrow()
    }

    /// Closes every open proxied connection (both sides); new ones are
    /// still accepted.
    pub fn drop_all(&self) {
        self.shared.kill.send_modify(|generation| *generation += 1);
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            connections: s.connections.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            delayed_chunks: s.delayed_chunks.load(Ordering::Relaxed),
            stalls: s.stalls.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the connections' JoinSet: aborting it drops
        // the set, which aborts every connection task.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    let mut connections: JoinSet<()> = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Reap finished connections (disabled while there are none).
            Some(_) = connections.join_next() => continue,
        };
        let Ok((client, _)) = accepted else {
            // Out of file descriptors or the like: try again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let faults = *shared.faults.borrow();
        if faults.refuse {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        }
        if shared.roll(faults.drop_every) {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        }
        // Subscribed now, so a drop_all from here on reaches this connection.
        let kill = shared.kill.subscribe();
        connections.spawn(proxy(shared.clone(), client, target, kill));
    }
}

/// Forwards one connection until both directions end, or a fault or
/// `drop_all` closes it (both sides at once: every half is dropped).
async fn proxy(shared: Arc<Shared>, client: TcpStream, target: SocketAddr, mut kill: watch::Receiver<u64>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return; // target down: the client sees its connection close
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // An end of stream in one direction lets the other carry on; a drop
    // in either ends both (try_join returns on the first error).
    let both = async {
        tokio::try_join!(
            pipe(&shared, client_read, server_write),
            pipe(&shared, server_read, client_write),
        )
    };
    let dropped = tokio::select! {
        outcome = both => outcome.is_err(),
        _ = kill.changed() => true,
    };
    if dropped {
        shared.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Copies `from` into `to`, applying the faults, until end of stream or an
/// I/O error (`Ok`), or a random drop (`Err`). Dropping `to` on return
/// shuts down its write side, passing an end of stream on.
async fn pipe(shared: &Shared, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) -> Result<(), Dropped> {
    let mut faults = shared.faults.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = *faults.borrow_and_update();
        if now.stall {
            shared.note_stall();
            until(&mut faults, |f| !f.stall).await;
            continue;
        }
        // Reading is cancel-safe: a stall beginning mid-read loses nothing.
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => n,
            },
            () = until(&mut faults, |f| f.stall) => continue,
        };
        let now = *faults.borrow();
        if shared.roll(now.drop_every) {
            return Err(Dropped);
        }
        if !now.latency.is_zero() {
            shared.delayed_chunks.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(now.latency).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return Ok(());
        }
    }
}

/// Waits until the faults satisfy `done` (at once if they already do).
async fn until(faults: &mut watch::Receiver<Faults>, done: impl Fn(&Faults) -> bool) {
    loop {
        let now = *faults.borrow_and_update();
        if done(&now) {
            return;
        }
        if faults.changed().await.is_err() {
            // The proxy is gone: its tasks are being aborted.
            std::future::pending::<()>().await;
        }
    }
}
