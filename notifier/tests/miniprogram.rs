//! Mini-program subscribe messages end to end: real PostgreSQL, real NATS, the WeChat sandbox.

mod common;

use bus::events::{MiniprogramNotify, NotifyTemplate::*};
use bus::{ConsumerConfig, Envelope};
use common::{Env, consumer_config, notifier_config, order_sn, request};
use notifier::MINIPROGRAM_CONSUMER;
use notifier::ledger::{self, Claim, NewNotification};
use sandbox::{Api, Fault};
use serde_json::Value;

fn value(data: &Value, key: &str) -> String {
    data[key]["value"].as_str().unwrap_or_else(|| panic!("no {key} in {data}")).to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paid_order_gets_exactly_one_pay_success_and_one_checkin_message() {
    let mut env = Env::new().await;
    let (user, openid) = env.user("alice:1", None).await;
    env.start(notifier_config("formal", ""));
    let sn = order_sn();
    for template in [PaySuccess, CheckinNotice] {
        env.publisher.publish(&MiniprogramNotify(request(template, user, &sn)).envelope()).await.unwrap();
    }

    let paid = env.wait_status(&format!("{sn}:pay_success:miniprogram"), "sent").await;
    let checkin = env.wait_status(&format!("{sn}:checkin_notice:miniprogram"), "sent").await;
    env.settled(MINIPROGRAM_CONSUMER).await;

    let messages = env.messages_to(&openid).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    let pay = messages.iter().find(|m| m.template_id == "TPL_PAY_SUCCESS").unwrap();
    assert_eq!(pay.miniprogram_state, "formal");
    assert_eq!(pay.lang, "zh_CN");
    assert_eq!(pay.page.as_deref(), Some(format!("pages/order/detail?sn={sn}").as_str()));
    assert_eq!(value(&pay.data, "character_string6"), sn.as_str());
    assert_eq!(value(&pay.data, "amount2"), "¥123.45");
    assert_eq!(value(&pay.data, "time4"), "2026-12-01 14:00", "check-in from the order, in +08:00");
    assert_eq!(value(&pay.data, "time5"), "2026-12-03 12:00");
    let title = value(&pay.data, "thing1");
    assert_eq!(title.chars().count(), 20);
    assert!(title.starts_with("西湖边的安静小院") && title.ends_with('…'), "{title}");
    assert_eq!(paid.provider_msg_id, Some(pay.msgid.to_string()));
    assert!(paid.sent_time.is_some() && paid.attempts == 1 && paid.last_error.is_none());

    let check = messages.iter().find(|m| m.template_id == "TPL_CHECKIN").unwrap();
    assert_eq!(value(&check.data, "character_string3"), "K7Q2M9", "the trade code");
    assert_eq!(value(&check.data, "date2"), "2026-12-01~2026-12-03");
    assert_eq!(value(&check.data, "number4"), "2");
    assert_eq!(checkin.provider_msg_id, Some(check.msgid.to_string()));

    let metrics = observability::render_metrics();
    assert!(metrics.contains(r#"paystream_notifications_total{channel="miniprogram",outcome="sent"}"#), "{metrics}");
    assert!(metrics.contains(r#"paystream_notification_send_seconds_count{channel="miniprogram"}"#));
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_request_delivered_five_times_sends_one_message() {
    let mut env = Env::new().await;
    let (user, openid) = env.user("bob:1", None).await;
    env.start(notifier_config("formal", ""));
    let sn = order_sn();
    let req = request(PaySuccess, user, &sn);
    // Five distinct messages (fresh ids, so JetStream cannot drop them) carrying the same request, handled
    // concurrently; then the event itself twice, which JetStream de-duplicates by id.
    for _ in 0..5 {
        env.publisher.publish(&Envelope::new(MiniprogramNotify(req.clone()))).await.unwrap();
    }
    for _ in 0..2 {
        env.publisher.publish(&MiniprogramNotify(req.clone()).envelope()).await.unwrap();
    }

    let row = env.wait_status(&req.key("miniprogram"), "sent").await;
    env.settled(MINIPROGRAM_CONSUMER).await;
    assert_eq!(env.messages_to(&openid).await.len(), 1);
    assert_eq!(row.attempts, 1, "replays never claimed the key again");
    assert_eq!(env.dead_letters(MINIPROGRAM_CONSUMER).await, 0);

    // A replay long after (past JetStream's duplicate window, say) is acknowledged without sending.
    env.publisher.publish(&Envelope::new(MiniprogramNotify(req.clone()))).await.unwrap();
    env.settled(MINIPROGRAM_CONSUMER).await;
    assert_eq!(env.messages_to(&openid).await.len(), 1);
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notifier_killed_between_claim_and_send_sends_once_after_its_lease() {
    let mut env = Env::new().await;
    let (user, openid) = env.user("carol:1", None).await;
    let sn = order_sn();
    let req = request(PaySuccess, user, &sn);
    let key = req.key("miniprogram");
    // The previous notifier claimed the key and died before sending: its claim is committed, nothing was sent.
    {
        let mut conn = env.pool.get().await.unwrap();
        let new = NewNotification {
            key: &key,
            channel: "miniprogram",
            template: "pay_success",
            user_id: user,
            order_sn: sn.as_str(),
        };
        let claim = ledger::claim(&mut conn, &new, consumer_config().handler_timeout).await.unwrap();
        assert_eq!(claim, Claim::Owned { attempt: 1, resumed: false });
    }
    env.publisher.publish(&MiniprogramNotify(req.clone()).envelope()).await.unwrap();
    env.start(notifier_config("formal", ""));

    // The restarted notifier waits out the dead one's lease (the handler timeout), then takes the key over.
    let row = env.wait_status(&key, "sent").await;
    assert_eq!(row.attempts, 2);
    env.settled(MINIPROGRAM_CONSUMER).await;
    assert_eq!(env.messages_to(&openid).await.len(), 1);
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn trial_sends_only_to_allow_listed_openids() {
    let mut env = Env::new().await;
    let (tester, tester_openid) = env.user("tester:1", None).await;
    let (customer, customer_openid) = env.user("customer:1", None).await;
    env.start(notifier_config("trial", &format!("allow_openids = [\"{tester_openid}\"]")));
    let (a, b) = (order_sn(), order_sn());
    env.publisher.publish(&MiniprogramNotify(request(PaySuccess, tester, &a)).envelope()).await.unwrap();
    env.publisher.publish(&MiniprogramNotify(request(PaySuccess, customer, &b)).envelope()).await.unwrap();

    env.wait_status(&format!("{a}:pay_success:miniprogram"), "sent").await;
    let suppressed = env.wait_status(&format!("{b}:pay_success:miniprogram"), "suppressed").await;
    let reason = suppressed.last_error.unwrap();
    assert!(reason.contains("allow_openids") && reason.contains("trial"), "{reason}");
    assert!(!reason.contains(&customer_openid), "no openid in the recorded reason");
    env.settled(MINIPROGRAM_CONSUMER).await;

    let sent = env.messages_to(&tester_openid).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].miniprogram_state, "trial");
    assert!(env.messages_to(&customer_openid).await.is_empty());
    assert_eq!(env.dead_letters(MINIPROGRAM_CONSUMER).await, 0);
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configuration_that_cannot_be_used_refuses_to_start() {
    let mut env = Env::new().await;
    // An unknown state never gets past parsing, with the key named.
    let toml = common::NOTIFIER_TOML.replace("{state}", "staging").replace("{allow}", "allow_openids = []");
    let e = figment::Figment::from(<figment::providers::Toml as figment::providers::Format>::string(&toml))
        .extract_inner::<notifier::NotifierConfig>("notifier")
        .unwrap_err()
        .to_string();
    assert!(e.contains("notifier.miniprogram_state must be developer, trial or formal"), "{e}");
    // A state outside formal without an allow-list decision: the notifier does not start.
    env.start(notifier_config("developer", ""));
    let e = env.stop().await.unwrap_err().to_string();
    assert!(e.contains("notifier.allow_openids"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_who_refused_the_subscription_is_recorded_and_not_retried() {
    let mut env = Env::new().await;
    let (user, openid) = env.user("dave:1", None).await;
    env.sandbox.control().fault(&Fault::RefuseSubscribe { openid: openid.clone() }).await.unwrap();
    env.start(notifier_config("formal", ""));
    let sn = order_sn();
    env.publisher.publish(&MiniprogramNotify(request(PaySuccess, user, &sn)).envelope()).await.unwrap();

    let row = env.wait_status(&format!("{sn}:pay_success:miniprogram"), "refused_by_user").await;
    env.settled(MINIPROGRAM_CONSUMER).await;
    assert_eq!(row.attempts, 1, "43101 is an answer, not a failure");
    assert!(row.last_error.unwrap().contains("43101"));
    assert!(env.messages_to(&openid).await.is_empty());
    assert_eq!(env.dead_letters(MINIPROGRAM_CONSUMER).await, 0);
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn values_wechat_refuses_are_recorded_invalid_and_dead_lettered() {
    let mut env = Env::new().await;
    let (user, openid) = env.user("erin:1", None).await;
    env.start(notifier_config("formal", ""));

    // WeChat answers 47003.
    let fault = Fault::Fail {
        api: Api::SubscribeSend,
        times: 1,
        status: None,
        code: None,
        message: None,
        errcode: Some(47003),
    };
    env.sandbox.control().fault(&fault).await.unwrap();
    let a = order_sn();
    env.publisher.publish(&MiniprogramNotify(request(PaySuccess, user, &a)).envelope()).await.unwrap();
    let row = env.wait_status(&format!("{a}:pay_success:miniprogram"), "invalid").await;
    assert!(row.last_error.unwrap().contains("47003"));
    assert_eq!(row.attempts, 1);

    // A value that breaks its key's rule never leaves the process: a trade code with Chinese characters cannot
    // be a character_string, and codes are never cut.
    let b = order_sn();
    let mut req = request(CheckinNotice, user, &b);
    req.params.trade_code = "入住码K7Q2".into();
    env.publisher.publish(&MiniprogramNotify(req).envelope()).await.unwrap();
    let row = env.wait_status(&format!("{b}:checkin_notice:miniprogram"), "invalid").await;
    assert!(row.last_error.unwrap().contains("character_string3"));

    env.settled(MINIPROGRAM_CONSUMER).await;
    assert!(env.messages_to(&openid).await.is_empty());
    assert_eq!(
        env.dead_letters(MINIPROGRAM_CONSUMER).await,
        2,
        "invalid notifications are dead-lettered with the reason"
    );
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_is_refreshed_and_the_message_sent() {
    let mut env = Env::new().await;
    let (user, openid) = env.user("frank:1", None).await;
    env.start(notifier_config("formal", ""));
    let first = order_sn();
    env.publisher.publish(&MiniprogramNotify(request(PaySuccess, user, &first)).envelope()).await.unwrap();
    env.wait_status(&format!("{first}:pay_success:miniprogram"), "sent").await;

    // The cached token expires: the next send gets 42001, the client refreshes once and resends.
    env.sandbox.control().fault(&Fault::ExpireAccessToken).await.unwrap();
    let second = order_sn();
    env.publisher.publish(&MiniprogramNotify(request(PaySuccess, user, &second)).envelope()).await.unwrap();
    let row = env.wait_status(&format!("{second}:pay_success:miniprogram"), "sent").await;
    assert_eq!(row.attempts, 1, "refreshed within the attempt, no redelivery");
    env.settled(MINIPROGRAM_CONSUMER).await;
    assert_eq!(env.messages_to(&openid).await.len(), 2);
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wechat_outage_delays_but_loses_nothing() {
    let mut env = Env::new().await;
    let (user, openid) = env.user("grace:1", None).await;
    // WeChat is busy (-1) for the next six calls, then has a quota hiccup (45009).
    let control = env.sandbox.control();
    let busy =
        Fault::Fail { api: Api::SubscribeSend, times: 6, status: None, code: None, message: None, errcode: Some(-1) };
    control.fault(&busy).await.unwrap();
    let quota = Fault::Fail {
        api: Api::SubscribeSend,
        times: 1,
        status: None,
        code: None,
        message: None,
        errcode: Some(45009),
    };
    control.fault(&quota).await.unwrap();
    env.start(notifier_config("formal", ""));
    let sn = order_sn();
    let req = request(PaySuccess, user, &sn);
    env.publisher.publish(&MiniprogramNotify(req.clone()).envelope()).await.unwrap();

    let row = env.wait_status(&req.key("miniprogram"), "sent").await;
    assert_eq!(row.attempts, 8, "seven transient failures, each recorded as retrying and nak'ed, then sent");
    env.settled(MINIPROGRAM_CONSUMER).await;
    assert_eq!(env.messages_to(&openid).await.len(), 1);
    assert_eq!(env.dead_letters(MINIPROGRAM_CONSUMER).await, 0);
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_delivery_of_a_failing_message_is_recorded_failed_and_can_be_reopened() {
    let mut env = Env::new().await;
    let (user, openid) = env.user("heidi:1", None).await;
    let fail =
        Fault::Fail { api: Api::SubscribeSend, times: 3, status: None, code: None, message: None, errcode: Some(-1) };
    env.sandbox.control().fault(&fail).await.unwrap();
    let consumer = ConsumerConfig { max_deliver: 3, ..consumer_config() };
    env.start_with(notifier_config("formal", ""), consumer);
    let sn = order_sn();
    let req = request(PaySuccess, user, &sn);
    let key = req.key("miniprogram");
    env.publisher.publish(&MiniprogramNotify(req.clone()).envelope()).await.unwrap();

    let row = env.wait_status(&key, "failed").await;
    assert_eq!(row.attempts, 3);
    env.settled(MINIPROGRAM_CONSUMER).await;
    assert_eq!(env.dead_letters(MINIPROGRAM_CONSUMER).await, 1);
    assert!(env.messages_to(&openid).await.is_empty());

    // `failed` is final: a replay does not send. An operator reopens it, then redrives the dead letter.
    env.publisher.publish(&Envelope::new(MiniprogramNotify(req.clone()))).await.unwrap();
    env.settled(MINIPROGRAM_CONSUMER).await;
    assert!(env.messages_to(&openid).await.is_empty());
    let mut conn = env.pool.get().await.unwrap();
    assert!(ledger::reopen_failed(&mut conn, &key).await.unwrap());
    env.publisher.publish(&Envelope::new(MiniprogramNotify(req))).await.unwrap();
    let row = env.wait_status(&key, "sent").await;
    assert_eq!(row.attempts, 4);
    assert_eq!(env.messages_to(&openid).await.len(), 1);
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_slower_than_the_handler_allows_is_retried_without_waiting_for_the_lease() {
    let mut env = Env::new().await;
    let (user, openid) = env.user("ivy:1", None).await;
    // One call hangs longer than the whole handler timeout (3 s in these tests).
    let slow = Fault::Latency { api: Api::SubscribeSend, ms: 4_000, times: Some(1) };
    env.sandbox.control().fault(&slow).await.unwrap();
    env.start(notifier_config("formal", ""));
    let sn = order_sn();
    let req = request(PaySuccess, user, &sn);
    let started = std::time::Instant::now();
    env.publisher.publish(&MiniprogramNotify(req.clone()).envelope()).await.unwrap();

    // The handler gives up on the call at three quarters of its timeout, records `retrying`, and the next
    // delivery sends at once: no claim is left to run out.
    let row = env.wait_status(&req.key("miniprogram"), "sent").await;
    assert_eq!(row.attempts, 2);
    assert!(started.elapsed() < consumer_config().handler_timeout * 2, "took {:?}", started.elapsed());
    env.settled(MINIPROGRAM_CONSUMER).await;
    // The abandoned call may still have reached WeChat: that is the documented window for a second message.
    assert!(!env.messages_to(&openid).await.is_empty());
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_with_every_request_three_times_send_each_message_once() {
    let mut env = Env::new().await;
    let (user, openid) = env.user("judy:1", None).await;
    env.start(notifier_config("formal", ""));
    let replica = tokio_util::sync::CancellationToken::new();
    let other = env.spawn_replica(notifier_config("formal", ""), replica.clone());
    let orders: Vec<_> = (0..20).map(|_| order_sn()).collect();
    for _ in 0..3 {
        for sn in &orders {
            env.publisher.publish(&Envelope::new(MiniprogramNotify(request(PaySuccess, user, sn)))).await.unwrap();
        }
    }

    for sn in &orders {
        let row = env.wait_status(&format!("{sn}:pay_success:miniprogram"), "sent").await;
        assert_eq!(row.attempts, 1);
    }
    env.settled(MINIPROGRAM_CONSUMER).await;
    let messages = env.messages_to(&openid).await;
    assert_eq!(messages.len(), orders.len(), "one message per order across both replicas");
    let mut sns: Vec<String> = messages.iter().map(|m| value(&m.data, "character_string6")).collect();
    sns.sort();
    sns.dedup();
    assert_eq!(sns.len(), orders.len());
    replica.cancel();
    other.await.unwrap().unwrap();
    env.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_taken_in_batches_send_one_message_per_key_and_record_each_outcome() {
    let mut env = Env::new().await;
    let (alice, alice_openid) = env.user("batch-alice:1", None).await;
    let (bob, bob_openid) = env.user("batch-bob:1", None).await;
    // Everything waits in the stream before the notifier starts, so it is taken in batches: two users' messages,
    // the same request repeated inside the batch (another message id), and a key already sent earlier.
    let orders: Vec<_> = (0..8).map(|_| order_sn()).collect();
    let already = order_sn();
    let done = NewNotification {
        key: &format!("{already}:pay_success:miniprogram"),
        channel: "miniprogram",
        template: "pay_success",
        user_id: alice,
        order_sn: already.as_str(),
    };
    let mut conn = env.pool.get().await.unwrap();
    let Claim::Owned { attempt, .. } =
        ledger::claim(&mut conn, &done, std::time::Duration::from_secs(10)).await.unwrap()
    else {
        panic!("a new key is owned")
    };
    let sent = ledger::Record { status: ledger::Status::Sent, provider_msg_id: Some("1"), reason: None };
    assert!(ledger::record(&mut conn, done.key, attempt, &sent).await.unwrap());
    drop(conn);
    for (i, sn) in orders.iter().enumerate() {
        let user = if i % 2 == 0 { alice } else { bob };
        let env_ = MiniprogramNotify(request(PaySuccess, user, sn)).envelope();
        env.publisher.publish(&env_).await.unwrap();
        if i == 0 {
            // The same request again under another message id: JetStream keeps both, the ledger sends one.
            let again = Envelope::with_id(uuid::Uuid::new_v4(), env_.payload.clone());
            env.publisher.publish(&again).await.unwrap();
        }
    }
    env.publisher.publish(&MiniprogramNotify(request(PaySuccess, alice, &already)).envelope()).await.unwrap();

    env.start(notifier_config("formal", ""));
    for sn in &orders {
        env.wait_status(&format!("{sn}:pay_success:miniprogram"), "sent").await;
    }
    env.settled(MINIPROGRAM_CONSUMER).await;
    assert_eq!(env.messages_to(&alice_openid).await.len(), 4, "one per order, none for the key sent before");
    assert_eq!(env.messages_to(&bob_openid).await.len(), 4);
    assert_eq!(env.dead_letters(MINIPROGRAM_CONSUMER).await, 0);
    env.stop().await.unwrap();
}
