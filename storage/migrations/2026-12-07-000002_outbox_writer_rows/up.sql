-- Rows their writer publishes itself right after the commit (bus::Outbox::transaction). Relays leave such a row
-- alone until it is older than outbox.sweep_after (its writer died between commit and publish, or NATS refused
-- it); without the mark they raced every writer and published about half of all rows a second time under load.
ALTER TABLE outbox ADD COLUMN fast boolean NOT NULL DEFAULT false;
