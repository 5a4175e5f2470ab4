-- A row NATS refuses for good (today: larger than the server's max_payload) is parked with the reason instead of
-- failing its relay's batch for ever: relays skip an aggregate whose oldest row is parked (so its later events wait
-- behind it and its order holds) and every other aggregate keeps flowing. `paystream outbox retry` unparks.
ALTER TABLE outbox ADD COLUMN parked_at timestamptz, ADD COLUMN parked_reason text;
CREATE INDEX outbox_parked ON outbox (id) WHERE parked_at IS NOT NULL;
