//! Reloading the configuration while serving: on SIGHUP and when the
//! file's content changes (polled, so the atomic symlink swap a Kubernetes
//! ConfigMap update makes is seen like any edit).
//!
//! Only the catalog reloads (plans with their limits, prices, hold
//! policy); listeners, store, journal and seed accounts need a restart.
//! A file with any problem is refused whole, every problem logged, and the
//! catalog in force stays; so is one that drops a plan or edits a price
//! version (see [`Catalog::reloaded`]). Requests in flight keep the
//! catalog they started with: nothing is dropped or failed by a reload.
//!
//! [`Catalog::reloaded`]: crate::engine::catalog::Catalog::reloaded

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::Settings;
use crate::service::Tollgate;

/// Reloads done and refused since start.
#[derive(Debug, Default)]
pub struct Reloads {
    /// Applied.
    pub applied: AtomicU64,
    /// Refused (the old catalog stayed).
    pub refused: AtomicU64,
}

/// Where the configuration comes from and how often to look at it.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The configuration file.
    pub path: PathBuf,
    /// How often its content is compared; `None`: on SIGHUP only.
    pub poll: Option<Duration>,
    /// Its content when the configuration in force was read.
    pub loaded: Option<Vec<u8>>,
}

/// Reloads `watch.path` into `tollgate` on SIGHUP and on change until
/// `stop` completes.
pub async fn run(
    tollgate: Tollgate,
    watch: Watch,
    reloads: std::sync::Arc<Reloads>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; the configuration reloads on change only");
            None
        }
    };
    let mut last = watch.loaded.clone();
    let mut tick = tokio::time::interval(watch.poll.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        let asked = tokio::select! {
            () = &mut stop => return,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
            _ = tick.tick(), if watch.poll.is_some() => false,
        };
        let content = match std::fs::read(&watch.path) {
            Ok(content) => content,
            Err(e) => {
                reloads.refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %watch.path.display(), error = %e, "configuration not reloaded: cannot read it");
                continue;
            }
        };
        if !asked && last.as_ref() == Some(&content) {
            continue;
        }
        last = Some(content.clone());
        let why = if asked { "SIGHUP" } else { "file changed" };
        let text = String::from_utf8_lossy(&content);
        let outcome = match Settings::parse(&text, &|key| std::env::var(key).ok()) {
            Ok(settings) => tollgate.reload(settings.catalog).await,
            Err(errors) => Err(errors.0.iter().map(|e| format!("{}: {}", e.path, e.message)).collect()),
        };
        match outcome {
            Ok(()) => {
                let n = reloads.applied.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(path = %watch.path.display(), trigger = why, reloads = n, "configuration reloaded");
            }
            Err(problems) => {
                let n = reloads.refused.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    path = %watch.path.display(),
                    trigger = why,
                    refused = n,
                    problems = %problems.join("; "),
                    "configuration not reloaded; the one in force stays"
                );
            }
        }
    }
}
