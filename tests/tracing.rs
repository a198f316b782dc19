//! Trace context: each RPC is a span that joins the caller's trace from
//! its W3C `traceparent` header, named after the method and carrying the
//! account and request id; exported here to an in-process exporter. (One
//! test in this binary: it installs the process's subscriber.)

#![allow(clippy::unwrap_used)]

mod support;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use support::reserve;
use tracing_subscriber::layer::SubscriberExt;

/// The finished spans named `name`, waiting up to five seconds for `n`.
async fn spans(provider: &SdkTracerProvider, exporter: &InMemorySpanExporter, name: &str, n: usize) -> Vec<SpanData> {
    for _ in 0..100 {
        provider.force_flush().unwrap();
        let found: Vec<SpanData> = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| s.name == name)
            .collect();
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} {name} spans");
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_span_joins_the_callers_trace_and_names_the_account() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let mut app = support::spawn_app().await;

    let mut call = tonic::Request::new(reserve("rich", "traced-1", 10, 10));
    call.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    app.quota.reserve(call).await.unwrap();
    let span = spans(&provider, &exporter, "Reserve", 1).await.remove(0);
    assert_eq!(
        span.span_context.trace_id(),
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
    );
    assert_eq!(span.parent_span_id, SpanId::from_hex("00f067aa0ba902b7").unwrap());
    assert!(span.parent_span_is_remote);
    assert_eq!(attribute(&span, "account").as_deref(), Some("rich"));
    assert_eq!(attribute(&span, "request_id").as_deref(), Some("traced-1"));

    // Without trace context, a trace of its own.
    app.quota.reserve(reserve("rich", "traced-2", 10, 10)).await.unwrap();
    let both = spans(&provider, &exporter, "Reserve", 2).await;
    let own = both
        .iter()
        .find(|s| attribute(s, "request_id").as_deref() == Some("traced-2"))
        .unwrap();
    assert_eq!(own.parent_span_id, SpanId::INVALID);
    assert_ne!(own.span_context.trace_id(), span.span_context.trace_id());
    app.shutdown().await;
}
