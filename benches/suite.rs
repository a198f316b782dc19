//! Tollgate against the floor it cannot beat, in one run: the empty
//! baseline service (the same API on the same stack, doing nothing) and a
//! memory-backed Tollgate, each driven by the same load generator over TCP
//! and over a Unix socket, at 1 and 64 concurrent connections, measured in
//! alternating turns. Prints the table of figures and ratios against the
//! targets, writes every report to `target/bench/suite.json`, and draws
//! the latency distributions to `docs/latency.png`.
//!
//! Run: `cargo bench --bench suite`.

#![allow(clippy::unwrap_used, missing_docs)]

mod harness;

use std::time::Duration;

use tollgate::cli::loadgen::serve_baseline;
use tollgate::cli::loadgen::{Mix, Report, Spec, run};

const TURN: Duration = Duration::from_secs(3);
const TURNS: usize = 2;

fn spec(target: &str, connections: usize) -> Spec {
    Spec {
        target: target.to_owned(),
        connections,
        duration: TURN,
        calls: None,
        accounts: (0..4).map(|i| format!("a{i}")).collect(),
        mix: Mix::Hot(0.5),
        model: harness::MODEL.into(),
        rls_domain: None,
        progress: false,
    }
}

/// Sums turns: calls and seconds add up; percentiles are the turns' worst.
fn combine(reports: &[Report]) -> (f64, u64, u64) {
    let calls: u64 = reports.iter().map(|r| r.calls).sum();
    let seconds: f64 = reports.iter().map(|r| r.seconds).sum();
    let p50 = reports.iter().map(|r| r.latency_us.p50).max().unwrap_or(0);
    let p99 = reports.iter().map(|r| r.latency_us.p99).max().unwrap_or(0);
    (calls as f64 / seconds, p50, p99)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("suite: bench");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        // The baseline, on TCP and a Unix socket.
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let baseline_tcp = format!("http://{}", tcp.local_addr().unwrap());
        let baseline_sock = dir.path().join("baseline.sock");
        let unix = tokio::net::UnixListener::bind(&baseline_sock).unwrap();
        tokio::spawn(serve_baseline(tcp, Some(unix), std::future::pending()));
        // Tollgate on the memory store, on TCP and a Unix socket.
        let tollgate_sock = dir.path().join("tollgate.sock");
        let mut settings = harness::settings(["a0", "a1", "a2", "a3"], &dir.path().join("usage.jsonl"));
        settings.listen_unix = Some(tollgate_sock.clone());
        let tollgate_tcp = harness::serve(settings).await.url;

        let cases = [
            ("TCP", 1, baseline_tcp.clone(), tollgate_tcp.clone()),
            ("TCP", 64, baseline_tcp, tollgate_tcp),
            ("UDS", 1, format!("unix:{}", baseline_sock.display()), format!("unix:{}", tollgate_sock.display())),
            ("UDS", 64, format!("unix:{}", baseline_sock.display()), format!("unix:{}", tollgate_sock.display())),
        ];
        let mut all = Vec::new();
        println!("\n{TURNS} alternating turns of {TURN:?} per side and case; latency per call in µs\n");
        println!("| transport | connections | baseline calls/s | Tollgate calls/s | throughput ratio (≥ 0.8) | baseline p50 / p99 | Tollgate p50 / p99 | p99 ratio (≤ 1.25) |");
        println!("|---|---|---|---|---|---|---|---|");
        for (transport, connections, baseline, tollgate) in cases {
            run(&spec(&tollgate, connections)).await.unwrap(); // warm-up
            let (mut b, mut t) = (Vec::new(), Vec::new());
            for _ in 0..TURNS {
                b.push(run(&spec(&baseline, connections)).await.unwrap());
                t.push(run(&spec(&tollgate, connections)).await.unwrap());
            }
            let (b_rate, b_p50, b_p99) = combine(&b);
            let (t_rate, t_p50, t_p99) = combine(&t);
            println!(
                "| {transport} | {connections} | {b_rate:.0} | {t_rate:.0} | {:.2} | {b_p50} / {b_p99} | {t_p50} / {t_p99} | {:.2} |",
                t_rate / b_rate,
                t_p99 as f64 / b_p99 as f64
            );
            all.push(serde_json::json!({
                "transport": transport,
                "connections": connections,
                "baseline": b,
                "tollgate": t,
                "throughput_ratio": t_rate / b_rate,
                "p99_ratio": t_p99 as f64 / b_p99 as f64,
            }));
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        plot(&all, &root.join("docs/latency.png"));
        let out = root.join("target/bench");
        std::fs::create_dir_all(&out).unwrap();
        let path = out.join("suite.json");
        std::fs::write(&path, serde_json::to_string_pretty(&all).unwrap()).unwrap();
        println!("\nreports: {}", path.display());
    });
}

/// Latency against percentile (log scale towards the tail), one line per
/// case and side: Tollgate solid and dark, the baseline light.
fn plot(results: &[serde_json::Value], path: &std::path::Path) {
    use plotters::prelude::*;
    plotters::style::register_font("sans-serif", FontStyle::Normal, include_bytes!("fonts/DejaVuSans.ttf"))
        .map_err(|_| "font")
        .unwrap();
    // x = -log10(1 - p): 0 is the minimum... 3 is p99.9.
    let x_of = |p: f64| -(1.0 - p).max(1e-4).log10();
    let mut series = Vec::new();
    let mut top = 1u64;
    for r in results {
        let case = format!("{} x{}", r["transport"].as_str().unwrap(), r["connections"]);
        for side in ["baseline", "tollgate"] {
            let points: Vec<(f64, u64)> = r[side][0]["distribution"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|pt| {
                    let (us, p) = (pt[0].as_u64()?, pt[1].as_f64()?);
                    (p < 0.9999).then_some((x_of(p), us))
                })
                .collect();
            top = top.max(points.iter().map(|p| p.1).max().unwrap_or(0));
            series.push((format!("{case} {side}"), side == "tollgate", points));
        }
    }
    let root = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency per call: Tollgate against the empty gRPC baseline",
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..3.05f64, (1u64..top * 12 / 10).log_scale())
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("microseconds (log)")
        .x_labels(4)
        .x_label_formatter(&|x| format!("p{}", (100.0 * (1.0 - 10f64.powf(-x)) * 10.0).round() / 10.0))
        .draw()
        .unwrap();
    let colors = [RED, BLUE, GREEN, MAGENTA];
    for (i, (name, solid, points)) in series.into_iter().enumerate() {
        let base = colors[(i / 2) % colors.len()];
        let style = if solid {
            base.stroke_width(3)
        } else {
            base.mix(0.35).stroke_width(2)
        };
        chart
            .draw_series(LineSeries::new(points, style))
            .unwrap()
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .unwrap();
    root.present().unwrap();
}
