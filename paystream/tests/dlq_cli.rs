//! `paystream dlq` as an operator runs it, against a running `paystream all` and the WeChat sandbox: a message
//! forced into the DLQ is listed and, after the cause is fixed and it is redriven, processed. Real NATS and Postgres.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

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

const JWT: &str = "dlq-cli-test-secret-that-is-long-enough-0123456789";

struct System {
    db: testkit::TestDb,
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
        let dir = std::env::temp_dir().join(testkit::unique("paystream-dlq-"));
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
        let sandbox_toml = std::fs::read_to_string(dir.join("paystream.toml")).unwrap();
        std::fs::write(dir.join("all.toml"), format!("{sandbox_toml}\n{NOTIFIER}")).unwrap();
        let mut sys = System {
            db,
            dir,
            prefix: testkit::unique("dlqcli"),
            api,
            sandbox: sandbox_url,
            children: vec![sandbox],
            http: reqwest::Client::new(),
        };
        let all = sys
            .paystream()
            .arg("all")
            .env("PAYSTREAM__HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
            .env("PAYSTREAM__ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        sys.children.push(all);
        let ready = format!("http://127.0.0.1:{admin_port}/readyz");
        testkit::eventually(Duration::from_secs(30), "paystream all ready", || {
            let (http, ready) = (sys.http.clone(), ready.clone());
            async move { http.get(&ready).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
        sys
    }

    /// `paystream --config all.toml` with this system's database, NATS and prefix.
    fn paystream(&self) -> Command {
        let mut c = paystream();
        c.arg("--config")
            .arg(self.dir.join("all.toml"))
            .env("PAYSTREAM__DATABASE__URL", &self.db.url)
            .env("PAYSTREAM__NATS__URL", testkit::nats_url())
            .env("PAYSTREAM__NATS__PREFIX", &self.prefix)
            .env("PAYSTREAM__HTTP__JWT_SECRET", JWT)
            .env("PAYSTREAM__CONSUMER__BACKOFF", "[\"50ms\", \"100ms\"]")
            .env("PAYSTREAM__CONSUMER__MAX_DELIVER", "3")
            .env("PAYSTREAM__TELEMETRY__LOG_FILTER", "warn");
        c
    }

    /// Runs `paystream dlq ARGS` and returns its output.
    fn dlq(&self, args: &[&str]) -> Output {
        self.paystream().arg("dlq").args(args).stderr(Stdio::piped()).output().unwrap()
    }

    fn dlq_ok(&self, args: &[&str]) -> String {
        let out = self.dlq(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "dlq {args:?}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    fn letters(&self, consumer: &str) -> Vec<Value> {
        let out = self.dlq_ok(&["list", "--consumer", consumer, "--json"]);
        serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().clone()
    }

    async fn ok(&self, path: &str, token: Option<&str>, body: Value) -> Value {
        let mut req = self.http.post(format!("{}{path}", self.api)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
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
        self.ok(
            "/payment/v1/thirdPayment/thirdPaymentWxPay",
            Some(token),
            json!({ "orderSn": sn, "serviceType": "homestayOrder" }),
        )
        .await;
        let status =
            self.ok("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(token), json!({ "orderSn": sn })).await;
        (sn, status["paySn"].as_str().unwrap().to_owned())
    }

    async fn order_status(&self, token: &str, order: &str) -> (Value, Value) {
        let s =
            self.ok("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(token), json!({ "orderSn": order })).await;
        (s["payStatus"].clone(), s["tradeState"].clone())
    }

    async fn subscribe_messages_for(&self, order: &str) -> Vec<Value> {
        let all: Value = match self.http.get(format!("{}/sandbox/v1/subscribe-messages", self.sandbox)).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        all["data"]
            .as_array()
            .map(|a| a.iter().filter(|m| m.to_string().contains(order)).cloned().collect())
            .unwrap_or_default()
    }

    async fn sql(&self, statement: String) {
        let mut conn = storage::connect(&self.db.url).await.unwrap();
        storage::RunQueryDsl::execute(diesel::sql_query(statement), &mut conn).await.unwrap();
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
async fn a_dead_lettered_payment_report_is_listed_and_after_the_fix_and_a_redrive_pays_the_order() {
    let sys = System::start().await;
    assert_eq!(sys.dlq_ok(&["list"]), "no dead letters\n");
    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    // The payment row disagrees with what WeChat reports: the payment processor dead-letters the report.
    sys.sql(format!("UPDATE third_payment SET pay_total = pay_total + 1 WHERE sn = '{payment}'")).await;
    sys.sandbox(&format!("/sandbox/v1/transactions/{payment}/pay"), json!({ "result": "SUCCESS" })).await;
    let letters = testkit::eventually(Duration::from_secs(20), "the report in the payment DLQ", || async {
        let l = sys.letters("payment");
        (l.len() == 1).then_some(l)
    })
    .await;
    let letter = &letters[0];
    assert!(letter["reason"].as_str().unwrap().contains("amount mismatch"), "{letter}");
    assert_eq!(letter["consumer"], "payment");
    assert_eq!(letter["deliveries"], 1);
    assert_eq!(letter["subject"], format!("{}.wechat.transaction", sys.prefix));
    assert!(letter["age_seconds"].as_u64().unwrap() < 60);
    assert_eq!(letter["payload"]["payload"]["out_trade_no"], payment.as_str());
    let id = letter["id"].as_u64().unwrap().to_string();

    // The table an operator reads.
    let table = sys.dlq_ok(&["list"]);
    let mut lines = table.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(head, ["ID", "CONSUMER", "AGE", "DELIVERIES", "REASON", "SUBJECT"], "{table}");
    let row = lines.next().unwrap();
    assert!(
        row.starts_with(&format!("{id} ")) && row.contains(" payment ") && row.contains("amount mismatch"),
        "{row}"
    );
    assert!(row.ends_with(&format!("{}.wechat.transaction", sys.prefix)), "{row}");
    assert_eq!(sys.order_status(&alice, &order).await, (json!(0), json!(0)), "unpaid while dead-lettered");

    // Unknown IDs are refused with a message; nothing changes.
    let out = sys.dlq(&["redrive", "999999"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dead letter 999999"));

    // The row is fixed; the operator redrives the letter and the order gets paid.
    sys.sql(format!("UPDATE third_payment SET pay_total = pay_total - 1 WHERE sn = '{payment}'")).await;
    let out = sys.dlq_ok(&["redrive", &id]);
    assert!(out.contains(&format!("redriven {id} (payment) → {}.wechat.transaction", sys.prefix)), "{out}");
    testkit::eventually(Duration::from_secs(20), "the order paid after the redrive", || async {
        (sys.order_status(&alice, &order).await == (json!(1), json!(1))).then_some(())
    })
    .await;
    assert_eq!(sys.dlq_ok(&["list"]), "no dead letters\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_notifications_are_reopened_and_sent_when_their_letters_are_redriven() {
    let sys = System::start().await;
    // WeChat's quota is exhausted for longer than the notifier retries: both messages end `failed` in the DLQ.
    sys.sandbox(
        "/sandbox/v1/faults",
        json!({ "kind": "fail", "api": "subscribe_send", "times": 1000, "errcode": 45009,
                "message": "reach max api daily quota limit" }),
    )
    .await;
    let alice = sys.login("alice").await;
    let (order, payment) = sys.book_and_prepay(&alice).await;
    sys.sandbox(&format!("/sandbox/v1/transactions/{payment}/pay"), json!({ "result": "SUCCESS" })).await;
    let letters = testkit::eventually(Duration::from_secs(30), "both notifications dead-lettered", || async {
        let l = sys.letters("notifier-miniprogram");
        (l.len() == 2).then_some(l)
    })
    .await;
    assert!(letters.iter().all(|l| l["deliveries"] == 3), "{letters:?}");
    assert!(sys.subscribe_messages_for(&order).await.is_empty());

    // The quota is back; redriving every notifier-miniprogram letter reopens the failed rows and sends once each.
    sys.sandbox("/sandbox/v1/faults", json!({ "kind": "clear" })).await;
    let out = sys.dlq_ok(&["redrive", "--all", "--consumer", "notifier-miniprogram"]);
    assert_eq!(out.matches("failed → retrying").count(), 2, "{out}");
    assert!(out.contains("2 redriven, 0 left in the DLQ"), "{out}");
    let sent = testkit::eventually(Duration::from_secs(20), "two messages at WeChat", || async {
        let m = sys.subscribe_messages_for(&order).await;
        (m.len() >= 2).then_some(m)
    })
    .await;
    let mut templates: Vec<&str> = sent.iter().map(|m| m["template_id"].as_str().unwrap()).collect();
    templates.sort();
    assert_eq!(templates, ["TPL_CHECKIN", "TPL_PAY_SUCCESS"]);
    assert!(sys.letters("notifier-miniprogram").is_empty());
}
