//! The versioned event envelope every message carries, and the headers that go with it.

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::topology::Subject;

/// Header names, in one place.
pub mod headers {
    /// JetStream's de-duplication key: the event id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// `<type>.v<version>` of the payload.
    pub const EVENT_TYPE: &str = "Paystream-Event-Type";
    /// W3C trace context of the code that produced the event.
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    /// Dead-letter metadata.
    pub const DLQ_REASON: &str = "Paystream-Dlq-Reason";
    pub const DLQ_CONSUMER: &str = "Paystream-Dlq-Consumer";
    pub const DLQ_SUBJECT: &str = "Paystream-Dlq-Subject";
    pub const DLQ_STREAM: &str = "Paystream-Dlq-Stream";
    pub const DLQ_STREAM_SEQ: &str = "Paystream-Dlq-Stream-Seq";
    pub const DLQ_DELIVERIES: &str = "Paystream-Dlq-Deliveries";
    pub const DLQ_FAILED_AT: &str = "Paystream-Dlq-Failed-At";
    pub const DLQ_ORIGINAL_MSG_ID: &str = "Paystream-Dlq-Original-Msg-Id";
}

/// A payload type that travels on the bus. The type name, version and subject are part of the contract: a
/// consumer refuses (dead-letters) an envelope of another type or of a newer major version it cannot read.
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    const TYPE: &'static str;
    const VERSION: u16;
    const SUBJECT: Subject;

    /// Events of one aggregate (e.g. `payment:PMT…`) are relayed in the order they were written.
    fn aggregate(&self) -> String;
}

/// What is on the wire: `{"id","type","version","occurred_at","traceparent"?,"payload"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// The event id; also the `Nats-Msg-Id`, so a re-publish of the same event inside the duplicate window is
    /// dropped by JetStream, and the `processed_event` key after it.
    pub id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u16,
    pub occurred_at: DateTime<Utc>,
    /// The producer's W3C trace context, kept with the event so that a replay from the DLQ still joins its trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub payload: T,
}

impl<E: Event> Envelope<E> {
    /// A new event with a fresh time-ordered id (UUIDv7).
    pub fn new(payload: E) -> Self {
        Self::with_id(Uuid::now_v7(), payload)
    }

    /// An event whose id is derived from what it describes (e.g. WeChat's notification id), so the same fact
    /// reported twice is the same event. It carries the trace context of the span it is created in, so whoever
    /// consumes it continues that trace.
    pub fn with_id(id: Uuid, payload: E) -> Self {
        Envelope {
            id,
            event_type: E::TYPE.to_owned(),
            version: E::VERSION,
            occurred_at: Utc::now(),
            traceparent: observability::trace::current_traceparent(),
            payload,
        }
    }

    pub fn traced(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("events serialise: they are plain data")
    }

    /// The NATS headers this event is published with.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, self.id.to_string().as_str());
        h.insert(headers::EVENT_TYPE, format!("{}.v{}", self.event_type, self.version).as_str());
        if let Some(tp) = &self.traceparent {
            h.insert(headers::TRACEPARENT, tp.as_str());
        }
        h
    }

    /// Decodes and checks type and version: anything else is poison for this consumer.
    pub fn decode(bytes: &[u8]) -> Result<Envelope<E>, String> {
        let env: Envelope<serde_json::Value> =
            serde_json::from_slice(bytes).map_err(|e| format!("undecodable envelope: {e}"))?;
        if env.event_type != E::TYPE {
            return Err(format!("unexpected event type {:?}, this consumer reads {:?}", env.event_type, E::TYPE));
        }
        if env.version > E::VERSION {
            return Err(format!("event version {} is newer than {} that this consumer reads", env.version, E::VERSION));
        }
        let payload =
            serde_json::from_value(env.payload).map_err(|e| format!("undecodable {} payload: {e}", E::TYPE))?;
        Ok(Envelope {
            id: env.id,
            event_type: env.event_type,
            version: env.version,
            occurred_at: env.occurred_at,
            traceparent: env.traceparent,
            payload,
        })
    }
}

/// A UUID derived from a name (v5), for events whose identity comes from outside (WeChat's notification id).
pub fn derived_id(namespace: &str, name: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("paystream:{namespace}:{name}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u32,
    }
    impl Event for Ping {
        const TYPE: &'static str = "ping";
        const VERSION: u16 = 1;
        const SUBJECT: Subject = Subject::OrderStatus;
        fn aggregate(&self) -> String {
            "ping".into()
        }
    }

    #[test]
    fn round_trips_and_refuses_foreign_or_newer_events() {
        let env = Envelope::new(Ping { n: 7 }).traced(Some("00-abc-def-01".into()));
        let back = Envelope::<Ping>::decode(&env.to_bytes()).unwrap();
        assert_eq!(back, env);
        assert_eq!(env.headers().get(headers::MSG_ID).unwrap().as_str(), env.id.to_string());

        let mut other = serde_json::to_value(&env).unwrap();
        other["type"] = "pong".into();
        assert!(
            Envelope::<Ping>::decode(&serde_json::to_vec(&other).unwrap())
                .unwrap_err()
                .contains("unexpected event type")
        );
        other["type"] = "ping".into();
        other["version"] = 2.into();
        assert!(Envelope::<Ping>::decode(&serde_json::to_vec(&other).unwrap()).unwrap_err().contains("newer"));
        assert!(Envelope::<Ping>::decode(b"\xff\x00not json").is_err());
        assert!(Envelope::<Ping>::decode(br#"{"id":"00000000-0000-0000-0000-000000000000","type":"ping","version":1,"occurred_at":"2026-01-01T00:00:00Z","payload":{"n":"x"}}"#).is_err());
    }

    #[test]
    fn derived_ids_are_stable() {
        assert_eq!(derived_id("wechat", "abc"), derived_id("wechat", "abc"));
        assert_ne!(derived_id("wechat", "abc"), derived_id("wechat", "abd"));
    }
}
