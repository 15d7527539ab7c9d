//! Active health checking: every `interval`, `GET <path>` on each endpoint of a pool, in
//! parallel, each bounded by `timeout`. A 2xx counts as a success; anything else (error,
//! timeout, other status) as a failure. Thresholds of consecutive results flip the state,
//! so one slow answer does not take an instance out, and one lucky answer does not bring a
//! broken one back.

use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http_body_util::{BodyExt, Limited};
use tokio_util::sync::CancellationToken;

use super::{Outgoing, Upstream};

/// Runs the checks of `upstream` until `shutdown`. Does nothing when checks are disabled.
pub fn spawn(upstream: Arc<Upstream>, shutdown: CancellationToken) {
    let cfg = upstream.config.health_check.clone();
    if !cfg.enabled || upstream.endpoints.is_empty() {
        return;
    }
    let Ok(path) = PathAndQuery::try_from(cfg.path.as_str()) else {
        tracing::error!(upstream = &*upstream.name, path = %cfg.path, "invalid health check path; checks disabled");
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static("passerelle-health-check"),
    );
    tokio::spawn(async move {
        let client = upstream.new_client();
        let mut tick = tokio::time::interval(cfg.interval.get());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Registry slots out of the pool are not probed: no instance is there.
            let members: Vec<(usize, &super::Endpoint)> = upstream
                .endpoints
                .iter()
                .enumerate()
                .filter(|(_, e)| e.is_member())
                .collect();
            let checks = members.iter().map(|&(i, e)| {
                let client = client.clone();
                let out = Outgoing {
                    method: Method::GET,
                    path_and_query: path.clone(),
                    headers: headers.clone(),
                    body: Bytes::new(),
                };
                async move {
                    let probe = async {
                        let res = client
                            .send(i, e, &out, std::time::Instant::now())
                            .await
                            .ok()?;
                        let ok = res.status().is_success();
                        // Reading the (small) body to its end lets the connection be reused.
                        Limited::new(res.into_body(), 64 * 1024)
                            .collect()
                            .await
                            .ok()?;
                        Some(ok)
                    };
                    matches!(
                        tokio::time::timeout(cfg.timeout.get(), probe).await,
                        Ok(Some(true))
                    )
                }
            });
            let results = futures_util::future::join_all(checks).await;
            for ((_, e), ok) in members.iter().zip(results) {
                match e.record_health(ok, cfg.healthy_threshold, cfg.unhealthy_threshold) {
                    Some(true) => {
                        tracing::info!(upstream = &*upstream.name, endpoint = %e.address(), "endpoint healthy again")
                    }
                    Some(false) => {
                        tracing::warn!(upstream = &*upstream.name, endpoint = %e.address(), "endpoint failed its health checks")
                    }
                    None => {}
                }
                // Refreshed every round: an ejection that expired changes availability too.
                upstream.publish_health(e);
            }
        }
    });
}
