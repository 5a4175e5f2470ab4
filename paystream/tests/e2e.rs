//! The whole system through its real binaries, as an operator runs it: the WeChat sandbox, `paystream all`, and a
//! mini-program's calls over HTTP. Real NATS and Postgres (a fresh database and subject prefix per test).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use serde_json::{Value, json};

/// Formal: the sandbox is WeChat here, and formal needs no allow-list of test users.
const NOTIFIER: &str = r#"
[notifier]
miniprogram_state = "formal"

[notifier.templates.pay_success]
template_id = "TPL_PAY_SUCCESS"
page = "pages/order/detail?sn={order_sn}"
fields = { character_string6 = "order_sn", thing1 = "title", amount2 = "amount", time4 = "live_start", time5 = "live_end" }

[notifier.templates.checkin_notice]
template_id = "TPL_CHECKIN"
page = "pages/order/detail?sn={order_sn}"
fields = { thing1 = "title", date2 = "live_period", character_string3 = "trade_code", number4 = "live_people_num" }
"#;

struct System {
    _db: testkit::TestDb,
    dir: PathBuf,
    prefix: String,
    api: String,
    sandbox: String,
    children: Vec<Child>,
    http: reqwest::Client,
}

fn paystream() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_paystream"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYSTREAM") {
            c.env_remove(k);
        }
    }
    c.stderr(Stdio::null());
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl System {
    async fn start() -> System {
        let db = testkit::TestDb::create().await;
        let dir = std::env::temp_dir().join(testkit::unique("paystream-e2e-"));
        let (http_port, admin_port) = (free_port(), free_port());
        let api = format!("http://127.0.0.1:{http_port}");
        let status = paystream()
            .args(["sandbox", "init", "--dir"])
            .arg(&dir)
            .args(["--notify-url", &format!("{api}/payment/v1/thirdPayment/thirdPaymentWxPayCallback")])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let mut sandbox = paystream()
            .args(["sandbox", "--listen", "127.0.0.1:0", "--time-scale", "1000", "--dir"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(sandbox.stdout.take().unwrap()).read_line(&mut first).unwrap();
        let sandbox_url = first.trim().rsplit(' ').next().unwrap().to_owned();

        // The sandbox's configuration (rewritten with its bound address before it printed it) plus a notifier.
        let config = dir.join("all.toml");
        let sandbox_toml = std::fs::read_to_string(dir.join("paystream.toml")).unwrap();
        std::fs::write(&config, format!("{sandbox_toml}\n{NOTIFIER}")).unwrap();
        let prefix = testkit::unique("e2e");
        let all = paystream()
            .arg("--config")
            .arg(&config)
            .arg("all")
            .env("PAYSTREAM__DATABASE__URL", &db.url)
            .env("PAYSTREAM__NATS__URL", testkit::nats_url())
            .env("PAYSTREAM__NATS__PREFIX", &prefix)
            .env("PAYSTREAM__HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
            .env("PAYSTREAM__HTTP__JWT_SECRET", "e2e-test-secret-that-is-long-enough-0123456789")
            .env("PAYSTREAM__ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("PAYSTREAM__CONSUMER__BACKOFF", "[\"50ms\", \"100ms\"]")
            .env("PAYSTREAM__CONSUMER__MAX_DELIVER", "3")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let http = reqwest::Client::new();
        let ready = format!("http://127.0.0.1:{admin_port}/readyz");
        testkit::eventually(Duration::from_secs(30), "paystream all ready", || {
            let (http, ready) = (http.clone(), ready.clone());
            async move { http.get(&ready).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
        System { _db: db, dir, prefix, api, sandbox: sandbox_url, children: vec![sandbox, all], http }
    }

    async fn call(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.api)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    async fn ok(&self, path: &str, token: Option<&str>, body: Value) -> Value {
        let (status, body) = self.call(path, token, body).await;
        assert_eq!(status, 200, "{path}: {body}");
        body["data"].clone()
    }

    async fn sandbox(&self, path: &str, body: Value) {
        let r = self.http.post(format!("{}{path}", self.sandbox)).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "sandbox {path}: {}", r.text().await.unwrap());
    }

    async fn login(&self, who: &str) -> String {
        let code = format!("{who}-{}:1", testkit::unique(""));
        let data = self.ok("/usercenter/v1/user/wxMiniAuth", None, json!({ "code": code })).await;
        data["accessToken"].as_str().unwrap().to_owned()
    }

    /// Books two nights from a week ahead and asks for the pay parameters; returns (order sn, payment sn).
    async fn book_and_prepay(&self, token: &str) -> (String, String) {
        let start = chrono::Utc::now().timestamp() / 86_400 * 86_400 + 7 * 86_400;
        let order = self
            .ok(
                "/order/v1/homestayOrder/createHomestayOrder",
                Some(token),
                json!({ "homestayId": 1, "isFood": false, "liveStartTime": start, "liveEndTime": start + 2 * 86_400,
                        "livePeopleNum": 2, "remark": "" }),
            )
            .await;
        let sn = order["orderSn"].as_str().unwrap().to_owned();
        let pay = self
            .ok(
                "/payment/v1/thirdPayment/thirdPaymentWxPay",
                Some(token),
                json!({ "orderSn": sn, "serviceType": "homestayOrder" }),
            )
            .await;
        assert!(pay["package"].as_str().unwrap().starts_with("prepay_id="));
        let status =
            self.ok("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(token), json!({ "orderSn": sn })).await;
        (sn, status["paySn"].as_str().unwrap().to_owned())
    }

    async fn until_paid(&self, token: &str, order: &str) {
        testkit::eventually(Duration::from_secs(20), "order paid", || async {
            let (_, s) = self
                .call("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(token), json!({ "orderSn": order }))
                .await;
            (s["data"]["payStatus"] == 1 && s["data"]["tradeState"] == 1).then_some(())
        })
        .await;
    }

    /// Messages stored on `<prefix>.<logical>`.
    async fn count(&self, stream_family: &str, logical: &str) -> u64 {
        let js = jetstream::new(testkit::nats().await);
        let stream_name = format!("{}_{}", self.prefix.to_uppercase(), stream_family);
        let stream = js.get_stream(&stream_name).await.unwrap();
        let subject = format!("{}.{logical}", self.prefix);
        use futures::StreamExt;
        let counts: Vec<_> = stream.info_with_subjects(subject).await.unwrap().collect().await;
        counts.into_iter().map(|r| r.unwrap().1 as u64).sum()
    }
}

impl Drop for System {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_walk_passes_against_the_running_binaries() {
    let sys = System::start().await;
    let out = paystream()
        .arg("--config")
        .arg(sys.dir.join("all.toml"))
        .args(["demo", "--api", &sys.api, "--sandbox", &sys.sandbox])
        .env("PAYSTREAM__DATABASE__URL", &sys._db.url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}");
    assert!(stdout.contains("order paid") && stdout.ends_with("demo OK\n"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_callbacks_change_the_order_once_and_other_users_see_nothing() {
    let sys = System::start().await;
    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    sys.sandbox(&format!("/sandbox/v1/transactions/{payment}/pay"), json!({ "result": "SUCCESS" })).await;
    for _ in 0..5 {
        sys.sandbox("/sandbox/v1/faults", json!({ "kind": "duplicate_callback", "out_trade_no": payment })).await;
    }
    sys.until_paid(&alice, &order).await;
    testkit::eventually(Duration::from_secs(20), "pay-success and check-in requested", || async {
        (sys.count("NOTIFY", "notify.miniprogram").await == 2).then_some(())
    })
    .await;
    assert_eq!(sys.count("PAYMENT", "payment.status").await, 1, "one state change for six deliveries");
    let delivered = testkit::eventually(Duration::from_secs(20), "two messages at WeChat", || async {
        let all: Value = sys
            .http
            .get(format!("{}/sandbox/v1/subscribe-messages", sys.sandbox))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let mine: Vec<Value> =
            all["data"].as_array()?.iter().filter(|m| m.to_string().contains(&order)).cloned().collect();
        (mine.len() >= 2).then_some(mine)
    })
    .await;
    let mut templates: Vec<&str> = delivered.iter().map(|m| m["template_id"].as_str().unwrap()).collect();
    templates.sort();
    assert_eq!(templates, ["TPL_CHECKIN", "TPL_PAY_SUCCESS"], "one of each, not one per callback");
    assert!(delivered.iter().all(|m| m["miniprogram_state"] == "formal"), "state from config: {delivered:?}");
    assert_eq!(sys.count("ORDER", "order.status").await, 1);

    // paying a paid order again is refused; another user cannot see, pay or poll it
    let (status, _) = sys
        .call(
            "/payment/v1/thirdPayment/thirdPaymentWxPay",
            Some(&alice),
            json!({ "orderSn": order, "serviceType": "homestayOrder" }),
        )
        .await;
    assert_eq!(status, 409);
    let bob = sys.login("bob").await;
    for (path, body) in [
        ("/order/v1/homestayOrder/userHomestayOrderDetail", json!({ "sn": order })),
        ("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", json!({ "orderSn": order })),
    ] {
        let (status, answer) = sys.call(path, Some(&bob), body).await;
        assert_eq!(status, 404, "{path}: {answer}");
    }
    let (status, _) = sys
        .call(
            "/payment/v1/thirdPayment/thirdPaymentWxPay",
            Some(&bob),
            json!({ "orderSn": order, "serviceType": "homestayOrder" }),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callback_whose_amount_does_not_match_is_dead_lettered_and_the_order_stays_unpaid() {
    let sys = System::start().await;
    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    // The payment row disagrees with what WeChat will report (as after a bug or tampering).
    let mut conn = storage::connect(&sys._db.url).await.unwrap();
    storage::RunQueryDsl::execute(
        diesel::sql_query(format!("UPDATE third_payment SET pay_total = pay_total + 1 WHERE sn = '{payment}'")),
        &mut conn,
    )
    .await
    .unwrap();
    sys.sandbox(&format!("/sandbox/v1/transactions/{payment}/pay"), json!({ "result": "SUCCESS" })).await;
    testkit::eventually(Duration::from_secs(20), "the report in the payment DLQ", || async {
        (sys.count("DLQ", "dlq.payment").await == 1).then_some(())
    })
    .await;
    let s = sys.ok("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(&alice), json!({ "orderSn": order })).await;
    assert_eq!((s["payStatus"].clone(), s["tradeState"].clone()), (json!(0), json!(0)), "{s}");
    assert_eq!(sys.count("PAYMENT", "payment.status").await, 0);
}
