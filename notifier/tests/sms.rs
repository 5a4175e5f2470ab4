//! SMS end to end: real PostgreSQL, real NATS, the Tencent Cloud SMS side of the sandbox.

mod common;

use bus::Envelope;
use bus::events::{NotifyTemplate::*, SmsNotify};
use common::{Env, notifier_config, order_sn, request};
use notifier::SMS_CONSUMER;
use sandbox::{Api, Fault};

#[tokio::test(flavor = "multi_thread")]
async fn a_user_with_a_mobile_number_gets_one_sms() {
    let mut env = Env::new().await;
    let (user, _) = env.user("ivan:1", Some("13800138000")).await;
    env.start(notifier_config("formal", ""));
    let sn = order_sn();
    let req = request(PaySuccess, user, &sn);
    for _ in 0..3 {
        env.publisher.publish(&Envelope::new(SmsNotify(req.clone()))).await.unwrap();
    }

    let row = env.wait_status(&req.key("sms"), "sent").await;
    env.settled(SMS_CONSUMER).await;
    let sent = env.sandbox.control().sms().await.unwrap();
    assert_eq!(sent.len(), 1, "three deliveries, one SMS");
    assert_eq!(sent[0].phone_numbers, ["13800138000"]);
    assert_eq!(sent[0].template_id, "100001");
    assert_eq!(sent[0].template_params, [sn.as_str(), "123.45", "2026-12-01 14:00"]);
    assert_eq!(sent[0].codes, ["Ok"]);
    assert!(row.provider_msg_id.is_some() && row.attempts == 1 && row.sent_time.is_some());
    assert_eq!(row.channel, "sms");
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn users_without_a_mobile_templates_without_sms_and_sms_off_are_suppressed() {
    let mut env = Env::new().await;
    let (no_mobile, _) = env.user("judy:1", None).await;
    let (with_mobile, _) = env.user("ken:1", Some("13900139000")).await;
    env.start(notifier_config("formal", ""));
    let (a, b) = (order_sn(), order_sn());
    env.publisher.publish(&SmsNotify(request(PaySuccess, no_mobile, &a)).envelope()).await.unwrap();
    // checkin_notice has no sms_template_id in the test configuration.
    env.publisher.publish(&SmsNotify(request(CheckinNotice, with_mobile, &b)).envelope()).await.unwrap();

    let row = env.wait_status(&format!("{a}:pay_success:sms"), "suppressed").await;
    assert_eq!(row.last_error.as_deref(), Some("the user has no mobile number"));
    let row = env.wait_status(&format!("{b}:checkin_notice:sms"), "suppressed").await;
    assert!(row.last_error.unwrap().contains("sms_template_id"));
    env.settled(SMS_CONSUMER).await;
    env.stop().await.unwrap();

    // With SMS turned off, requests are recorded as suppressed rather than left in the stream.
    let mut config = notifier_config("formal", "");
    config.sms_enabled = Some(false);
    env.start(config);
    let c = order_sn();
    env.publisher.publish(&SmsNotify(request(PaySuccess, with_mobile, &c)).envelope()).await.unwrap();
    let row = env.wait_status(&format!("{c}:pay_success:sms"), "suppressed").await;
    assert!(row.last_error.unwrap().contains("SMS is off"));
    env.settled(SMS_CONSUMER).await;
    assert!(env.sandbox.control().sms().await.unwrap().is_empty());
    assert_eq!(env.dead_letters(SMS_CONSUMER).await, 0);
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tencent_outage_delays_but_loses_nothing() {
    let mut env = Env::new().await;
    let (user, _) = env.user("leo:1", Some("+8613700137000")).await;
    let fault = Fault::Fail {
        api: Api::SmsSend,
        times: 3,
        status: None,
        code: Some("InternalError.Timeout".into()),
        message: None,
        errcode: None,
    };
    env.sandbox.control().fault(&fault).await.unwrap();
    env.start(notifier_config("formal", ""));
    let sn = order_sn();
    let req = request(PaySuccess, user, &sn);
    env.publisher.publish(&SmsNotify(req.clone()).envelope()).await.unwrap();

    let row = env.wait_status(&req.key("sms"), "sent").await;
    assert_eq!(row.attempts, 4);
    env.settled(SMS_CONSUMER).await;
    let sent = env.sandbox.control().sms().await.unwrap();
    assert_eq!(sent.iter().filter(|s| s.codes == ["Ok"]).count(), 1);
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mobile_number_tencent_cannot_take_is_invalid_and_dead_lettered() {
    let mut env = Env::new().await;
    let (user, _) = env.user("mallory:1", Some("12345")).await;
    env.start(notifier_config("formal", ""));
    let sn = order_sn();
    env.publisher.publish(&SmsNotify(request(PaySuccess, user, &sn)).envelope()).await.unwrap();

    let row = env.wait_status(&format!("{sn}:pay_success:sms"), "invalid").await;
    let reason = row.last_error.unwrap();
    assert!(reason.contains("mobile number") && !reason.contains("12345"), "{reason}");
    env.settled(SMS_CONSUMER).await;
    assert_eq!(env.dead_letters(SMS_CONSUMER).await, 1);
    assert!(env.sandbox.control().sms().await.unwrap().is_empty());
    env.stop().await.unwrap();
}
