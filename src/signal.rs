//! Shutdown signals: SIGINT (Ctrl-C) or SIGTERM (Kubernetes), and the
//! deadline that ends the process when its drain does not.
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

/// Exit status at a second signal.
pub const SECOND_SIGNAL_EXIT: i32 = 130;

/// Listens for SIGINT and SIGTERM from now on (so a signal that comes
/// before the returned future is first polled is not lost to the default
/// action): the future completes at the first one. From then on the
/// process has `deadline` to exit; past it, it is ended with status
/// [`DEADLINE_EXIT`], and a second signal ends it at once with status
/// [`SECOND_SIGNAL_EXIT`]. Both hold even if the runtime is stuck.
pub fn shutdown(deadline: Duration) -> impl Future<Output = ()> {
    let (first, seen) = tokio::sync::oneshot::channel();
    match Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => {
            let spawned = std::thread::Builder::new()
                .name("tollgate-signals".into())
                .spawn(move || watch(signals, first, deadline));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the signal thread");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot listen for SIGINT and SIGTERM"),
    }
    async move {
        if seen.await.is_err() {
            // Nobody will ever signal: serve until the process is killed.
            std::future::pending::<()>().await;
        }
    }
}

/// The signal thread: tells the runtime of the first signal, then ends the
/// process at the deadline or at a second signal, whichever comes first
/// (unless it exits by itself before).
fn watch(mut signals: Signals, first: tokio::sync::oneshot::Sender<()>, deadline: Duration) {
    let mut forever = signals.forever();
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
    if forever.next().is_some() {
        tracing::warn!("second signal: exiting at once");
        std::process::exit(SECOND_SIGNAL_EXIT);
    }
}
