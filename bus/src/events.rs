//! The events of the payment pipeline (DESIGN.md §2). Each names its subject, type and version once; the
//! envelope id of each is chosen so that the same fact reported twice is the same event (JetStream drops the
//! repeat inside its window, `processed_event` and conditional updates after it).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use storage::{Fen, OrderSn, PayStatus, PaymentSn, TradeState, UserId};
use uuid::Uuid;

use crate::{Envelope, Event, Subject, derived_id};

/// How paystream learned what WeChat says about a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportSource {
    /// A verified, decrypted payment callback.
    Callback,
    /// A query by out_trade_no (status polling, reconciliation, a close that found the order paid).
    Query,
}

/// `wechat.transaction`: what WeChat says about one of our payments. Only verified facts get here: the ingress
/// publishes it after checking the callback's signature and decrypting it, or after a signed query answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WechatTransactionReported {
    pub source: ReportSource,
    /// WeChat's notification id (callbacks only).
    pub notification_id: Option<String>,
    pub appid: String,
    pub mchid: String,
    /// Our payment sn.
    pub out_trade_no: String,
    pub transaction_id: Option<String>,
    pub trade_type: Option<String>,
    /// WeChat's raw trade_state: SUCCESS, REFUND, NOTPAY, CLOSED, REVOKED, USERPAYING, PAYERROR, ACCEPT.
    pub trade_state: String,
    pub trade_state_desc: String,
    pub success_time: Option<DateTime<Utc>>,
    /// `amount.total` in fen: the amount compared with the payment (never `payer_total`).
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
}

impl Event for WechatTransactionReported {
    const TYPE: &'static str = "wechat.transaction";
    const VERSION: u16 = 1;
    const SUBJECT: Subject = Subject::WechatTransaction;
    fn aggregate(&self) -> String {
        format!("payment:{}", self.out_trade_no)
    }
}

impl WechatTransactionReported {
    /// The envelope for this report. A callback's id comes from WeChat's notification id (WeChat retries the same
    /// notification for 24 h); a query's from (out_trade_no, trade_state), so polling the same answer twice is one
    /// event.
    pub fn envelope(self) -> Envelope<Self> {
        let id = match (&self.source, &self.notification_id) {
            (ReportSource::Callback, Some(n)) => derived_id("wechat-notification", n),
            _ => derived_id("wechat-query", &format!("{}:{}", self.out_trade_no, self.trade_state)),
        };
        Envelope::with_id(id, self)
    }
}

/// `wechat.refund`: what WeChat says about one of our refunds, from a verified `REFUND.*` callback or a signed
/// answer of the refund API (create or query).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WechatRefundReported {
    pub source: ReportSource,
    /// WeChat's notification id (callbacks only).
    pub notification_id: Option<String>,
    /// The merchant the callback was for (the refund API's answers do not carry it).
    pub mchid: Option<String>,
    /// Our payment sn.
    pub out_trade_no: String,
    /// Our refund sn.
    pub out_refund_no: String,
    pub refund_id: String,
    /// WeChat's raw status: SUCCESS, PROCESSING, CLOSED, ABNORMAL.
    pub status: String,
    pub success_time: Option<DateTime<Utc>>,
    /// `amount.refund` in fen.
    pub amount_refund: i64,
    /// `amount.total` in fen: the payment's amount.
    pub amount_total: i64,
}

impl Event for WechatRefundReported {
    const TYPE: &'static str = "wechat.refund";
    const VERSION: u16 = 1;
    const SUBJECT: Subject = Subject::WechatRefund;
    fn aggregate(&self) -> String {
        format!("payment:{}", self.out_trade_no)
    }
}

impl WechatRefundReported {
    /// A callback's id comes from WeChat's notification id; an API answer's from (out_refund_no, status), so the
    /// same answer seen twice is one event.
    pub fn envelope(self) -> Envelope<Self> {
        let id = match (&self.source, &self.notification_id) {
            (ReportSource::Callback, Some(n)) => derived_id("wechat-notification", n),
            _ => derived_id("wechat-refund-query", &format!("{}:{}", self.out_refund_no, self.status)),
        };
        Envelope::with_id(id, self)
    }
}

/// `payment.status`: a payment changed status (written by the payment processor with the change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentStatusChanged {
    pub payment_sn: PaymentSn,
    pub order_sn: OrderSn,
    pub user_id: UserId,
    pub from: PayStatus,
    pub to: PayStatus,
    pub pay_total: Fen,
    pub transaction_id: Option<String>,
    pub pay_time: Option<DateTime<Utc>>,
}

impl Event for PaymentStatusChanged {
    const TYPE: &'static str = "payment.status";
    const VERSION: u16 = 1;
    const SUBJECT: Subject = Subject::PaymentStatus;
    fn aggregate(&self) -> String {
        format!("payment:{}", self.payment_sn)
    }
}

impl PaymentStatusChanged {
    /// One event per (payment, status): a payment reaches each status at most once.
    pub fn envelope(self) -> Envelope<Self> {
        let id = derived_id("payment-status", &format!("{}:{:?}", self.payment_sn, self.to));
        Envelope::with_id(id, self)
    }
}

/// `order.status`: an order changed state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderStatusChanged {
    pub order_sn: OrderSn,
    pub user_id: UserId,
    pub from: TradeState,
    pub to: TradeState,
}

impl Event for OrderStatusChanged {
    const TYPE: &'static str = "order.status";
    const VERSION: u16 = 1;
    const SUBJECT: Subject = Subject::OrderStatus;
    fn aggregate(&self) -> String {
        format!("order:{}", self.order_sn)
    }
}

impl OrderStatusChanged {
    pub fn envelope(self) -> Envelope<Self> {
        let id = derived_id("order-status", &format!("{}:{:?}", self.order_sn, self.to));
        Envelope::with_id(id, self)
    }
}

/// Which message to send: a logical template, mapped to WeChat template ids and SMS templates by the notifier's
/// configuration — never a WeChat id in the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyTemplate {
    PaySuccess,
    CheckinNotice,
    RefundSuccess,
    OrderClosed,
}

impl NotifyTemplate {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyTemplate::PaySuccess => "pay_success",
            NotifyTemplate::CheckinNotice => "checkin_notice",
            NotifyTemplate::RefundSuccess => "refund_success",
            NotifyTemplate::OrderClosed => "order_closed",
        }
    }
}

/// Typed facts a message is rendered from (the notifier renders and checks them against WeChat's rules).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotifyParams {
    pub order_sn: OrderSn,
    /// The homestay's title.
    pub title: String,
    /// Amount paid (or refunded).
    pub amount: Fen,
    pub live_start: DateTime<Utc>,
    pub live_end: DateTime<Utc>,
    /// The check-in code shown to the landlord.
    pub trade_code: String,
    pub live_people_num: i32,
}

/// A request to tell a user something, on one channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationRequest {
    pub template: NotifyTemplate,
    pub user_id: UserId,
    pub params: NotifyParams,
}

impl NotificationRequest {
    /// The exactly-once key of this message on `channel`: `<order sn>:<template>:<channel>`.
    pub fn key(&self, channel: &str) -> String {
        format!("{}:{}:{channel}", self.params.order_sn, self.template.as_str())
    }
}

/// `notify.miniprogram`: send a subscribe message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MiniprogramNotify(pub NotificationRequest);

impl Event for MiniprogramNotify {
    const TYPE: &'static str = "notify.miniprogram";
    const VERSION: u16 = 1;
    const SUBJECT: Subject = Subject::NotifyMiniprogram;
    fn aggregate(&self) -> String {
        format!("notify:{}", self.0.key("miniprogram"))
    }
}

impl MiniprogramNotify {
    pub fn envelope(self) -> Envelope<Self> {
        let id = derived_id("notify", &self.0.key("miniprogram"));
        Envelope::with_id(id, self)
    }
}

/// `notify.sms`: send an SMS (to the user's mobile number, looked up by the notifier).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmsNotify(pub NotificationRequest);

impl Event for SmsNotify {
    const TYPE: &'static str = "notify.sms";
    const VERSION: u16 = 1;
    const SUBJECT: Subject = Subject::NotifySms;
    fn aggregate(&self) -> String {
        format!("notify:{}", self.0.key("sms"))
    }
}

impl SmsNotify {
    pub fn envelope(self) -> Envelope<Self> {
        let id = derived_id("notify", &self.0.key("sms"));
        Envelope::with_id(id, self)
    }
}

/// Why a refund is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundReason {
    /// Money arrived for an order that is no longer waiting for it (closed, cancelled, or paid twice).
    OrderClosed,
    /// The user asked for a refund of a paid, unused order.
    UserRequested,
}

/// `refund.requested`: refund a payment in full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefundRequested {
    pub payment_sn: PaymentSn,
    pub order_sn: OrderSn,
    pub user_id: UserId,
    pub reason: RefundReason,
    pub amount: Fen,
}

impl Event for RefundRequested {
    const TYPE: &'static str = "refund.requested";
    const VERSION: u16 = 1;
    const SUBJECT: Subject = Subject::RefundRequested;
    fn aggregate(&self) -> String {
        format!("payment:{}", self.payment_sn)
    }
}

impl RefundRequested {
    /// One refund request per payment: a payment is refunded in full at most once.
    pub fn envelope(self) -> Envelope<Self> {
        let id: Uuid = derived_id("refund-requested", self.payment_sn.as_str());
        Envelope::with_id(id, self)
    }
}
