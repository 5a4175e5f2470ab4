-- Reconciliation: how often WeChat was asked about a waiting payment, and when to ask next. The reconciler claims
-- due payments with FOR UPDATE SKIP LOCKED and moves next_reconcile_time forward before it asks, so replicas never
-- ask about the same payment at once and a crash does not ask again at once.
ALTER TABLE third_payment
  ADD COLUMN reconcile_attempts  smallint NOT NULL DEFAULT 0,
  ADD COLUMN next_reconcile_time timestamptz;  -- NULL: never asked (due at prepay_time + the first delay), or done
-- payments already asked about, by when they are due again
CREATE INDEX third_payment_reconcile_due ON third_payment (next_reconcile_time) WHERE pay_status = 0;
-- payments never asked about, by prepay time (their first due time is prepay_time + the first delay)
CREATE INDEX third_payment_reconcile_first ON third_payment (prepay_time)
  WHERE pay_status = 0 AND next_reconcile_time IS NULL AND reconcile_attempts = 0 AND prepay_time IS NOT NULL;
