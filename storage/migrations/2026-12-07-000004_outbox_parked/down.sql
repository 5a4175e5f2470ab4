DROP INDEX outbox_parked;
ALTER TABLE outbox DROP COLUMN parked_reason, DROP COLUMN parked_at;
