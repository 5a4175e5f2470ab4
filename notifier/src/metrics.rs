//! The notifier's metrics, declared once, labelled by channel and outcome only (never a user, order or openid).

use std::sync::OnceLock;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// Every outcome label value, so dashboards see each series from the start.
pub const OUTCOMES: [&str; 7] = ["sent", "refused_by_user", "invalid", "suppressed", "retrying", "failed", "duplicate"];
pub const CHANNELS: [&str; 2] = ["miniprogram", "sms"];

struct Metrics {
    notifications: IntCounterVec,
    send_seconds: HistogramVec,
}

fn m() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let r = observability::registry();
        let notifications = IntCounterVec::new(
            Opts::new(
                "notifications_total",
                "Notification deliveries by channel and outcome (sent, refused_by_user, invalid, suppressed, \
                 retrying, failed, duplicate)",
            ),
            &["channel", "outcome"],
        )
        .expect("valid metric");
        let send_seconds = HistogramVec::new(
            HistogramOpts::new("notification_send_seconds", "Time of one provider call (WeChat or Tencent SMS)")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["channel"],
        )
        .expect("valid metric");
        r.register(Box::new(notifications.clone())).expect("notifier metrics are registered once");
        r.register(Box::new(send_seconds.clone())).expect("notifier metrics are registered once");
        for c in CHANNELS {
            for o in OUTCOMES {
                notifications.with_label_values(&[c, o]);
            }
            send_seconds.with_label_values(&[c]);
        }
        Metrics { notifications, send_seconds }
    })
}

pub(crate) fn outcome(channel: &str, outcome: &str) {
    m().notifications.with_label_values(&[channel, outcome]).inc();
}

pub(crate) fn send_seconds(channel: &str, secs: f64) {
    m().send_seconds.with_label_values(&[channel]).observe(secs);
}

/// Makes the notifier's metric families appear in `/metrics` at zero before the first message.
pub fn register() {
    let _ = m();
}
