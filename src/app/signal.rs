//! Shutdown signals: SIGINT (Ctrl-C) or SIGTERM (Kubernetes), and the
//! deadline that ends the process when its drain does not.
//!
//! The first signal starts the drain; a second cuts its grace period for
//! in-flight calls short, so leases are still returned and the usage sink
//! still drained, only sooner; a third ends the process at once (a stuck
//! process, whose drain would never get there).
//!
//! The signals are read by a thread of their own, outside the async
//! runtime: should every worker be stuck (a deadlock, a blocking call), a
//! signal is still seen and the deadline still ends the process.

use std::future::Future;
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Exit status when the drain outlived its deadline.
pub const DEADLINE_EXIT: i32 = 1;

/// Exit status at a third signal.
pub const THIRD_SIGNAL_EXIT: i32 = 130;

/// Listens for SIGINT and SIGTERM from now on (so a signal that comes
/// before the futures are first polled is not lost to the default
/// action). The first future completes at the first signal, the second at
/// the second (the drain is then hurried: see
/// [`crate::app::server::App::run_hurried`]). From the first on, the process
/// has `deadline` to exit; past it, it is ended with status
/// [`DEADLINE_EXIT`], and a third signal ends it at once with status
/// [`THIRD_SIGNAL_EXIT`]. Both hold even if the runtime is stuck.
pub fn shutdown(deadline: Duration) -> (impl Future<Output = ()>, impl Future<Output = ()>) {
    let (first, first_seen) = tokio::sync::oneshot::channel();
    let (second, second_seen) = tokio::sync::oneshot::channel();
    match Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => {
            let spawned = std::thread::Builder::new()
                .name("tollgate-signals".into())
                .spawn(move || watch(signals, [first, second], deadline));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the signal thread");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot listen for SIGINT and SIGTERM"),
    }
    let heard = |seen: tokio::sync::oneshot::Receiver<()>| async move {
        if seen.await.is_err() {
            // Nobody will ever signal: serve until the process is killed.
            std::future::pending::<()>().await;
        }
    };
    (heard(first_seen), heard(second_seen))
}

/// The signal thread: tells the runtime of the first and the second
/// signal, then ends the process at the deadline or at a third signal,
/// whichever comes first (unless it exits by itself before).
fn watch(mut signals: Signals, heard: [tokio::sync::oneshot::Sender<()>; 2], deadline: Duration) {
    let mut forever = signals.forever();
    let [first, second] = heard;
    if forever.next().is_none() {
        return;
    }
    let _ = first.send(());
    let spawned = std::thread::Builder::new()
        .name("tollgate-deadline".into())
        .spawn(move || {
            std::thread::sleep(deadline);
            tracing::error!(?deadline, "shutdown did not finish within its deadline: exiting now");
            std::process::exit(DEADLINE_EXIT);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the shutdown deadline");
    }
    if forever.next().is_none() {
        return;
    }
    tracing::warn!(
        "second signal: in-flight calls are dropped now; leases are returned and the usage sink drained \
         before the process exits (a third signal exits at once)"
    );
    let _ = second.send(());
    if forever.next().is_some() {
        tracing::warn!("third signal: exiting at once, leases not returned and the usage sink not drained");
        std::process::exit(THIRD_SIGNAL_EXIT);
    }
}
