//! Diesel's view of the tables created by `migrations/`. Written by hand to match the SQL exactly; the
//! `schema_matches_database` test checks every column against a migrated database.

diesel::table! {
    #[sql_name = "user"]
    users (id) {
        id -> Int8,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
        mobile -> Nullable<Text>,
        password_hash -> Nullable<Text>,
        nickname -> Text,
        sex -> Int2,
        avatar -> Text,
        info -> Text,
    }
}

diesel::table! {
    user_auth (id) {
        id -> Int8,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
        user_id -> Int8,
        auth_type -> Text,
        auth_key -> Text,
    }
}

diesel::table! {
    homestay (id) {
        id -> Int8,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
        title -> Text,
        sub_title -> Text,
        banner -> Text,
        info -> Text,
        people_num -> Int4,
        homestay_business_id -> Int8,
        user_id -> Int8,
        row_state -> Int2,
        row_type -> Int2,
        food_info -> Text,
        food_price -> Int8,
        homestay_price -> Int8,
        market_homestay_price -> Int8,
    }
}

diesel::table! {
    homestay_order (id) {
        id -> Int8,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
        sn -> Text,
        user_id -> Int8,
        homestay_id -> Int8,
        title -> Text,
        sub_title -> Text,
        cover -> Text,
        info -> Text,
        people_num -> Int4,
        row_type -> Int2,
        need_food -> Bool,
        food_info -> Text,
        food_price -> Int8,
        homestay_price -> Int8,
        market_homestay_price -> Int8,
        homestay_business_id -> Int8,
        homestay_user_id -> Int8,
        live_start_date -> Timestamptz,
        live_end_date -> Timestamptz,
        live_people_num -> Int4,
        trade_state -> Int2,
        trade_code -> Text,
        remark -> Text,
        order_total_price -> Int8,
        food_total_price -> Int8,
        homestay_total_price -> Int8,
        pay_deadline -> Timestamptz,
    }
}

diesel::table! {
    third_payment (id) {
        id -> Int8,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
        sn -> Text,
        user_id -> Int8,
        pay_mode -> Text,
        trade_type -> Text,
        trade_state -> Text,
        pay_total -> Int8,
        transaction_id -> Nullable<Text>,
        trade_state_desc -> Text,
        order_sn -> Text,
        service_type -> Text,
        pay_status -> Int2,
        pay_time -> Nullable<Timestamptz>,
        prepay_id -> Nullable<Text>,
        prepay_time -> Nullable<Timestamptz>,
        reconcile_attempts -> Int2,
        next_reconcile_time -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    refund (id) {
        id -> Int8,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
        sn -> Text,
        payment_sn -> Text,
        order_sn -> Text,
        user_id -> Int8,
        reason -> Text,
        refund_total -> Int8,
        pay_total -> Int8,
        status -> Int2,
        wechat_refund_id -> Nullable<Text>,
        wechat_status -> Text,
        success_time -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    notification (id) {
        id -> Int8,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
        key -> Text,
        channel -> Text,
        template -> Text,
        user_id -> Int8,
        order_sn -> Nullable<Text>,
        status -> Text,
        attempts -> Int4,
        provider_msg_id -> Nullable<Text>,
        last_error -> Nullable<Text>,
        sent_time -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    outbox (id) {
        id -> Int8,
        event_id -> Uuid,
        aggregate -> Text,
        subject -> Text,
        headers -> Jsonb,
        payload -> Bytea,
        create_time -> Timestamptz,
        fast -> Bool,
        parked_at -> Nullable<Timestamptz>,
        parked_reason -> Nullable<Text>,
    }
}

diesel::table! {
    processed_event (consumer, key) {
        consumer -> Text,
        key -> Text,
        processed_time -> Timestamptz,
    }
}

diesel::table! {
    order_close_attempt (order_sn) {
        order_sn -> Text,
        attempts -> Int4,
        retry_at -> Timestamptz,
        last_reason -> Text,
        attention_reason -> Nullable<Text>,
        attention_since -> Nullable<Timestamptz>,
    }
}

diesel::joinable!(user_auth -> users (user_id));
diesel::joinable!(homestay_order -> homestay (homestay_id));

diesel::allow_tables_to_appear_in_same_query!(
    users,
    user_auth,
    homestay,
    homestay_order,
    third_payment,
    refund,
    notification,
    outbox,
    processed_event,
    order_close_attempt,
);
