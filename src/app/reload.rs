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
//! A reload is an operator's change: each one applied writes an audit
//! record (operation `reload`, operator "configuration file", the path as
//! peer, the trigger as reason, a digest of the content as adjustment id,
//! and what it changed in `before` and `after`).
//!
//! [`Catalog::reloaded`]: crate::engine::catalog::Catalog::reloaded

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::Settings;
use crate::engine::catalog::Catalog;
use crate::engine::record::AuditRecord;
use crate::rls::config::{InForce, Rules, RulesCell};
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
    /// The command line's flags over it.
    pub flags: crate::config::Overrides,
    /// The Envoy rate-limit rules' directory, and the rules in force.
    pub rules: Option<(PathBuf, Arc<RulesCell>)>,
    /// How often its content is compared; `None`: on SIGHUP only.
    pub poll: Option<Duration>,
    /// Its content (see [`snapshot`]) when the configuration in force was
    /// read.
    pub loaded: Option<Vec<u8>>,
}

/// What a reload compares: the configuration file, and each rules file
/// (name and content, in name order).
pub fn snapshot(path: &Path, rules: Option<&Path>) -> Option<Vec<u8>> {
    let mut content = std::fs::read(path).ok()?;
    if let Some(dir) = rules {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        for file in files {
            content.extend_from_slice(file.as_os_str().as_encoded_bytes());
            content.push(0);
            content.extend(std::fs::read(&file).ok()?);
            content.push(0);
        }
    }
    Some(content)
}

/// Reads the configuration and the rules again and puts them in force,
/// both or neither, with an audit record of the change (`why` it was
/// reloaded; `was` and `is`, the snapshots before and now): the price
/// versions the file brought that were not in force before (each as "id
/// (effective at)"), or every problem.
async fn reload(
    tollgate: &Tollgate,
    watch: &Watch,
    why: &str,
    (was, is): (Option<&[u8]>, &[u8]),
) -> Result<Vec<String>, Vec<String>> {
    let text = std::fs::read_to_string(&watch.path).map_err(|e| vec![format!("{}: {e}", watch.path.display())])?;
    let settings = Settings::parse_with(&text, &crate::config::process_env, &watch.flags).map_err(|errors| {
        errors
            .0
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect::<Vec<_>>()
    });
    let rules = watch.rules.as_ref().map(|(dir, _)| Rules::load_dir(dir)).transpose();
    let (settings, rules) = match (settings, rules) {
        (Ok(settings), Ok(rules)) => (settings, rules),
        (settings, rules) => {
            let mut problems = settings.err().unwrap_or_default();
            problems.extend(rules.err().unwrap_or_default());
            return Err(problems);
        }
    };
    let before = tollgate.catalog();
    let new: Vec<_> = settings
        .catalog
        .prices
        .versions()
        .iter()
        .filter(|v| before.prices.get(&v.id).is_none())
        .collect();
    let published: Vec<String> = new
        .iter()
        .map(|v| format!("{} (effective {})", v.id, v.effective_at))
        .collect();
    let in_force: Vec<String> = before.prices.versions().iter().map(|v| v.id.to_string()).collect();
    let (mut before_map, mut after) = (
        summary(&before, in_force.clone()),
        summary(
            &settings.catalog,
            in_force
                .into_iter()
                .chain(new.iter().map(|v| v.id.to_string()))
                .collect(),
        ),
    );
    before_map.insert("configuration".into(), was.map(digest).into());
    after.insert("configuration".into(), digest(is).into());
    let audit = AuditRecord {
        kind: "audit".into(),
        account_id: None,
        operator: "configuration file".into(),
        peer: watch.path.display().to_string(),
        operation: "reload".into(),
        adjustment_id: digest(is),
        reason: why.into(),
        change: match published.as_slice() {
            [] => "reload; no new price version".into(),
            versions => format!("reload; price versions published: {}", versions.join(", ")),
        },
        before: before_map,
        after,
        refunded: Vec::new(),
        at: jiff::Timestamp::UNIX_EPOCH,
    };
    tollgate.reload(settings.catalog, audit).await?;
    if let (Some(rules), Some((_, cell))) = (rules, &watch.rules) {
        let in_force = InForce {
            rules,
            settings: settings.rls,
        };
        *cell.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(in_force);
    }
    Ok(published)
}

/// What an audit record shows of `catalog` (with `price_versions`, the
/// ids in force): each plan as a digest of its settings, so a changed plan
/// shows as a changed digest, and the hold policy.
fn summary(catalog: &Catalog, price_versions: Vec<String>) -> serde_json::Map<String, serde_json::Value> {
    let plans: serde_json::Map<String, serde_json::Value> = catalog
        .plans
        .iter()
        .map(|(id, plan)| (id.to_string(), digest(canonical(plan).as_bytes()).into()))
        .collect();
    serde_json::Map::from_iter([
        ("plans".to_owned(), plans.into()),
        ("price_versions".to_owned(), price_versions.into()),
        ("hold_ttl_seconds".to_owned(), catalog.hold_ttl.as_secs().into()),
        (
            "on_expiry".to_owned(),
            serde_json::to_value(catalog.on_expiry).unwrap_or_default(),
        ),
        (
            "idempotency_window_seconds".to_owned(),
            catalog.idempotency_window.as_secs().into(),
        ),
        ("recent_usage".to_owned(), catalog.recent_usage.into()),
        ("max_request_ids".to_owned(), catalog.max_request_ids.into()),
    ])
}

/// A plan's settings as text, the same for the same settings: its set of
/// allowed models (a hash set, in no fixed order) sorted.
fn canonical(plan: &crate::engine::catalog::Plan) -> String {
    let models = plan.allowed_models.as_ref().map(|models| {
        let mut models: Vec<&str> = models.iter().map(|m| m.as_str()).collect();
        models.sort_unstable();
        models
    });
    format!(
        "{:?}",
        (
            &plan.id,
            &plan.allowance,
            &plan.draw_order,
            models,
            &plan.limits,
            &plan.on_store_outage
        )
    )
}

/// The digest that names a reload's content (its adjustment id).
fn digest(content: &[u8]) -> String {
    crate::engine::record::digest_id([String::from_utf8_lossy(content).as_ref()])
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
        let rules_dir = watch.rules.as_ref().map(|(dir, _)| dir.as_path());
        let Some(content) = snapshot(&watch.path, rules_dir) else {
            reloads.refused.fetch_add(1, Ordering::Relaxed);
            counted("refused");
            tracing::error!(path = %watch.path.display(), "configuration not reloaded: cannot read it or its rules");
            continue;
        };
        if !asked && last.as_ref() == Some(&content) {
            continue;
        }
        let was = last.replace(content.clone());
        let why = if asked { "SIGHUP" } else { "file changed" };
        let outcome = reload(&tollgate, &watch, why, (was.as_deref(), &content)).await;
        match outcome {
            Ok(published) => {
                let n = reloads.applied.fetch_add(1, Ordering::Relaxed) + 1;
                counted("applied");
                tracing::info!(path = %watch.path.display(), trigger = why, reloads = n, "configuration reloaded");
                // Prices are money: a version the file published is logged
                // on the audit target, as one published through the API.
                if !published.is_empty() {
                    tracing::info!(
                        target: "audit",
                        operator = "configuration file",
                        path = %watch.path.display(),
                        versions = %published.join(", "),
                        "price versions published by a reload"
                    );
                }
            }
            Err(problems) => {
                let n = reloads.refused.fetch_add(1, Ordering::Relaxed) + 1;
                counted("refused");
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

/// Counts a reload's `result` in the metrics.
fn counted(result: &'static str) {
    crate::telemetry::metrics::metrics()
        .config_reloads
        .get_or_create(&crate::telemetry::metrics::ReloadResult { result })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same file read twice shows the same plans: a plan's set of
    /// allowed models has no order of its own, and its digest must not
    /// depend on one.
    #[test]
    fn a_plan_reads_the_same_in_every_audit_record() {
        let models: Vec<String> = (0..12).map(|i| format!("\"model-{i}\"")).collect();
        let text = crate::config::DEMO.replacen(
            "allowed_models = [\"llama-3.1-8b\"]",
            &format!("allowed_models = [{}]", models.join(", ")),
            1,
        );
        assert_ne!(text, crate::config::DEMO);
        let read = || Settings::parse(&text, &|_| None).unwrap().catalog;
        let (first, again) = (read(), read());
        assert_eq!(summary(&first, Vec::new()), summary(&again, Vec::new()));
    }
}
