//! Logging on stderr (stdout may carry usage records), filtered by
//! `RUST_LOG` (default `info`): human-readable lines, or one JSON object a
//! line with `TOLLGATE_LOG_FORMAT=json` (with the current span's fields,
//! such as the account and request id).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, from `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("TOLLGATE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(true).with_span_list(false).init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        builder.with_ansi(ansi).init();
    }
}
