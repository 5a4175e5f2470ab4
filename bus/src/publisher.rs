//! Publishing with `Nats-Msg-Id` and an awaited PubAck: nothing is reported as sent that JetStream has not stored.

use std::sync::Arc;

use async_nats::{
    HeaderMap,
    jetstream::{self, context::PublishErrorKind, message::PublishMessage, publish::PublishAck},
};
use bytes::Bytes;

use crate::{BusError, envelope::Envelope, envelope::Event, metrics, topology::Topology};

/// Publishes events of one deployment. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    topology: Arc<Topology>,
}

impl Publisher {
    pub fn new(js: jetstream::Context, topology: Arc<Topology>) -> Self {
        Publisher { js, topology }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Publishes directly (no outbox) and waits for JetStream to store it. For facts that have no database
    /// transaction to ride with, such as a verified WeChat callback.
    pub async fn publish<E: Event>(&self, env: &Envelope<E>) -> Result<PublishAck, BusError> {
        self.publish_raw(&self.topology.subject(E::SUBJECT), env.headers(), Bytes::from(env.to_bytes())).await
    }

    /// Publishes prepared bytes and headers (the headers must carry `Nats-Msg-Id`).
    pub async fn publish_raw(&self, subject: &str, headers: HeaderMap, payload: Bytes) -> Result<PublishAck, BusError> {
        let ack = self.send(subject, headers, payload).await?.await.map_err(publish_error)?;
        metrics::published(self.topology.logical(subject).unwrap_or(subject), ack.duplicate);
        Ok(ack)
    }

    /// Sends without waiting for the PubAck; the returned future resolves to it. Lets a batch be pipelined.
    pub(crate) async fn send(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, BusError> {
        self.js
            .send_publish(subject.to_owned(), PublishMessage::build().headers(headers).payload(payload))
            .await
            .map_err(publish_error)
    }
}

pub(crate) fn publish_error(e: jetstream::context::PublishError) -> BusError {
    match e.kind() {
        // A message that can never be stored is a bug to surface, not an outage to wait out.
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => BusError::Nats(e.to_string()),
        // Timeouts, broken connections and "no responders" while JetStream restarts: try again later.
        _ => BusError::Unavailable(e.to_string()),
    }
}
