//! Rendering a request's typed parameters into WeChat template values and SMS template variables, checked
//! against WeChat's value rules before anything is sent (a value WeChat would refuse with 47003 is caught here,
//! names its key, and costs no quota).

use std::collections::BTreeMap;

use bus::events::NotifyParams;
use chrono::{DateTime, FixedOffset, Utc};
use serde::Deserialize;

/// The longest `thing` value WeChat takes, in characters.
pub const THING_MAX_CHARS: usize = 20;

/// A typed fact of a notification request that a template field or SMS variable shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Param {
    /// The order's serial number (`HSO…`).
    OrderSn,
    /// The homestay's title.
    Title,
    /// The amount paid or refunded.
    Amount,
    /// Check-in, from the order.
    LiveStart,
    /// Check-out, from the order.
    LiveEnd,
    /// `check-in~check-out` (for `time` and `date` keys).
    LivePeriod,
    /// The check-in code shown to the landlord.
    TradeCode,
    /// Guests.
    LivePeopleNum,
}

impl Param {
    pub fn as_str(self) -> &'static str {
        match self {
            Param::OrderSn => "order_sn",
            Param::Title => "title",
            Param::Amount => "amount",
            Param::LiveStart => "live_start",
            Param::LiveEnd => "live_end",
            Param::LivePeriod => "live_period",
            Param::TradeCode => "trade_code",
            Param::LivePeopleNum => "live_people_num",
        }
    }
}

/// Which parameters a key type can show. Types whose rules no parameter can meet (`phrase`, `name`, `letter`,
/// `symbol`, `phone_number`, `car_number`) take none, so such a mapping is refused at start.
pub fn fitting(key_type: &str) -> &'static [Param] {
    use Param::*;
    match key_type {
        "thing" => &[OrderSn, Title, Amount, LiveStart, LiveEnd, TradeCode, LivePeopleNum],
        "character_string" => &[OrderSn, TradeCode, Amount, LivePeopleNum],
        "amount" => &[Amount],
        "number" => &[Amount, LivePeopleNum],
        "time" | "date" => &[LiveStart, LiveEnd, LivePeriod],
        _ => &[],
    }
}

pub fn fits(key_type: &str, param: Param) -> bool {
    fitting(key_type).contains(&param)
}

/// A value that cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The rendered value breaks its key's rule (a trade code with Chinese characters in a `character_string`).
    #[error("{0}")]
    Rule(#[from] wechat::miniprogram::subscribe::DataRuleError),
    /// The mapping cannot show this parameter in this key type (refused by `validate`, kept as a guard).
    #[error("data.{key} cannot show {param}")]
    Misfit { key: String, param: &'static str },
    /// An SMS variable would be empty.
    #[error("sms_params[{index}] ({param}) is empty")]
    EmptySmsParam { index: usize, param: &'static str },
}

fn minute(t: DateTime<Utc>, tz: FixedOffset) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d %H:%M").to_string()
}

fn day(t: DateTime<Utc>, tz: FixedOffset) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d").to_string()
}

/// Cuts `s` to `max` characters, the last being an ellipsis when anything was cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The value of template key `key` (of type `key_type`) showing `param`, before the rule check.
fn subscribe_text(
    key: &str,
    key_type: &str,
    param: Param,
    p: &NotifyParams,
    tz: FixedOffset,
) -> Result<String, RenderError> {
    if !fits(key_type, param) {
        return Err(RenderError::Misfit { key: key.to_owned(), param: param.as_str() });
    }
    let period = |f: fn(DateTime<Utc>, FixedOffset) -> String| format!("{}~{}", f(p.live_start, tz), f(p.live_end, tz));
    Ok(match (key_type, param) {
        ("amount", Param::Amount) => p.amount.to_string(),
        ("number" | "character_string", Param::Amount) => p.amount.yuan(),
        ("time", Param::LivePeriod) => period(minute),
        ("date", Param::LivePeriod) => period(day),
        ("date", Param::LiveStart) => day(p.live_start, tz),
        ("date", Param::LiveEnd) => day(p.live_end, tz),
        (_, Param::LiveStart) => minute(p.live_start, tz),
        (_, Param::LiveEnd) => minute(p.live_end, tz),
        (_, Param::Amount) => p.amount.to_string(),
        (_, Param::OrderSn) => p.order_sn.as_str().to_owned(),
        (_, Param::Title) => p.title.trim().to_owned(),
        (_, Param::TradeCode) => p.trade_code.trim().to_owned(),
        (_, Param::LivePeopleNum) => p.live_people_num.to_string(),
        (_, Param::LivePeriod) => period(minute),
    })
}

/// The subscribe message's `data`: each configured key rendered from the request and checked with WeChat's
/// rule for its type. Free text (`thing`) is cut to 20 characters with an ellipsis; codes and numbers are never
/// cut (a shortened order number would be wrong), so one that breaks its rule is an error.
pub fn subscribe_data(
    fields: &BTreeMap<String, Param>,
    p: &NotifyParams,
    tz: FixedOffset,
) -> Result<BTreeMap<String, String>, RenderError> {
    let mut data = BTreeMap::new();
    for (key, param) in fields {
        let ty = wechat::miniprogram::subscribe::key_type(key).unwrap_or_default();
        let mut value = subscribe_text(key, ty, *param, p, tz)?;
        if ty == "thing" {
            value = truncate(&value, THING_MAX_CHARS);
        }
        wechat::check_value(key, &value)?;
        data.insert(key.clone(), value);
    }
    Ok(data)
}

/// The SMS template's variables, in order. Amounts are plain yuan (`123.45`: the template text carries the
/// currency), dates are minutes in the configured zone.
pub fn sms_params(params: &[Param], p: &NotifyParams, tz: FixedOffset) -> Result<Vec<String>, RenderError> {
    params
        .iter()
        .enumerate()
        .map(|(index, param)| {
            let v = match param {
                Param::OrderSn => p.order_sn.as_str().to_owned(),
                Param::Title => p.title.trim().to_owned(),
                Param::Amount => p.amount.yuan(),
                Param::LiveStart => minute(p.live_start, tz),
                Param::LiveEnd => minute(p.live_end, tz),
                Param::LivePeriod => format!("{}~{}", day(p.live_start, tz), day(p.live_end, tz)),
                Param::TradeCode => p.trade_code.trim().to_owned(),
                Param::LivePeopleNum => p.live_people_num.to_string(),
            };
            if v.is_empty() { Err(RenderError::EmptySmsParam { index, param: param.as_str() }) } else { Ok(v) }
        })
        .collect()
}

/// The page with `{order_sn}` filled in.
pub fn page(template: &str, p: &NotifyParams) -> String {
    template.replace("{order_sn}", p.order_sn.as_str())
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;
    use storage::{Fen, OrderSn};

    use super::*;

    fn params() -> NotifyParams {
        NotifyParams {
            order_sn: OrderSn::parse("HSO2026112714300012345678").unwrap(),
            title: "西湖边的安静小院（含早餐，可停车，近地铁站）".into(),
            amount: Fen::new(12345).unwrap(),
            // 2026-11-28 06:00 UTC = 14:00 in Beijing; check-out two days later at 04:00 UTC = 12:00.
            live_start: Utc.with_ymd_and_hms(2026, 11, 28, 6, 0, 0).unwrap(),
            live_end: Utc.with_ymd_and_hms(2026, 11, 30, 4, 0, 0).unwrap(),
            trade_code: "K7Q2M9".into(),
            live_people_num: 2,
        }
    }

    fn cst() -> FixedOffset {
        FixedOffset::east_opt(8 * 3600).unwrap()
    }

    #[test]
    fn every_fitting_pair_renders_a_value_wechat_accepts() {
        let p = params();
        for ty in ["thing", "character_string", "amount", "number", "time", "date"] {
            for param in fitting(ty) {
                let key = format!("{ty}1");
                let fields = BTreeMap::from([(key.clone(), *param)]);
                let data = subscribe_data(&fields, &p, cst()).unwrap_or_else(|e| panic!("{ty} <- {param:?}: {e}"));
                wechat::check_value(&key, &data[&key]).unwrap();
            }
        }
    }

    #[test]
    fn values_follow_the_order_and_the_zone() {
        let p = params();
        let fields = BTreeMap::from([
            ("character_string6".to_owned(), Param::OrderSn),
            ("thing1".to_owned(), Param::Title),
            ("amount2".to_owned(), Param::Amount),
            ("time4".to_owned(), Param::LiveStart),
            ("date5".to_owned(), Param::LivePeriod),
            ("character_string7".to_owned(), Param::TradeCode),
            ("number8".to_owned(), Param::LivePeopleNum),
        ]);
        let d = subscribe_data(&fields, &p, cst()).unwrap();
        assert_eq!(d["character_string6"], "HSO2026112714300012345678");
        assert_eq!(d["thing1"].chars().count(), 20);
        assert!(d["thing1"].starts_with("西湖边的安静小院") && d["thing1"].ends_with('…'), "{}", d["thing1"]);
        assert_eq!(d["amount2"], "¥123.45");
        assert_eq!(d["time4"], "2026-11-28 14:00");
        assert_eq!(d["date5"], "2026-11-28~2026-11-30");
        assert_eq!(d["character_string7"], "K7Q2M9");
        assert_eq!(d["number8"], "2");
        let utc = FixedOffset::east_opt(0).unwrap();
        assert_eq!(subscribe_data(&fields, &p, utc).unwrap()["time4"], "2026-11-28 06:00");
    }

    #[test]
    fn a_value_that_breaks_its_rule_is_refused_by_key_not_cut() {
        let mut p = params();
        p.trade_code = "入住码 12".into();
        let fields = BTreeMap::from([("character_string3".to_owned(), Param::TradeCode)]);
        let e = subscribe_data(&fields, &p, cst()).unwrap_err();
        assert!(e.to_string().contains("data.character_string3"), "{e}");
        p.title = "   ".into();
        let e = subscribe_data(&BTreeMap::from([("thing1".to_owned(), Param::Title)]), &p, cst()).unwrap_err();
        assert!(e.to_string().contains("thing1"), "{e}");
    }

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(truncate("short", 20), "short");
        assert_eq!(truncate(&"字".repeat(20), 20), "字".repeat(20));
        let cut = truncate(&"字".repeat(21), 20);
        assert_eq!(cut.chars().count(), 20);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn sms_variables_and_page() {
        let p = params();
        let v = sms_params(&[Param::OrderSn, Param::Amount, Param::LiveStart, Param::LivePeriod], &p, cst()).unwrap();
        assert_eq!(v, ["HSO2026112714300012345678", "123.45", "2026-11-28 14:00", "2026-11-28~2026-11-30"]);
        let mut empty = p.clone();
        empty.trade_code = String::new();
        assert_eq!(
            sms_params(&[Param::TradeCode], &empty, cst()).unwrap_err(),
            RenderError::EmptySmsParam { index: 0, param: "trade_code" }
        );
        assert_eq!(page("pages/order/detail?sn={order_sn}", &p), "pages/order/detail?sn=HSO2026112714300012345678");
    }
}
