//! The SMS channel: Tencent Cloud `SendSms` to the user's mobile number.

use std::time::Instant;

use bus::events::{NotificationRequest, SmsNotify};
use storage::{StorageError, users};
use wechat::{SmsClient, SmsError, sms::SendStatus, sms::is_phone_number};

use crate::flow::{Channel, Outcome, Shared, storage_outcome};
use crate::{metrics, render};

pub(crate) struct Sms {
    /// `None` when SMS is off: requests are then recorded as suppressed, so they do not wait in the stream to be
    /// sent days late when SMS is turned on.
    pub client: Option<SmsClient>,
}

impl Channel for Sms {
    const NAME: &'static str = "sms";
    type Event = SmsNotify;

    fn request(event: &SmsNotify) -> &NotificationRequest {
        &event.0
    }

    async fn attempt(&self, shared: &Shared, req: &NotificationRequest) -> Outcome {
        let Some(client) = &self.client else {
            return Outcome::Suppressed("SMS is off (notifier.sms_enabled, or no [sms] section)".into());
        };
        let name = req.template.as_str();
        let Some(template) = shared.config.templates.get(req.template) else {
            return Outcome::Suppressed(format!("notifier.templates.{name} is not configured"));
        };
        let Some(template_id) = &template.sms_template_id else {
            return Outcome::Suppressed(format!("notifier.templates.{name} has no sms_template_id"));
        };
        let user = {
            let lookup = async {
                let mut conn = shared.pool.get().await.map_err(StorageError::from)?;
                users::find(&mut conn, req.user_id).await
            };
            match lookup.await {
                Ok(Some(u)) => u,
                Ok(None) => return Outcome::Invalid(format!("user {} does not exist", req.user_id)),
                Err(e) => return storage_outcome(e),
            }
        };
        let Some(mobile) = user.mobile.map(|m| m.trim().to_owned()).filter(|m| !m.is_empty()) else {
            return Outcome::Suppressed("the user has no mobile number".into());
        };
        if !is_phone_number(&mobile) {
            return Outcome::Invalid("the user's mobile number is not one Tencent Cloud takes".into());
        }
        let params = match render::sms_params(&template.sms_params, &req.params, shared.config.time_zone.0) {
            Ok(p) => p,
            Err(e) => return Outcome::Invalid(e.to_string()),
        };
        let started = Instant::now();
        let result = client.send_sms(template_id, &params, std::slice::from_ref(&mobile)).await;
        metrics::send_seconds(Self::NAME, started.elapsed().as_secs_f64());
        classify(result)
    }
}

/// Tencent Cloud's answer as an outcome.
pub(crate) fn classify(result: Result<Vec<SendStatus>, SmsError>) -> Outcome {
    match result {
        Ok(statuses) => match statuses.into_iter().next() {
            Some(s) if s.is_ok() => Outcome::Sent { provider_msg_id: Some(s.serial_no).filter(|n| !n.is_empty()) },
            // Per-number failures carry Tencent's code and message (never the number itself here).
            Some(s) if s.code.starts_with("LimitExceeded") || s.code.starts_with("InternalError") => {
                Outcome::Transient(format!("{}: {}", s.code, s.message))
            }
            Some(s) => Outcome::Invalid(format!("{}: {}", s.code, s.message)),
            None => Outcome::Transient("SendSms answered without a status for the number".into()),
        },
        Err(e) if e.is_retryable() => Outcome::Transient(e.to_string()),
        Err(e @ SmsError::Invalid(_)) => Outcome::Invalid(e.to_string()),
        // Authentication, an unapproved signature or template: configuration, not the message. Dead-lettered as
        // `failed`, to be redriven once fixed.
        Err(e) => Outcome::Broken(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: &str) -> SendStatus {
        serde_json::from_value(serde_json::json!({
            "SerialNo": "2028:1", "PhoneNumber": "+8613800138000", "Code": code, "Message": "m"
        }))
        .unwrap()
    }

    #[test]
    fn answers_map_to_outcomes() {
        assert_eq!(classify(Ok(vec![status("Ok")])), Outcome::Sent { provider_msg_id: Some("2028:1".into()) });
        assert!(matches!(classify(Ok(vec![status("LimitExceeded.PhoneNumberDailyLimit")])), Outcome::Transient(_)));
        assert!(matches!(
            classify(Ok(vec![status("InvalidParameterValue.IncorrectPhoneNumber")])),
            Outcome::Invalid(r) if !r.contains("13800138000")
        ));
        assert!(matches!(classify(Ok(vec![])), Outcome::Transient(_)));
        assert!(matches!(classify(Err(SmsError::Timeout)), Outcome::Transient(_)));
        let api = |code: &str| SmsError::Api { code: code.into(), message: "m".into(), request_id: "r".into() };
        assert!(matches!(classify(Err(api("InternalError.Timeout"))), Outcome::Transient(_)));
        assert!(matches!(classify(Err(api("AuthFailure.SignatureFailure"))), Outcome::Broken(_)));
        assert!(matches!(classify(Err(SmsError::Invalid("x".into()))), Outcome::Invalid(_)));
    }
}
