-- The timeout closer's memory of orders it could not close: how often it tried, when it may try again (growing
-- delays, so one order WeChat keeps refusing cannot cost thousands of WeChat calls a day nor fill every pass), and,
-- past a number of attempts that cannot be a passing outage, why a person must look at it. An order that needs a
-- person leaves the closer's passes until `paystream attention resolve` gives it back. Rows exist only for orders
-- a pass could not close.
CREATE TABLE order_close_attempt (
  order_sn          text PRIMARY KEY REFERENCES homestay_order (sn) ON DELETE CASCADE,
  attempts          int NOT NULL DEFAULT 0,
  retry_at          timestamptz NOT NULL,
  last_reason       text NOT NULL,
  attention_reason  text,
  attention_since   timestamptz,
  CHECK ((attention_reason IS NULL) = (attention_since IS NULL))
);
CREATE INDEX order_close_attempt_attention ON order_close_attempt (attention_since) WHERE attention_since IS NOT NULL;
