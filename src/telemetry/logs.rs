//! Logs and traces.
//!
//! Logs go to stderr (stdout may carry usage records), filtered by
//! `RUST_LOG` (default `info`): human-readable lines, or one JSON object a
//! line with `TOLLGATE_LOG_FORMAT=json`, with the current span's fields
//! (the RPC, the account and the request id).
//!
//! Traces are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! names a collector (`http://host:4317`; off otherwise), as service
//! `OTEL_SERVICE_NAME` (default `tollgate`). Every RPC is a span
//! ([`grpc_span`]) that joins the caller's trace from its W3C
//! `traceparent` header.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// What must be flushed before the process exits.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// How the process logs and traces (read by `config::log_settings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// The log filter (`info` when unset or unreadable).
    pub filter: Option<String>,
    /// One JSON object a line, else text.
    pub json: bool,
    /// Where traces go over OTLP/gRPC, if anywhere.
    pub otlp_endpoint: Option<String>,
    /// The traces' service name.
    pub service_name: String,
}

/// Installs the global subscriber (and the trace exporter, if configured).
/// Call once, from `main`, inside the Tokio runtime.
pub fn init(settings: &LogSettings) -> Telemetry {
    let filter = settings
        .filter
        .as_deref()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = settings.json;
    let service = settings.service_name.as_str();
    let (provider, problem) = match settings.otlp_endpoint.as_deref().map(|e| exporter(e, service)) {
        None => (None, None),
        Some(Ok(provider)) => (Some(provider), None),
        Some(Err(e)) => (None, Some(e)),
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("tollgate")));
    let (json_logs, text_logs) = if json {
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr);
        (Some(layer), None)
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        (None, Some(layer))
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(json_logs)
        .with(text_logs)
        .with(otel)
        .init();
    match (&problem, &settings.otlp_endpoint) {
        (Some(e), Some(endpoint)) => tracing::error!(endpoint, error = %e, "traces not exported"),
        (None, Some(endpoint)) => tracing::info!(endpoint, "exporting traces over OTLP"),
        _ => {}
    }
    Telemetry { provider }
}

/// A batch exporter to the OTLP/gRPC collector at `endpoint`.
fn exporter(endpoint: &str, service: &str) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(5))
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service.to_owned()).build())
        .build())
}

impl Telemetry {
    /// Flushes and stops the trace exporter (its batch processor blocks on
    /// the export, so off the async workers).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ =
                tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(std::time::Duration::from_secs(3)))
                    .await;
        }
    }
}

/// Reads W3C trace context from HTTP headers (gRPC metadata).
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The span of one RPC (for `Server::trace_fn`): named after its method,
/// a child of the caller's span when the request carries `traceparent`,
/// with the account and request id recorded by the handler.
pub fn grpc_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    let method = path.rsplit('/').next().unwrap_or(path);
    let span = tracing::info_span!(
        "rpc",
        otel.name = %method,
        otel.kind = "server",
        rpc.method = %path,
        account = tracing::field::Empty,
        request_id = tracing::field::Empty,
    );
    // A span nothing records (no subscriber wants it) joins nothing.
    if !span.is_disabled() {
        let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
        // Without the OpenTelemetry layer (traces off) there is nothing to
        // join either.
        let _ = span.set_parent(parent);
    }
    span
}

/// Records the account and request (or reservation) id on the current
/// RPC's span.
pub fn note_ids(account: &str, request_id: &str) {
    let span = tracing::Span::current();
    span.record("account", account);
    if !request_id.is_empty() {
        span.record("request_id", request_id);
    }
}
