//! Structured logs through `tracing`: human-readable text by default, JSON lines on option.
//! `RUST_LOG` overrides the configured filter, as Rust operators expect.

use passerelle_config::{LogFormat, TelemetryConfig};
use tracing_subscriber::EnvFilter;

#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {reason}")]
pub struct TelemetryError {
    pub filter: String,
    pub reason: String,
}

/// Installs the global subscriber. Calling it again (tests, `up` in one process) is a no-op.
pub fn init(cfg: &TelemetryConfig) -> Result<(), TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => f,
        _ => cfg.log_level.clone(),
    };
    let env_filter = EnvFilter::try_new(&filter).map_err(|e| TelemetryError {
        filter: filter.clone(),
        reason: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.with_target(true).try_init(),
    };
    Ok(())
}
