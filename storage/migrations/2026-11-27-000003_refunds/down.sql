DROP INDEX IF EXISTS refund_open_by_update;
