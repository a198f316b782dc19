//! Shutdown signals: SIGINT (Ctrl-C) or SIGTERM (Kubernetes).

/// Completes at the first SIGINT or SIGTERM; a second one exits the process
/// at once (status 130), without waiting for the drain the first began.
pub async fn shutdown() {
    one().await;
    tokio::spawn(async {
        one().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(130);
    });
}

/// Completes at the next SIGINT or SIGTERM.
async fn one() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
