-- Refunds WeChat has not settled yet, by when they last changed: the refund reconciler asks WeChat about those
-- untouched for a while (claiming one touches update_time, so replicas never ask about the same refund at once).
CREATE INDEX refund_open_by_update ON refund (update_time) WHERE status IN (0, 1);
