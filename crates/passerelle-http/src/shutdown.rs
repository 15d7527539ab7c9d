//! Shutdown signalling. Roles take any `Future<Output = ()>` as their shutdown trigger
//! (mini-redis style): the binary passes [`signal`], tests pass a oneshot or a token they
//! cancel. Inside a role the trigger becomes a [`CancellationToken`] so that many tasks
//! (accept loop, health checkers, background refreshers) can observe it.

pub use tokio_util::sync::CancellationToken;

/// Resolves on the first SIGINT or SIGTERM (Ctrl-C in a terminal, `kill` from a supervisor).
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops this process");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// A token cancelled when `trigger` resolves (or earlier, by whoever holds a clone).
pub fn token_from(trigger: impl Future<Output = ()> + Send + 'static) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = trigger => t.cancel(),
            _ = t.cancelled() => {}
        }
    });
    token
}
