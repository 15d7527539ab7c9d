//! Structured logs through `tracing`: human-readable text by default, JSON lines on option.
//! `RUST_LOG` overrides the configured filter, as Rust operators expect.
//!
//! Text logs are coloured only for a person reading a terminal: when stderr is a file, a
//! pipe or a log collector (journald, `docker logs`, a test capturing output), escape codes
//! would only be noise to grep through, so they are left out; and `NO_COLOR` set to anything
//! non-empty turns them off everywhere (<https://no-color.org>).

use std::ffi::OsStr;
use std::io::IsTerminal;

use passerelle_config::{LogFormat, TelemetryConfig};
use tracing_subscriber::EnvFilter;

#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {reason}")]
pub struct TelemetryError {
    pub filter: String,
    pub reason: String,
}

/// Whether log lines may carry ANSI colour: only when stderr is a terminal and `NO_COLOR`
/// (its value, if set) is unset or empty. A pure function of the two facts, so it can be
/// tested without a terminal.
pub fn use_ansi(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
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
    let ansi = use_ansi(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_for_a_terminal_without_no_color() {
        let set = |v: &'static str| Some(OsStr::new(v));
        assert!(use_ansi(true, None), "a terminal, nothing said");
        assert!(use_ansi(true, set("")), "NO_COLOR empty counts as unset");
        assert!(!use_ansi(true, set("1")));
        assert!(!use_ansi(true, set("0")), "any non-empty value, even 0");
        assert!(!use_ansi(false, None), "a pipe or a file");
        assert!(!use_ansi(false, set("")));
        assert!(!use_ansi(false, set("1")));
    }
}
