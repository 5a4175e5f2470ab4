//! Passes on a timer: the reconcilers' loop.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runs `pass` every `interval` until `shutdown`; a failed pass is logged (as `what`) and the next one tries again.
/// A pass is not interrupted half-way: its claims are already scheduled, so finishing it beats leaving its rows for
/// the next delay. Ticks missed during a long pass are not caught up.
pub(crate) async fn every<F, Fut, T, E>(interval: Duration, shutdown: CancellationToken, what: &str, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = pass().await {
            tracing::warn!(error = %e, "{what} failed");
        }
    }
}
