//! The `[notifier]` section of `paystream.toml`: which mini-program version messages open, who may receive them
//! outside `formal`, and how each logical template maps onto a WeChat subscribe template and a Tencent SMS
//! template.

use std::collections::BTreeMap;
use std::fmt;

use bus::events::NotifyTemplate;
use chrono::FixedOffset;
use serde::{Deserialize, Deserializer, de::Error as _};
use wechat::{Lang, MiniprogramState, OpenId, miniprogram::subscribe::key_type};

use crate::render::{self, Param};

/// A value of `[notifier]` that cannot be used, with its full key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {message}")]
pub struct ConfigError {
    /// Full dotted key, for example `notifier.templates.pay_success.fields.thing1`.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { key: key.into(), message: message.into() }
    }
}

/// `[notifier]`. `Debug` masks the allow-listed openids (`paystream config` prints the configuration).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifierConfig {
    /// `developer`, `trial` or `formal`: the version of the mini-program a message opens. Required, no default:
    /// sending to every user must be a decision someone wrote down. Never taken from a request.
    #[serde(deserialize_with = "miniprogram_state")]
    pub miniprogram_state: MiniprogramState,
    /// Outside `formal`, only these openids receive messages; everyone else is recorded as `suppressed`.
    /// Must be present outside `formal` (`[]` explicitly sends to nobody) and absent in `formal` (where every
    /// user receives messages), so that a switch of state cannot silently widen or narrow the audience.
    #[serde(default)]
    pub allow_openids: Option<Vec<String>>,
    /// Language of the message chrome: `zh_CN` (default), `en_US`, `zh_HK`, `zh_TW`.
    #[serde(default)]
    pub lang: Lang,
    /// The offset dates are shown in, like `+08:00` (default, China Standard Time).
    #[serde(default)]
    pub time_zone: TimeZone,
    /// Send SMS. Default: on when an `[sms]` section exists. Off, SMS requests are recorded as `suppressed`.
    #[serde(default)]
    pub sms_enabled: Option<bool>,
    /// One entry per logical template; a template (or a channel of it) left out is recorded as `suppressed`.
    #[serde(default)]
    pub templates: Templates,
}

impl fmt::Debug for NotifierConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let allow = self.allow_openids.as_ref().map(|l| l.iter().map(|o| observability::mask(o)).collect::<Vec<_>>());
        f.debug_struct("NotifierConfig")
            .field("miniprogram_state", &state_name(self.miniprogram_state))
            .field("allow_openids", &allow)
            .field("lang", &self.lang)
            .field("time_zone", &self.time_zone)
            .field("sms_enabled", &self.sms_enabled)
            .field("templates", &self.templates)
            .finish()
    }
}

fn miniprogram_state<'de, D: Deserializer<'de>>(d: D) -> Result<MiniprogramState, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "developer" => Ok(MiniprogramState::Developer),
        "trial" => Ok(MiniprogramState::Trial),
        "formal" => Ok(MiniprogramState::Formal),
        other => Err(D::Error::custom(format!(
            "notifier.miniprogram_state must be developer, trial or formal, got {other:?}"
        ))),
    }
}

/// The state's name as written in the configuration.
pub fn state_name(state: MiniprogramState) -> &'static str {
    match state {
        MiniprogramState::Developer => "developer",
        MiniprogramState::Trial => "trial",
        MiniprogramState::Formal => "formal",
    }
}

/// A fixed UTC offset (`+08:00`). China has no daylight saving time, so a fixed offset is exact there and keeps
/// the time-zone database out of the build.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TimeZone(pub FixedOffset);

impl Default for TimeZone {
    fn default() -> Self {
        TimeZone(FixedOffset::east_opt(8 * 3600).expect("+08:00 is a valid offset"))
    }
}

impl TimeZone {
    /// Parses `+HH:MM`, `-HH:MM` or `Z`.
    pub fn parse(s: &str) -> Result<TimeZone, ConfigError> {
        let bad = || ConfigError::new("notifier.time_zone", format!("must be an offset like +08:00, got {s:?}"));
        if s == "Z" {
            return Ok(TimeZone(FixedOffset::east_opt(0).expect("zero offset")));
        }
        let (sign, rest) = match s.as_bytes().first() {
            Some(b'+') => (1, &s[1..]),
            Some(b'-') => (-1, &s[1..]),
            _ => return Err(bad()),
        };
        let (h, m) = rest.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 14 || m > 59 {
            return Err(bad());
        }
        FixedOffset::east_opt(sign * (h * 3600 + m * 60)).map(TimeZone).ok_or_else(bad)
    }
}

impl fmt::Debug for TimeZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for TimeZone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TimeZone::parse(&s).map_err(|e| D::Error::custom(e.to_string()))
    }
}

/// `[notifier.templates.*]`: one optional entry per logical template.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Templates {
    pub pay_success: Option<TemplateConfig>,
    pub checkin_notice: Option<TemplateConfig>,
    pub refund_success: Option<TemplateConfig>,
    pub order_closed: Option<TemplateConfig>,
}

impl Templates {
    pub fn get(&self, template: NotifyTemplate) -> Option<&TemplateConfig> {
        match template {
            NotifyTemplate::PaySuccess => self.pay_success.as_ref(),
            NotifyTemplate::CheckinNotice => self.checkin_notice.as_ref(),
            NotifyTemplate::RefundSuccess => self.refund_success.as_ref(),
            NotifyTemplate::OrderClosed => self.order_closed.as_ref(),
        }
    }

    fn all(&self) -> [(NotifyTemplate, Option<&TemplateConfig>); 4] {
        [
            NotifyTemplate::PaySuccess,
            NotifyTemplate::CheckinNotice,
            NotifyTemplate::RefundSuccess,
            NotifyTemplate::OrderClosed,
        ]
        .map(|t| (t, self.get(t)))
    }
}

/// `[notifier.templates.<name>]`: how one logical template is sent on each channel.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// The WeChat subscribe-message template id. Absent: this template is not sent as a subscribe message.
    pub template_id: Option<String>,
    /// The mini-program page the message opens; `{order_sn}` is replaced by the order's serial number.
    pub page: Option<String>,
    /// WeChat template key → the parameter it shows, e.g. `{ thing1 = "title", amount2 = "amount" }`. Each key's
    /// type (`thing`, `amount`, `time`, …) decides how the parameter is written and which parameters fit.
    #[serde(default)]
    pub fields: BTreeMap<String, Param>,
    /// The Tencent Cloud SMS template id (digits). Absent: this template is not sent by SMS.
    pub sms_template_id: Option<String>,
    /// The SMS template's variables, in order.
    #[serde(default)]
    pub sms_params: Vec<Param>,
}

impl NotifierConfig {
    /// Checks every value; the first problem names its key. `sms_configured` says whether `[sms]` exists.
    pub fn validate(&self, sms_configured: bool) -> Result<(), ConfigError> {
        let formal = self.miniprogram_state == MiniprogramState::Formal;
        let state = state_name(self.miniprogram_state);
        match (&self.allow_openids, formal) {
            (None, false) => {
                return Err(ConfigError::new(
                    "notifier.allow_openids",
                    format!(
                        "must be set when notifier.miniprogram_state is {state}: list the testers' openids, or [] to \
                         send to nobody"
                    ),
                ));
            }
            (Some(_), true) => {
                return Err(ConfigError::new(
                    "notifier.allow_openids",
                    "must not be set when notifier.miniprogram_state is formal (formal sends to every user); remove it",
                ));
            }
            (Some(list), false) => {
                for (i, openid) in list.iter().enumerate() {
                    if OpenId::new(openid.as_str()).is_err() {
                        return Err(ConfigError::new(
                            format!("notifier.allow_openids[{i}]"),
                            "is not an openid (1 to 128 characters of A-Z, a-z, 0-9, _ and -)",
                        ));
                    }
                }
            }
            (None, true) => {}
        }
        if self.sms_enabled == Some(true) && !sms_configured {
            return Err(ConfigError::new("notifier.sms_enabled", "is true but there is no [sms] section"));
        }
        let mut any = false;
        for (template, cfg) in self.templates.all() {
            if let Some(cfg) = cfg {
                any = true;
                cfg.validate(&format!("notifier.templates.{}", template.as_str()))?;
            }
        }
        if !any {
            return Err(ConfigError::new(
                "notifier.templates",
                "must configure at least one of pay_success, checkin_notice, refund_success, order_closed",
            ));
        }
        Ok(())
    }

    /// Whether SMS is sent: `sms_enabled`, defaulting to whether `[sms]` exists.
    pub fn sms_on(&self, sms_configured: bool) -> bool {
        self.sms_enabled.unwrap_or(sms_configured)
    }

    /// Whether `openid` may receive a subscribe message under this configuration.
    pub fn allows(&self, openid: &str) -> bool {
        match self.miniprogram_state {
            MiniprogramState::Formal => true,
            _ => self.allow_openids.as_ref().is_some_and(|l| l.iter().any(|o| o == openid)),
        }
    }
}

impl TemplateConfig {
    fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let err = |key: &str, msg: &str| Err(ConfigError::new(format!("{prefix}.{key}"), msg));
        match &self.template_id {
            Some(id) => {
                if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                    return err("template_id", "must be 1 to 128 visible ASCII characters");
                }
                if self.fields.is_empty() {
                    return err("fields", "must map at least one template key to a parameter");
                }
                for (key, param) in &self.fields {
                    let Some(ty) = key_type(key) else {
                        return err(&format!("fields.{key}"), "is not a template key like thing1 or amount2");
                    };
                    if !render::fits(ty, *param) {
                        return Err(ConfigError::new(
                            format!("{prefix}.fields.{key}"),
                            format!(
                                "cannot show {} in a {ty} key (fits: {})",
                                param.as_str(),
                                render::fitting(ty).iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
                            ),
                        ));
                    }
                }
                if let Some(page) = &self.page {
                    let rest = page.replace("{order_sn}", "");
                    if page.is_empty() || page.len() > 1024 || page.starts_with("http") || page.starts_with('/') {
                        return err(
                            "page",
                            "must be a mini-program page path such as pages/order/detail?sn={order_sn}",
                        );
                    }
                    if rest.contains(['{', '}']) {
                        return err("page", "may only use the placeholder {order_sn}");
                    }
                }
            }
            None => {
                if !self.fields.is_empty() || self.page.is_some() {
                    return err("template_id", "must be set when fields or page are");
                }
            }
        }
        match &self.sms_template_id {
            Some(id) => {
                if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                    return err("sms_template_id", "must be digits");
                }
            }
            None => {
                if !self.sms_params.is_empty() {
                    return err("sms_template_id", "must be set when sms_params is");
                }
            }
        }
        if self.template_id.is_none() && self.sms_template_id.is_none() {
            return err("template_id", "or sms_template_id must be set");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use figment::{
        Figment,
        providers::{Format, Toml},
    };

    use super::*;

    fn parse(toml: &str) -> Result<NotifierConfig, String> {
        Figment::from(Toml::string(toml)).extract_inner::<NotifierConfig>("notifier").map_err(|e| e.to_string())
    }

    const TEMPLATES: &str = r#"
        [notifier.templates.pay_success]
        template_id = "TPL_PAID"
        page = "pages/order/detail?sn={order_sn}"
        fields = { character_string6 = "order_sn", thing1 = "title", amount2 = "amount", time4 = "live_start" }
        sms_template_id = "100001"
        sms_params = ["order_sn", "amount"]
    "#;

    fn with(head: &str) -> String {
        format!("[notifier]\n{head}\n{TEMPLATES}")
    }

    #[test]
    fn a_complete_section_parses_with_defaults() {
        let c = parse(&with("miniprogram_state = \"trial\"\nallow_openids = [\"oAbc\"]")).unwrap();
        c.validate(true).unwrap();
        assert_eq!(c.miniprogram_state, MiniprogramState::Trial);
        assert_eq!(c.lang, Lang::ZhCn);
        assert_eq!(c.time_zone.0.local_minus_utc(), 8 * 3600);
        assert!(c.sms_on(true) && !c.sms_on(false));
        assert!(c.allows("oAbc") && !c.allows("oOther"));
        let t = c.templates.get(NotifyTemplate::PaySuccess).unwrap();
        assert_eq!(t.fields["amount2"], Param::Amount);
        assert_eq!(t.sms_params, vec![Param::OrderSn, Param::Amount]);
        assert!(c.templates.get(NotifyTemplate::OrderClosed).is_none());
        let printed = format!("{c:?}");
        assert!(printed.contains("trial") && !printed.contains("oAbc\""), "openids are masked: {printed}");
    }

    #[test]
    fn the_state_is_required_and_checked_by_name() {
        let e = parse(&with("allow_openids = []")).unwrap_err();
        assert!(e.contains("miniprogram_state"), "{e}");
        let e = parse(&with("miniprogram_state = \"staging\"\nallow_openids = []")).unwrap_err();
        assert!(e.contains("notifier.miniprogram_state must be developer, trial or formal"), "{e}");
    }

    #[test]
    fn the_allow_list_is_a_decision_outside_formal_and_absent_in_formal() {
        let e = parse(&with("miniprogram_state = \"developer\"")).unwrap().validate(true).unwrap_err();
        assert_eq!(e.key, "notifier.allow_openids");
        parse(&with("miniprogram_state = \"developer\"\nallow_openids = []")).unwrap().validate(true).unwrap();
        let e = parse(&with("miniprogram_state = \"formal\"\nallow_openids = []")).unwrap().validate(true).unwrap_err();
        assert_eq!(e.key, "notifier.allow_openids");
        let formal = parse(&with("miniprogram_state = \"formal\"")).unwrap();
        formal.validate(true).unwrap();
        assert!(formal.allows("anyone"));
        let e = parse(&with("miniprogram_state = \"trial\"\nallow_openids = [\"not an openid\"]"))
            .unwrap()
            .validate(true)
            .unwrap_err();
        assert_eq!(e.key, "notifier.allow_openids[0]");
        assert!(!e.to_string().contains("not an openid\""), "the value itself is not echoed: {e}");
    }

    #[test]
    fn bad_values_name_their_keys() {
        let e = parse(&with("miniprogram_state = \"formal\"\ntime_zone = \"Asia/Shanghai\"")).unwrap_err();
        assert!(e.contains("notifier.time_zone"), "{e}");
        let e = parse(&with("miniprogram_state = \"formal\"\nlang = \"fr_FR\"")).unwrap_err();
        assert!(e.contains("lang"), "{e}");
        let e = parse(&with("miniprogram_state = \"formal\"\nmode = \"x\"")).unwrap_err();
        assert!(e.contains("mode"), "{e}");
        let e =
            parse(&with("miniprogram_state = \"formal\"\nsms_enabled = true")).unwrap().validate(false).unwrap_err();
        assert_eq!(e.key, "notifier.sms_enabled");

        let bad_field = "[notifier]\nminiprogram_state = \"formal\"\n[notifier.templates.pay_success]\n\
                         template_id = \"T\"\nfields = { amount1 = \"title\" }\n";
        let e = parse(bad_field).unwrap().validate(false).unwrap_err();
        assert_eq!(e.key, "notifier.templates.pay_success.fields.amount1");
        assert!(e.message.contains("amount"), "{e}");
        let bad_key = "[notifier]\nminiprogram_state = \"formal\"\n[notifier.templates.pay_success]\n\
                       template_id = \"T\"\nfields = { Thing = \"title\" }\n";
        assert_eq!(
            parse(bad_key).unwrap().validate(false).unwrap_err().key,
            "notifier.templates.pay_success.fields.Thing"
        );
        let bad_param = "[notifier]\nminiprogram_state = \"formal\"\n[notifier.templates.pay_success]\n\
                         template_id = \"T\"\nfields = { thing1 = \"nickname\" }\n";
        assert!(parse(bad_param).unwrap_err().contains("nickname"));
        let bad_page = "[notifier]\nminiprogram_state = \"formal\"\n[notifier.templates.pay_success]\n\
                        template_id = \"T\"\npage = \"https://x\"\nfields = { thing1 = \"title\" }\n";
        assert_eq!(parse(bad_page).unwrap().validate(false).unwrap_err().key, "notifier.templates.pay_success.page");
        let bad_sms = "[notifier]\nminiprogram_state = \"formal\"\n[notifier.templates.pay_success]\n\
                       sms_template_id = \"SMS_1\"\n";
        assert_eq!(
            parse(bad_sms).unwrap().validate(true).unwrap_err().key,
            "notifier.templates.pay_success.sms_template_id"
        );
        let unknown_template = "[notifier]\nminiprogram_state = \"formal\"\n[notifier.templates.paid]\n\
                                sms_template_id = \"1\"\n";
        assert!(parse(unknown_template).unwrap_err().contains("paid"));
        let none = "[notifier]\nminiprogram_state = \"formal\"\n";
        assert_eq!(parse(none).unwrap().validate(true).unwrap_err().key, "notifier.templates");
    }

    #[test]
    fn time_zones() {
        assert_eq!(TimeZone::parse("+08:00").unwrap().0.local_minus_utc(), 28800);
        assert_eq!(TimeZone::parse("-05:30").unwrap().0.local_minus_utc(), -19800);
        assert_eq!(TimeZone::parse("Z").unwrap().0.local_minus_utc(), 0);
        for bad in ["8", "+8:00", "+08", "UTC", "+15:00", "+08:60", ""] {
            assert!(TimeZone::parse(bad).is_err(), "{bad}");
        }
    }
}
