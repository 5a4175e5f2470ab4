//! Subscribe messages and the value rules of their template keys.
//!
//! A template key is a type prefix and a number (`thing3`, `amount1`, `character_string2`);
//! WeChat refuses a value that breaks its type's rule with errcode 47003. Checking here first
//! names the key and keeps a bad message from burning quota.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::openid::OpenId;

/// Which version of the mini-program a message's page opens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MiniprogramState {
    Developer,
    Trial,
    #[default]
    Formal,
}

/// Language of the message chrome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Lang {
    #[default]
    #[serde(rename = "zh_CN")]
    ZhCn,
    #[serde(rename = "en_US")]
    EnUs,
    #[serde(rename = "zh_HK")]
    ZhHk,
    #[serde(rename = "zh_TW")]
    ZhTw,
}

/// A value that breaks its key type's rule (or a bad message field).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("data.{key}.value {rule}")]
pub struct DataRuleError {
    pub key: String,
    pub rule: &'static str,
}

/// `POST /cgi-bin/message/subscribe/send` body. `data` maps a template key to its value; on
/// the wire each value is wrapped as `{"value": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Wire", from = "Wire")]
pub struct SubscribeMessage {
    pub touser: OpenId,
    pub template_id: String,
    pub page: Option<String>,
    pub data: BTreeMap<String, String>,
    pub miniprogram_state: MiniprogramState,
    pub lang: Lang,
}

#[derive(Clone, Serialize, Deserialize)]
struct WireValue {
    value: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct Wire {
    touser: OpenId,
    template_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    page: Option<String>,
    data: BTreeMap<String, WireValue>,
    #[serde(default)]
    miniprogram_state: MiniprogramState,
    #[serde(default)]
    lang: Lang,
}

impl From<SubscribeMessage> for Wire {
    fn from(m: SubscribeMessage) -> Self {
        Self {
            touser: m.touser,
            template_id: m.template_id,
            page: m.page,
            data: m.data.into_iter().map(|(k, value)| (k, WireValue { value })).collect(),
            miniprogram_state: m.miniprogram_state,
            lang: m.lang,
        }
    }
}

impl From<Wire> for SubscribeMessage {
    fn from(w: Wire) -> Self {
        Self {
            touser: w.touser,
            template_id: w.template_id,
            page: w.page,
            data: w.data.into_iter().map(|(k, v)| (k, v.value)).collect(),
            miniprogram_state: w.miniprogram_state,
            lang: w.lang,
        }
    }
}

impl SubscribeMessage {
    /// Checks the template id, page and every data value before sending.
    pub fn validate(&self) -> Result<(), DataRuleError> {
        let bad = |key: &str, rule| DataRuleError { key: key.to_owned(), rule };
        if self.template_id.is_empty() || self.template_id.len() > 128 {
            return Err(bad("template_id", "must be 1 to 128 characters"));
        }
        if let Some(p) = &self.page
            && (p.is_empty() || p.len() > 1024 || p.starts_with("http"))
        {
            return Err(bad("page", "must be a mini-program page path"));
        }
        if self.data.is_empty() {
            return Err(bad("data", "must hold at least one key"));
        }
        for (key, value) in &self.data {
            check_value(key, value)?;
        }
        Ok(())
    }
}

/// The type of a template key: `thing3` -> `thing`. `None` if the key is not letters and
/// underscores followed by digits.
pub fn key_type(key: &str) -> Option<&str> {
    let ty = key.trim_end_matches(|c: char| c.is_ascii_digit());
    let ok = !ty.is_empty() && ty.len() < key.len() && ty.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    ok.then_some(ty)
}

fn is_cjk(c: char) -> bool {
    matches!(u32::from(c),
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0xF900..=0xFAFF | 0x20000..=0x2A6DF | 0x2A700..=0x2EBEF)
}

fn is_symbol(c: char) -> bool {
    !c.is_alphanumeric() && !c.is_whitespace() && !c.is_control()
}

fn is_number(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    let mut parts = digits.split('.');
    let int = parts.next().unwrap_or_default();
    let frac = parts.next();
    parts.next().is_none()
        && !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

fn is_amount(v: &str) -> bool {
    let v = v.strip_suffix('元').unwrap_or(v);
    let v = v.strip_prefix(['¥', '￥', '$', '€', '£', '＄']).unwrap_or(v);
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    (1..=10).contains(&int.len())
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.len() <= 2
        && frac.bytes().all(|b| b.is_ascii_digit())
        && (frac.is_empty() != v.contains('.'))
}

fn is_time_text(v: &str) -> bool {
    v.chars().any(|c| c.is_ascii_digit())
        && v.chars().all(|c| {
            c.is_ascii_digit() || matches!(c, ':' | '-' | '/' | ' ' | '~' | '年' | '月' | '日' | '时' | '分' | '秒')
        })
}

/// Checks one data value against its key type's rule.
pub fn check_value(key: &str, value: &str) -> Result<(), DataRuleError> {
    let bad = |rule| Err(DataRuleError { key: key.to_owned(), rule });
    let Some(ty) = key_type(key) else {
        return bad("key must be a type name followed by digits, like thing1");
    };
    if value.is_empty() {
        return bad("must not be empty");
    }
    let n = value.chars().count();
    let ok = match ty {
        "thing" => n <= 20,
        "number" => n <= 32 && is_number(value),
        "letter" => n <= 32 && value.chars().all(|c| c.is_ascii_alphabetic()),
        "symbol" => n <= 5 && value.chars().all(is_symbol),
        "character_string" => n <= 32 && value.chars().all(|c| c.is_ascii_graphic()),
        "amount" => is_amount(value),
        "time" => n <= 64 && is_time_text(value) && value.contains(':'),
        "date" => {
            n <= 64 && is_time_text(value) && (value.contains('年') || value.contains('-') || value.contains('/'))
        }
        "phone_number" => {
            n <= 17 && value.chars().all(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | ' ' | '(' | ')'))
        }
        "car_number" => n <= 8 && value.chars().all(|c| c.is_ascii_alphanumeric() || is_cjk(c)),
        "name" => {
            (n <= 10 && value.chars().all(|c| is_cjk(c) || c == '·'))
                || (n <= 20 && value.chars().all(|c| c.is_ascii_alphabetic() || c == ' ' || c == '.'))
        }
        "phrase" => n <= 5 && value.chars().all(is_cjk),
        _ => return bad("has a key type this client does not know"),
    };
    if ok {
        Ok(())
    } else {
        bad(match ty {
            "thing" => "thing must be at most 20 characters",
            "number" => "number must be at most 32 digits",
            "letter" => "letter must be at most 32 letters",
            "symbol" => "symbol must be at most 5 symbols",
            "character_string" => "character_string must be at most 32 digits, letters or symbols",
            "amount" => "amount must be a currency symbol and at most 10 digits (optionally 元)",
            "time" => "time must be a 24-hour time such as 15:01 or 2019年10月1日 15:01",
            "date" => "date must be a date such as 2019年10月1日 or 2019-10-01",
            "phone_number" => "phone_number must be at most 17 digits or symbols",
            "car_number" => "car_number must be at most 8 characters",
            "name" => "name must be at most 10 Chinese characters or 20 letters",
            _ => "phrase must be at most 5 Chinese characters",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_types() {
        assert_eq!(key_type("thing3"), Some("thing"));
        assert_eq!(key_type("character_string12"), Some("character_string"));
        assert_eq!(key_type("thing"), None);
        assert_eq!(key_type("3"), None);
        assert_eq!(key_type("Thing1"), None);
    }

    #[test]
    fn value_rules_per_type() {
        let ok = [
            ("thing1", "订单已支付，请等待发货哦"),
            ("thing1", &"字".repeat(20)),
            ("number2", "12345"),
            ("number2", "12.50"),
            ("letter3", "ABCxyz"),
            ("symbol4", "%+-"),
            ("character_string5", "PS-2026_11/27#1"),
            ("amount6", "¥100.00"),
            ("amount6", "100元"),
            ("amount6", "￥1"),
            ("time7", "15:01"),
            ("time7", "2019年10月1日 15:01"),
            ("time7", "2019-10-01 15:01~16:00"),
            ("date8", "2019年10月1日"),
            ("date8", "2019-10-01"),
            ("phone_number9", "+86-13800138000"),
            ("car_number10", "粤A8Z888"),
            ("name11", "张三"),
            ("name11", "John Smith"),
            ("phrase12", "已发货"),
        ];
        for (k, v) in ok {
            assert_eq!(check_value(k, v), Ok(()), "{k}={v}");
        }
        let bad = [
            ("thing1", "字".repeat(21)),
            ("thing1", String::new()),
            ("number2", "12a".into()),
            ("number2", "1".repeat(33)),
            ("letter3", "abc1".into()),
            ("symbol4", "%%%%%%".into()),
            ("symbol4", "a".into()),
            ("character_string5", "中文".into()),
            ("character_string5", "a b".into()),
            ("amount6", "¥12345678901".into()),
            ("amount6", "¥1.234".into()),
            ("amount6", "一百元".into()),
            ("time7", "tomorrow".into()),
            ("time7", "2019年10月1日".into()),
            ("date8", "15:01".into()),
            ("phone_number9", "1".repeat(18)),
            ("phone_number9", "call me".into()),
            ("car_number10", "粤A8Z888888".into()),
            ("name11", "张三John".into()),
            ("name11", "张".repeat(11)),
            ("phrase12", "已经发货了啊".into()),
            ("phrase12", "ok".into()),
            ("weird1", "x".into()),
        ];
        for (k, v) in bad {
            assert!(check_value(k, &v).is_err(), "{k}={v} should be refused");
        }
    }

    #[test]
    fn wire_form_wraps_values() {
        let msg = SubscribeMessage {
            touser: OpenId::new("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o").unwrap(),
            template_id: "TPL".into(),
            page: Some("pages/order/index?id=1".into()),
            data: BTreeMap::from([("thing1".to_owned(), "已支付".to_owned())]),
            miniprogram_state: MiniprogramState::Trial,
            lang: Lang::ZhCn,
        };
        let v = serde_json::to_value(&msg).unwrap();
        assert_eq!(v["data"]["thing1"]["value"], "已支付");
        assert_eq!(v["miniprogram_state"], "trial");
        assert_eq!(v["lang"], "zh_CN");
        assert_eq!(v["touser"], "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o");
        let back: SubscribeMessage = serde_json::from_value(v).unwrap();
        assert_eq!(back, msg);
        let minimal: SubscribeMessage =
            serde_json::from_str(r#"{"touser":"o1","template_id":"T","data":{"thing1":{"value":"x"}}}"#).unwrap();
        assert_eq!(minimal.miniprogram_state, MiniprogramState::Formal);
    }
}
