DROP TABLE order_close_attempt;
