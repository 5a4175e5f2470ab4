DROP TABLE processed_event, outbox, notification, refund, third_payment, homestay_order, homestay, user_auth, "user";
DROP FUNCTION paystream_outbox_notify();
DROP FUNCTION paystream_touch_update_time();
