//! What the benches share: one configuration (a plan without limits, one
//! priced model, accounts seeded with money) and an app started on the
//! system clock and served in the background until stopped.

// Each bench uses a part of it.
#![allow(dead_code)]

use std::path::Path;

use tollgate::app::server::App;
use tollgate::config::{Settings, UsageSinkConfig};

/// The model every bench asks for.
pub const MODEL: &str = "llama-3.1-8b";

/// The configuration, as a file, with `accounts` seeded (each on plan
/// `open` with 1,000,000 of paid money), on loopback ports the system
/// picks.
pub fn config<S: AsRef<str>>(accounts: impl IntoIterator<Item = S>) -> String {
    let mut config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[plans.open]
[[prices]]
id = "v1"
effective_at = "2026-01-01T00:00:00Z"
[prices.models."{MODEL}".tiers.default]
input = "0.10"
output = "0.20"
"#
    );
    for id in accounts {
        let id = id.as_ref();
        config.push_str(&format!(
            "[[accounts]]\nid = \"{id}\"\nplan = \"open\"\npaid = \"1000000\"\n"
        ));
    }
    config
}

/// The settings of [`config`], usage records going to the file `usage`.
pub fn settings<S: AsRef<str>>(accounts: impl IntoIterator<Item = S>, usage: &Path) -> Settings {
    let mut settings = Settings::parse(&config(accounts), &|_| None).unwrap();
    settings.usage = UsageSinkConfig::File(usage.to_path_buf());
    settings
}

/// A bearer token of the `write` role that [`with_admin`] settings accept.
pub const ADMIN_TOKEN: &str = "tg_test_write";

/// `settings`, accepting [`ADMIN_TOKEN`] on the admin API.
pub fn with_admin(mut settings: Settings) -> Settings {
    settings.admin.extend(vec![tollgate::api::auth::Token {
        sha256: tollgate::api::auth::parse_sha256("79a8639ebf26530f4bc031484a4e1ef1ee755cde16461ba68052abc53421301c")
            .unwrap(),
        role: tollgate::api::auth::Role::Write,
        operator: "bench".into(),
    }]);
    settings
}

/// An app serving in this process.
pub struct Served {
    /// Its data plane.
    pub url: String,
    /// Its admin API.
    pub admin: String,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Builds the app of `settings` on the system clock and serves it.
pub async fn serve(settings: Settings) -> Served {
    let app = App::build_on_system_clock(settings).await.unwrap();
    let url = format!("http://{}", app.quota_addr());
    let admin = format!("http://{}", app.admin_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Only `stop` stops it: a `Served` dropped leaves it serving until the
    // bench process ends.
    let running = tokio::spawn(app.run(async {
        if stopped.await.is_err() {
            std::future::pending::<()>().await;
        }
    }));
    Served {
        url,
        admin,
        stop,
        running,
    }
}

impl Served {
    /// Stops it and waits for its drain (leases returned, sink flushed).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.running.await.unwrap().unwrap();
    }
}
