//! Test data shared by the processors' tests: a user, the "Lakeside cabin" homestay, an order for two nights and its
//! waiting payment of ¥598.00.

#![allow(dead_code)] // each test crate uses part of it

use chrono::{DateTime, TimeDelta, Utc};
use storage::{AuthType, Conn, Fen, OrderSn, PaymentSn, UserId, homestays, orders, payments, users};

/// The order's total, in fen.
pub const TOTAL: i64 = 59800;

/// What [`booking`] wrote.
pub struct Booked {
    pub user: UserId,
    pub order: OrderSn,
    pub payment: PaymentSn,
}

pub async fn user(conn: &mut Conn, openid: &str, mobile: Option<&str>) -> UserId {
    let new = users::NewUser { mobile: mobile.map(str::to_owned), ..Default::default() };
    users::insert_with_auth(conn, &new, AuthType::WxMini, openid).await.unwrap().id()
}

/// The homestay's id.
pub async fn homestay(conn: &mut Conn) -> i64 {
    let new = homestays::NewHomestay {
        title: "Lakeside cabin".into(),
        sub_title: String::new(),
        info: String::new(),
        people_num: 4,
        row_state: 1,
        row_type: 0,
        food_info: String::new(),
        food_price: 0,
        homestay_price: 29900,
        market_homestay_price: 0,
    };
    homestays::insert(conn, &new).await.unwrap().id
}

/// Two nights from three days ahead, [`TOTAL`], payable until `deadline`.
pub fn new_order(sn: &OrderSn, user: UserId, homestay: i64, deadline: DateTime<Utc>) -> orders::NewOrder {
    let now = Utc::now();
    orders::NewOrder {
        sn: sn.to_string(),
        user_id: user.0,
        homestay_id: homestay,
        title: "Lakeside cabin".into(),
        sub_title: String::new(),
        cover: String::new(),
        info: String::new(),
        people_num: 4,
        row_type: 0,
        need_food: false,
        food_info: String::new(),
        food_price: 0,
        homestay_price: 29900,
        market_homestay_price: 0,
        homestay_business_id: 0,
        homestay_user_id: 0,
        live_start_date: now + TimeDelta::days(3),
        live_end_date: now + TimeDelta::days(5),
        live_people_num: 2,
        trade_code: "20261127".into(),
        remark: String::new(),
        order_total_price: TOTAL,
        food_total_price: 0,
        homestay_total_price: TOTAL,
        pay_deadline: deadline,
    }
}

/// A user, a homestay, an order payable until `deadline` and its waiting payment (no prepay yet).
pub async fn booking(conn: &mut Conn, openid: &str, mobile: Option<&str>, deadline: DateTime<Utc>) -> Booked {
    let user = user(conn, openid, mobile).await;
    let homestay = homestay(conn).await;
    let now = Utc::now();
    let order = OrderSn::generate(now);
    orders::insert(conn, &new_order(&order, user, homestay, deadline)).await.unwrap();
    let payment = PaymentSn::generate(now);
    payments::insert(conn, &payments::NewPayment::homestay_order(&payment, user, Fen::new(TOTAL).unwrap(), &order))
        .await
        .unwrap();
    Booked { user, order, payment }
}
