DROP INDEX third_payment_reconcile_first;
DROP INDEX third_payment_reconcile_due;
ALTER TABLE third_payment DROP COLUMN next_reconcile_time, DROP COLUMN reconcile_attempts;
