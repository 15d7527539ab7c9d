//! Active health checking: every `interval`, `GET <path>` on each endpoint of a pool, in
//! parallel, each bounded by `timeout`. A 2xx counts as a success; anything else (error,
//! timeout, other status) as a failure. Thresholds of consecutive results flip the state,
//! so one slow answer does not take an instance out, and one lucky answer does not bring a
//! broken one back.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Full;
use tokio_util::sync::CancellationToken;

use super::Upstream;

/// Runs the checks of `upstream` until `shutdown`. Does nothing when checks are disabled.
pub fn spawn(upstream: Arc<Upstream>, shutdown: CancellationToken) {
    let cfg = upstream.config.health_check.clone();
    if !cfg.enabled || upstream.endpoints.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(cfg.interval.get());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let checks = upstream.endpoints.iter().map(|e| {
                let uri = format!("http://{}{}", e.address, cfg.path);
                let client = upstream.client().clone();
                async move {
                    let Ok(uri) = uri.parse::<Uri>() else {
                        return false;
                    };
                    let mut req = Request::new(Full::new(Bytes::new()));
                    *req.uri_mut() = uri;
                    req.headers_mut().insert(
                        http::header::USER_AGENT,
                        http::HeaderValue::from_static("passerelle-health-check"),
                    );
                    matches!(
                        tokio::time::timeout(cfg.timeout.get(), client.request(req)).await,
                        Ok(Ok(res)) if res.status().is_success()
                    )
                }
            });
            let results = futures_util::future::join_all(checks).await;
            for (e, ok) in upstream.endpoints.iter().zip(results) {
                match e.record_health(ok, cfg.healthy_threshold, cfg.unhealthy_threshold) {
                    Some(true) => {
                        tracing::info!(upstream = &*upstream.name, endpoint = %e.address, "endpoint healthy again")
                    }
                    Some(false) => {
                        tracing::warn!(upstream = &*upstream.name, endpoint = %e.address, "endpoint failed its health checks")
                    }
                    None => {}
                }
                // Refreshed every round: an ejection that expired changes availability too.
                upstream.publish_health(e);
            }
        }
    });
}
