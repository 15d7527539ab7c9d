//! Prometheus metrics for the whole process.
//!
//! The `metrics` facade is global by design (any crate can record without plumbing a
//! registry through), so the recorder is installed once per process; every role's
//! `/metrics` renders it. Histogram samples are buffered until rendered, so an upkeep task
//! folds them into buckets periodically even when nobody scrapes: memory stays bounded.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets (seconds) from 100µs to 10s: gateway hops are sub-millisecond, timeouts
/// are seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Installs the process-wide recorder (idempotent) and returns its handle. Must be called
/// from within a Tokio runtime the first time, for the upkeep task.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_bytes".into()),
                        &[256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0],
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by a test harness); then our
            // handle renders an empty registry, which is still a valid exposition.
            let _ = metrics::set_global_recorder(recorder);
            let h = handle.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        tick.tick().await;
                        h.run_upkeep();
                    }
                });
            }
            handle
        })
        .clone()
}

/// The current metrics in Prometheus text format.
pub fn render() -> String {
    install().render()
}
