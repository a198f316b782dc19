//! What the in-process benches share: an app started on the system clock
//! and served in the background until stopped.

use tollgate::app::server::App;
use tollgate::config::Settings;

/// An app serving in this process.
pub struct Served {
    /// Its data plane.
    pub url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Builds the app of `settings` on the system clock and serves it.
pub async fn serve(settings: Settings) -> Served {
    let app = App::build_on_system_clock(settings).await.unwrap();
    let url = format!("http://{}", app.quota_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Only `stop` stops it: a `Served` dropped leaves it serving until the
    // bench process ends.
    let running = tokio::spawn(app.run(async {
        if stopped.await.is_err() {
            std::future::pending::<()>().await;
        }
    }));
    Served { url, stop, running }
}

impl Served {
    /// Stops it and waits for its drain (leases returned, sink flushed).
    #[allow(dead_code)] // Not every bench stops what it serves.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.running.await.unwrap().unwrap();
    }
}
