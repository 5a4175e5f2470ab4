//! `/order/v1/homestayOrder/*`: book a homestay, list and read one's own orders, ask for a refund.

use axum::extract::State;
use chrono::{DateTime, FixedOffset, TimeZone as _, Utc};
use serde::{Deserialize, Serialize};
use storage::homestays::HomestayRow;
use storage::orders::{self, NewOrder, OrderRow};
use storage::{Fen, HomestayId, OrderId, OrderSn, PayStatus, TradeState, homestays, payments};

use crate::auth::AuthUser;
use crate::error::{ApiError, ApiJson, ApiResult, Data, conflict};
use crate::limits::{Action, Who};
use crate::{AppState, ClientIp};

const DAY: i64 = 86_400;
/// Longer stays are surely a client bug (and would risk overflowing prices).
const MAX_NIGHTS: i64 = 365;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateReq {
    homestay_id: i64,
    #[serde(default)]
    is_food: bool,
    /// Unix seconds of the first night, as looklook sends it.
    live_start_time: i64,
    live_end_time: i64,
    live_people_num: i64,
    #[serde(default)]
    remark: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateResp {
    order_sn: String,
}

fn beijing() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset")
}

/// Midnight of today where the homestays are (UTC+8): a stay may start today.
fn start_of_today(now: DateTime<Utc>) -> i64 {
    let today = now.with_timezone(&beijing()).date_naive();
    let midnight = today.and_hms_opt(0, 0, 0).expect("midnight exists");
    beijing().from_local_datetime(&midnight).single().map_or(now.timestamp(), |t| t.timestamp())
}

/// What the stay costs, in fen: (homestay price × nights, food price × people × nights). A `row_type` 1 homestay
/// is priced per person and night.
fn prices(h: &HomestayRow, nights: i64, people: i64, food: bool) -> Result<(Fen, Fen), ApiError> {
    let too_big = || ApiError::invalid("the stay is too expensive to book in one order");
    let per_night = Fen::new(h.homestay_price)?;
    let per_night = if h.row_type == 1 { per_night.checked_mul(people).ok_or_else(too_big)? } else { per_night };
    let room = per_night.checked_mul(nights).ok_or_else(too_big)?;
    let food = if food {
        Fen::new(h.food_price)?.checked_mul(people).and_then(|f| f.checked_mul(nights)).ok_or_else(too_big)?
    } else {
        Fen::ZERO
    };
    room.checked_add(food).ok_or_else(too_big)?;
    Ok((room, food))
}

/// A random 8-digit check-in code (shown to the landlord; uniqueness is not needed).
fn trade_code() -> String {
    format!("{:08}", uuid::Uuid::new_v4().as_u128() % 100_000_000)
}

pub async fn create(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<CreateReq>,
) -> ApiResult<CreateResp> {
    state.limits.check(Action::CreateOrder, ip, Some(Who::User(user)))?;
    let now = Utc::now();
    let mut conn = state.conn().await?;
    let cap = state.deps.config.max_unpaid_orders;
    if cap > 0 && orders::count_unpaid(&mut conn, user).await? >= i64::from(cap) {
        return Err(ApiError::conflict(
            conflict::TOO_MANY_UNPAID,
            format!("you have {cap} unpaid orders: pay or wait for one of them to close first"),
        ));
    }
    let h = homestays::find(&mut conn, HomestayId(req.homestay_id)).await?.ok_or(ApiError::NotFound("homestay"))?;
    if !h.is_listed() {
        return Err(ApiError::invalid("this homestay is not open for booking"));
    }
    if req.live_people_num < 1 || req.live_people_num > i64::from(h.people_num) {
        return Err(ApiError::invalid(format!(
            "livePeopleNum must be between 1 and {} for this homestay",
            h.people_num
        )));
    }
    if req.live_end_time <= req.live_start_time {
        return Err(ApiError::invalid("liveEndTime must be after liveStartTime"));
    }
    // Checked: i64::MAX - i64::MIN would overflow (a panic in debug builds, a wrapped value in release).
    let span = req
        .live_end_time
        .checked_sub(req.live_start_time)
        .ok_or_else(|| ApiError::invalid("liveStartTime and liveEndTime must be unix seconds of real dates"))?;
    if span % DAY != 0 {
        return Err(ApiError::invalid(
            "the stay must be whole nights: liveEndTime - liveStartTime a multiple of 86400",
        ));
    }
    let nights = span / DAY;
    if nights > MAX_NIGHTS {
        return Err(ApiError::invalid(format!("a stay is at most {MAX_NIGHTS} nights")));
    }
    if req.live_start_time < start_of_today(now) {
        return Err(ApiError::invalid("liveStartTime must not be in the past"));
    }
    if req.remark.chars().count() > 200 {
        return Err(ApiError::invalid("remark must be at most 200 characters"));
    }
    let live_start =
        DateTime::from_timestamp(req.live_start_time, 0).ok_or_else(|| ApiError::invalid("bad liveStartTime"))?;
    let live_end =
        DateTime::from_timestamp(req.live_end_time, 0).ok_or_else(|| ApiError::invalid("bad liveEndTime"))?;
    let (room, food) = prices(&h, nights, req.live_people_num, req.is_food)?;
    let total = room.checked_add(food).ok_or_else(|| ApiError::invalid("the stay is too expensive"))?;
    let deadline = now
        + chrono::Duration::from_std(state.deps.config.payment_deadline)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut new = NewOrder {
        sn: String::new(),
        user_id: user.0,
        homestay_id: h.id,
        title: h.title.clone(),
        sub_title: h.sub_title.clone(),
        cover: h.banner.split(',').next().unwrap_or_default().trim().to_owned(),
        info: h.info.clone(),
        people_num: h.people_num,
        row_type: h.row_type,
        need_food: req.is_food,
        food_info: h.food_info.clone(),
        food_price: h.food_price,
        homestay_price: h.homestay_price,
        market_homestay_price: h.market_homestay_price,
        homestay_business_id: h.homestay_business_id,
        homestay_user_id: h.user_id,
        live_start_date: live_start,
        live_end_date: live_end,
        live_people_num: req.live_people_num as i32,
        trade_code: trade_code(),
        remark: req.remark,
        order_total_price: total.get(),
        food_total_price: food.get(),
        homestay_total_price: room.get(),
        pay_deadline: deadline,
    };
    // A serial has 8 random digits per second; a collision is rare and simply retried.
    for _ in 0..3 {
        new.sn = OrderSn::generate(now).to_string();
        match orders::insert(&mut conn, &new).await {
            Ok(row) => {
                tracing::info!(order_sn = %row.sn, user_id = user.0, total = row.order_total_price, "order created");
                return Ok(Data(CreateResp { order_sn: row.sn }));
            }
            Err(e) if e.conflict() == Some("homestay_order_sn_unique") => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Unavailable("could not draw a unique order serial".into()))
}

/// An order as the front end sees it, with looklook's names and JSON types (`needFood` 0 or 1, as looklook's
/// `int64`): money in fen, times in unix seconds.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    id: i64,
    sn: String,
    user_id: i64,
    homestay_id: i64,
    homestay_business_id: i64,
    homestay_user_id: i64,
    title: String,
    sub_title: String,
    cover: String,
    info: String,
    people_num: i32,
    row_type: i16,
    need_food: i64,
    food_info: String,
    food_price: i64,
    homestay_price: i64,
    market_homestay_price: i64,
    live_start_date: i64,
    live_end_date: i64,
    live_people_num: i32,
    trade_state: i16,
    trade_code: String,
    remark: String,
    order_total_price: i64,
    food_total_price: i64,
    homestay_total_price: i64,
    pay_deadline: i64,
    create_time: i64,
}

impl From<OrderRow> for OrderView {
    fn from(o: OrderRow) -> Self {
        OrderView {
            id: o.id,
            sn: o.sn,
            user_id: o.user_id,
            homestay_id: o.homestay_id,
            homestay_business_id: o.homestay_business_id,
            homestay_user_id: o.homestay_user_id,
            title: o.title,
            sub_title: o.sub_title,
            cover: o.cover,
            info: o.info,
            people_num: o.people_num,
            row_type: o.row_type,
            need_food: i64::from(o.need_food),
            food_info: o.food_info,
            food_price: o.food_price,
            homestay_price: o.homestay_price,
            market_homestay_price: o.market_homestay_price,
            live_start_date: o.live_start_date.timestamp(),
            live_end_date: o.live_end_date.timestamp(),
            live_people_num: o.live_people_num,
            trade_state: o.trade_state,
            trade_code: o.trade_code,
            remark: o.remark,
            order_total_price: o.order_total_price,
            food_total_price: o.food_total_price,
            homestay_total_price: o.homestay_total_price,
            pay_deadline: o.pay_deadline.timestamp(),
            create_time: o.create_time.timestamp(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListReq {
    /// The `id` of the last order of the previous page; 0 (or absent) for the first page.
    #[serde(default)]
    last_id: i64,
    #[serde(default = "default_page_size")]
    page_size: i64,
    /// -1 cancelled, 0 waitPay, 1 waitUse, 2 used, 3 refunded, 4 expired; absent, or -99 as looklook's front end
    /// sends it, for all.
    #[serde(default)]
    trade_state: Option<i16>,
}

/// looklook's "every state" in `tradeState`.
const ALL_STATES: i16 = -99;

fn default_page_size() -> i64 {
    10
}

#[derive(Debug, Serialize)]
pub struct ListResp {
    list: Vec<OrderView>,
}

pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(req): ApiJson<ListReq>,
) -> ApiResult<ListResp> {
    if !(1..=50).contains(&req.page_size) {
        return Err(ApiError::invalid("pageSize must be between 1 and 50"));
    }
    if req.last_id < 0 {
        return Err(ApiError::invalid("lastId must not be negative"));
    }
    let state_filter = req
        .trade_state
        .filter(|&s| s != ALL_STATES)
        .map(TradeState::from_code)
        .transpose()
        .map_err(|_| ApiError::invalid("tradeState must be one of -1, 0, 1, 2, 3, 4, or -99 for all"))?;
    let before = (req.last_id > 0).then_some(OrderId(req.last_id));
    let mut conn = state.conn().await?;
    let rows = orders::list_for_user(&mut conn, user, state_filter, before, req.page_size).await?;
    Ok(Data(ListResp { list: rows.into_iter().map(OrderView::from).collect() }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailReq {
    sn: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DetailResp {
    #[serde(flatten)]
    order: OrderView,
    /// Unix seconds of WeChat's success_time; 0 while unpaid.
    pay_time: i64,
    /// How it was paid (`WECHAT_PAY`); empty while unpaid.
    pay_type: String,
}

/// Parses an order serial; a malformed one cannot name any order.
pub(crate) fn order_sn(sn: &str) -> Result<OrderSn, ApiError> {
    OrderSn::parse(sn).map_err(|_| ApiError::NotFound("order"))
}

pub async fn detail(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(req): ApiJson<DetailReq>,
) -> ApiResult<DetailResp> {
    let sn = order_sn(&req.sn)?;
    let mut conn = state.conn().await?;
    let order = orders::find_for_user(&mut conn, user, &sn).await?.ok_or(ApiError::NotFound("order"))?;
    let paid = payments::list_for_order(&mut conn, &sn)
        .await?
        .into_iter()
        .find(|p| matches!(p.status(), PayStatus::Paid | PayStatus::Refunded));
    let (pay_time, pay_type) = match paid {
        Some(p) => (p.pay_time.map_or(0, |t| t.timestamp()), p.pay_mode),
        None => (0, String::new()),
    };
    Ok(Data(DetailResp { order: order.into(), pay_time, pay_type }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundReq {
    sn: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RefundResp {
    order_sn: String,
    /// `requested` (WeChat is being asked), `processing` (WeChat is paying it back), `succeeded` or `failed`.
    refund_state: &'static str,
    /// Fen to be paid back: the whole payment.
    refund_total: i64,
}

fn refund_state(s: storage::RefundStatus) -> &'static str {
    match s {
        storage::RefundStatus::Requested => "requested",
        storage::RefundStatus::Processing => "processing",
        storage::RefundStatus::Succeeded => "succeeded",
        storage::RefundStatus::Failed => "failed",
    }
}

/// `POST /order/v1/homestayOrder/refundHomestayOrder {sn}`: the user gives back a paid order before the stay
/// starts and gets the whole payment back. The request is written to the outbox with the check, in one
/// transaction; the lifecycle processor asks WeChat and, when WeChat has paid it back, marks the order refunded and
/// tells the user. Asking again answers with the refund already under way.
pub async fn refund(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<RefundReq>,
) -> ApiResult<RefundResp> {
    state.limits.check(Action::Refund, ip, Some(Who::User(user)))?;
    use bus::events::{RefundReason, RefundRequested};
    use storage::{AsyncConnection as _, refunds};
    let sn = order_sn(&req.sn)?;
    let now = Utc::now();
    let mut conn = state.conn().await?;
    let result = conn
        .transaction::<_, ApiError, _>(async |c| {
            // Own orders only; locked so two taps of the button check and write one after the other.
            orders::find_for_user(c, user, &sn).await?.ok_or(ApiError::NotFound("order"))?;
            let order = orders::lock_by_sn(c, &sn).await?.ok_or(ApiError::NotFound("order"))?;
            let paid = payments::list_for_order(c, &sn)
                .await?
                .into_iter()
                .find(|p| matches!(p.status(), PayStatus::Paid | PayStatus::Refunded));
            if let Some(p) = &paid
                && let Some(r) = refunds::find_for_payment(c, &p.sn()).await?
            {
                return Ok(RefundResp {
                    order_sn: sn.to_string(),
                    refund_state: refund_state(r.status()),
                    refund_total: r.refund_total,
                });
            }
            if order.state() != TradeState::WaitUse {
                return Err(ApiError::conflict(
                    conflict::NOT_REFUNDABLE,
                    format!("only a paid order waiting for its stay can be refunded; this one is {:?}", order.state()),
                ));
            }
            if order.live_start_date <= now {
                return Err(ApiError::conflict(
                    conflict::STAY_STARTED,
                    "the stay has started: it can no longer be refunded",
                ));
            }
            let payment = paid
                .ok_or_else(|| ApiError::Internal(format!("order {sn} waits for its stay but has no paid payment")))?;
            let ask = RefundRequested {
                payment_sn: payment.sn(),
                order_sn: sn.clone(),
                user_id: user,
                reason: RefundReason::UserRequested,
                amount: payment.total(),
            };
            // Asked a moment ago and not yet picked up: the same request (same event id) is already queued, and
            // enqueue writes it once.
            bus::enqueue(c, &ask.envelope()).await?;
            Ok(RefundResp { order_sn: sn.to_string(), refund_state: "requested", refund_total: payment.pay_total })
        })
        .await?;
    tracing::info!(order = %sn, refund_state = result.refund_state, "refund asked for by the user");
    Ok(Data(result))
}
