-- paystream schema: looklook's tables and meanings, with money in fen (bigint), times as timestamptz and the
-- invariants the flow relies on enforced here, not only in code.

CREATE FUNCTION paystream_touch_update_time() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.update_time := now();
  RETURN NEW;
END $$;

-- Users and how they log in ---------------------------------------------------------------------------------------
CREATE TABLE "user" (
  id            bigserial PRIMARY KEY,
  create_time   timestamptz NOT NULL DEFAULT now(),
  update_time   timestamptz NOT NULL DEFAULT now(),
  mobile        text UNIQUE CHECK (mobile ~ '^\+?[0-9]{5,20}$'),
  password_hash text,
  nickname      text NOT NULL DEFAULT '',
  sex           smallint NOT NULL DEFAULT 0 CHECK (sex IN (0, 1, 2)),
  avatar        text NOT NULL DEFAULT '',
  info          text NOT NULL DEFAULT ''
);

CREATE TABLE user_auth (
  id          bigserial PRIMARY KEY,
  create_time timestamptz NOT NULL DEFAULT now(),
  update_time timestamptz NOT NULL DEFAULT now(),
  user_id     bigint NOT NULL REFERENCES "user" (id) ON DELETE CASCADE,
  auth_type   text NOT NULL CHECK (auth_type IN ('system', 'wxMini')),
  auth_key    text NOT NULL CHECK (auth_key <> ''),
  CONSTRAINT user_auth_type_key_unique UNIQUE (auth_type, auth_key),
  CONSTRAINT user_auth_user_type_unique UNIQUE (user_id, auth_type)
);

-- What can be booked ----------------------------------------------------------------------------------------------
CREATE TABLE homestay (
  id                    bigserial PRIMARY KEY,
  create_time           timestamptz NOT NULL DEFAULT now(),
  update_time           timestamptz NOT NULL DEFAULT now(),
  title                 text NOT NULL CHECK (title <> ''),
  sub_title             text NOT NULL DEFAULT '',
  banner                text NOT NULL DEFAULT '',
  info                  text NOT NULL DEFAULT '',
  people_num            integer NOT NULL CHECK (people_num > 0),
  homestay_business_id  bigint NOT NULL DEFAULT 0,
  user_id               bigint NOT NULL DEFAULT 0,          -- the landlord
  row_state             smallint NOT NULL DEFAULT 0 CHECK (row_state IN (0, 1)), -- 0 unlisted, 1 listed
  row_type              smallint NOT NULL DEFAULT 0 CHECK (row_type IN (0, 1)),  -- 0 per night, 1 per person-night
  food_info             text NOT NULL DEFAULT '',
  food_price            bigint NOT NULL DEFAULT 0 CHECK (food_price >= 0),      -- fen
  homestay_price        bigint NOT NULL CHECK (homestay_price > 0),             -- fen
  market_homestay_price bigint NOT NULL DEFAULT 0 CHECK (market_homestay_price >= 0)
);

-- Orders: trade_state -1 cancelled, 0 waitPay, 1 waitUse, 2 used, 3 refunded, 4 expired --------------------------
CREATE TABLE homestay_order (
  id                    bigserial PRIMARY KEY,
  create_time           timestamptz NOT NULL DEFAULT now(),
  update_time           timestamptz NOT NULL DEFAULT now(),
  sn                    text NOT NULL CONSTRAINT homestay_order_sn_unique UNIQUE CHECK (sn ~ '^HSO[0-9]{22}$'),
  user_id               bigint NOT NULL REFERENCES "user" (id),
  homestay_id           bigint NOT NULL REFERENCES homestay (id),
  title                 text NOT NULL,
  sub_title             text NOT NULL DEFAULT '',
  cover                 text NOT NULL DEFAULT '',
  info                  text NOT NULL DEFAULT '',
  people_num            integer NOT NULL,
  row_type              smallint NOT NULL,
  need_food             boolean NOT NULL DEFAULT false,
  food_info             text NOT NULL DEFAULT '',
  food_price            bigint NOT NULL CHECK (food_price >= 0),
  homestay_price        bigint NOT NULL CHECK (homestay_price >= 0),
  market_homestay_price bigint NOT NULL DEFAULT 0,
  homestay_business_id  bigint NOT NULL DEFAULT 0,
  homestay_user_id      bigint NOT NULL DEFAULT 0,
  live_start_date       timestamptz NOT NULL,
  live_end_date         timestamptz NOT NULL,
  live_people_num       integer NOT NULL CHECK (live_people_num > 0),
  trade_state           smallint NOT NULL DEFAULT 0 CHECK (trade_state BETWEEN -1 AND 4),
  trade_code            text NOT NULL,
  remark                text NOT NULL DEFAULT '',
  order_total_price     bigint NOT NULL CHECK (order_total_price > 0),
  food_total_price      bigint NOT NULL CHECK (food_total_price >= 0),
  homestay_total_price  bigint NOT NULL CHECK (homestay_total_price > 0),
  pay_deadline          timestamptz NOT NULL,
  CHECK (live_end_date > live_start_date),
  CHECK (order_total_price = food_total_price + homestay_total_price)
);
-- "my orders", newest first, cursor-paged by id (optionally filtered by state)
CREATE INDEX homestay_order_user_page ON homestay_order (user_id, id DESC);
CREATE INDEX homestay_order_user_state_page ON homestay_order (user_id, trade_state, id DESC);
-- the timeout closer walks unpaid orders by deadline
CREATE INDEX homestay_order_unpaid_deadline ON homestay_order (pay_deadline) WHERE trade_state = 0;

-- Payments: pay_status -1 failed/closed, 0 waiting, 1 paid, 2 refunded ------------------------------------------
CREATE TABLE third_payment (
  id               bigserial PRIMARY KEY,
  create_time      timestamptz NOT NULL DEFAULT now(),
  update_time      timestamptz NOT NULL DEFAULT now(),
  sn               text NOT NULL CONSTRAINT third_payment_sn_unique UNIQUE CHECK (sn ~ '^PMT[0-9]{22}$'),
  user_id          bigint NOT NULL REFERENCES "user" (id),
  pay_mode         text NOT NULL DEFAULT 'WECHAT_PAY',
  trade_type       text NOT NULL DEFAULT '',
  trade_state      text NOT NULL DEFAULT '',                 -- WeChat's raw trade_state
  pay_total        bigint NOT NULL CHECK (pay_total > 0),    -- fen
  transaction_id   text CONSTRAINT third_payment_transaction_id_unique UNIQUE,
  trade_state_desc text NOT NULL DEFAULT '',
  order_sn         text NOT NULL REFERENCES homestay_order (sn),
  service_type     text NOT NULL CHECK (service_type IN ('homestayOrder')),
  pay_status       smallint NOT NULL DEFAULT 0 CHECK (pay_status BETWEEN -1 AND 2),
  pay_time         timestamptz,                              -- WeChat's success_time
  prepay_id        text,
  prepay_time      timestamptz,
  CHECK (pay_status <> 1 OR (pay_time IS NOT NULL AND transaction_id IS NOT NULL))
);
CREATE INDEX third_payment_order_sn ON third_payment (order_sn);
-- at most one open payment per order: prepay reuses it, so out_trade_no stays the same across retries
CREATE UNIQUE INDEX third_payment_one_open_per_order ON third_payment (order_sn) WHERE pay_status = 0;
-- reconciliation walks waiting payments by age
CREATE INDEX third_payment_waiting_by_age ON third_payment (create_time) WHERE pay_status = 0;

-- Refunds: one full refund per payment; sn doubles as WeChat's out_refund_no --------------------------------------
CREATE TABLE refund (
  id                bigserial PRIMARY KEY,
  create_time       timestamptz NOT NULL DEFAULT now(),
  update_time       timestamptz NOT NULL DEFAULT now(),
  sn                text NOT NULL CONSTRAINT refund_sn_unique UNIQUE CHECK (sn ~ '^RFD[0-9]{22}$'),
  payment_sn        text NOT NULL CONSTRAINT refund_payment_sn_unique UNIQUE REFERENCES third_payment (sn),
  order_sn          text NOT NULL REFERENCES homestay_order (sn),
  user_id           bigint NOT NULL REFERENCES "user" (id),
  reason            text NOT NULL CHECK (reason IN ('order_closed', 'user_requested')),
  refund_total      bigint NOT NULL CHECK (refund_total > 0),
  pay_total         bigint NOT NULL CHECK (pay_total > 0),
  status            smallint NOT NULL DEFAULT 0 CHECK (status IN (-1, 0, 1, 2)), -- -1 failed, 0 requested, 1 processing, 2 succeeded
  wechat_refund_id  text,
  wechat_status     text NOT NULL DEFAULT '',
  success_time      timestamptz,
  CHECK (refund_total <= pay_total)
);
CREATE INDEX refund_order_sn ON refund (order_sn);

-- Notifications: one row per logical message; the unique key makes a replay a no-op -----------------------------
CREATE TABLE notification (
  id              bigserial PRIMARY KEY,
  create_time     timestamptz NOT NULL DEFAULT now(),
  update_time     timestamptz NOT NULL DEFAULT now(),
  key             text NOT NULL CONSTRAINT notification_key_unique UNIQUE,
  channel         text NOT NULL CHECK (channel IN ('miniprogram', 'sms')),
  template        text NOT NULL,
  user_id         bigint NOT NULL REFERENCES "user" (id),
  order_sn        text,
  status          text NOT NULL CHECK (status IN ('claimed', 'sent', 'refused_by_user', 'invalid', 'suppressed', 'retrying', 'failed')),
  attempts        integer NOT NULL DEFAULT 0,
  provider_msg_id text,
  last_error      text,
  sent_time       timestamptz
);
CREATE INDEX notification_order_sn ON notification (order_sn);

-- Transactional outbox: written in the same transaction as the state change it announces -------------------------
CREATE TABLE outbox (
  id          bigserial PRIMARY KEY,
  event_id    uuid NOT NULL CONSTRAINT outbox_event_id_unique UNIQUE,
  aggregate   text NOT NULL,     -- events of one aggregate are published in id order
  subject     text NOT NULL,     -- logical subject, without the deployment prefix
  headers     jsonb NOT NULL DEFAULT '{}',
  payload     bytea NOT NULL,
  create_time timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX outbox_aggregate_id ON outbox (aggregate, id);

-- Wake relays as soon as a transaction that wrote to the outbox commits (NOTIFY is delivered on commit).
CREATE FUNCTION paystream_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('paystream_outbox', '');
  RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION paystream_outbox_notify();

-- Consumer inbox: keys that must stay unique for longer than JetStream's duplicate window -------------------------
CREATE TABLE processed_event (
  consumer       text NOT NULL,
  key            text NOT NULL,
  processed_time timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (consumer, key)
);

CREATE TRIGGER user_touch BEFORE UPDATE ON "user" FOR EACH ROW EXECUTE FUNCTION paystream_touch_update_time();
CREATE TRIGGER user_auth_touch BEFORE UPDATE ON user_auth FOR EACH ROW EXECUTE FUNCTION paystream_touch_update_time();
CREATE TRIGGER homestay_touch BEFORE UPDATE ON homestay FOR EACH ROW EXECUTE FUNCTION paystream_touch_update_time();
CREATE TRIGGER homestay_order_touch BEFORE UPDATE ON homestay_order FOR EACH ROW EXECUTE FUNCTION paystream_touch_update_time();
CREATE TRIGGER third_payment_touch BEFORE UPDATE ON third_payment FOR EACH ROW EXECUTE FUNCTION paystream_touch_update_time();
CREATE TRIGGER refund_touch BEFORE UPDATE ON refund FOR EACH ROW EXECUTE FUNCTION paystream_touch_update_time();
CREATE TRIGGER notification_touch BEFORE UPDATE ON notification FOR EACH ROW EXECUTE FUNCTION paystream_touch_update_time();
