//! `paystream demo --api URL --sandbox URL`: one payment walked through a running system exactly as a
//! mini-program would — log in with a WeChat code, book a homestay, ask for the JSAPI pay parameters, pay (the
//! sandbox plays the user's WeChat), then poll the status endpoint until the order is paid — printing each step,
//! the final states and the time each took. Exits non-zero if any step fails.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use serde_json::{Value, json};

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Base URL of paystream's HTTP API (the ingress).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Base URL of the WeChat sandbox (plays the user's WeChat app and shows what WeChat received).
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub sandbox: String,
}

struct Walk {
    http: reqwest::Client,
    api: String,
    t0: Instant,
    last: Instant,
}

impl Walk {
    fn step(&mut self, what: &str) {
        let now = Instant::now();
        println!(
            "[{:>8.1} ms] (+{:>6.1} ms) {what}",
            (now - self.t0).as_secs_f64() * 1000.0,
            (now - self.last).as_secs_f64() * 1000.0
        );
        self.last = now;
    }

    /// POSTs to the API and unwraps the `{"code":200,"msg":"OK","data":…}` envelope.
    async fn call(&self, path: &str, token: Option<&str>, body: Value) -> anyhow::Result<Value> {
        let mut req = self.http.post(format!("{}{path}", self.api)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.with_context(|| format!("POST {path}"))?;
        let status = resp.status();
        let body: Value = resp.json().await.with_context(|| format!("POST {path}: body is not JSON"))?;
        if !status.is_success() || body["code"] != 200 {
            bail!("POST {path} answered {status}: {body}");
        }
        Ok(body["data"].clone())
    }
}

pub async fn run(cfg: &Config, args: DemoArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let now = Instant::now();
    let mut w = Walk { http: http.clone(), api: args.api.trim_end_matches('/').to_owned(), t0: now, last: now };

    // A listed homestay to book (the mini-program would show a list; the demo picks the first listed one).
    let homestay = {
        use diesel::prelude::*;
        use storage::{RunQueryDsl, schema::homestay as h};
        let mut conn = storage::connect(&cfg.database).await?;
        h::table
            .filter(h::row_state.eq(1))
            .order(h::id)
            .select((h::id, h::title))
            .first::<(i64, String)>(&mut conn)
            .await
            .context("no listed homestay: has `paystream all` seeded the database?")?
    };

    // Codes work once; the sandbox derives the openid from the part before ':', so every run is user "demo".
    let code = format!("demo:{}", uuid::Uuid::new_v4().simple());
    let login = w.call("/usercenter/v1/user/wxMiniAuth", None, json!({ "code": code })).await?;
    let token = login["accessToken"].as_str().context("wxMiniAuth returned no accessToken")?.to_owned();
    w.step("logged in with a WeChat code (jscode2session → openid → user, JWT issued)");

    let start =
        (Utc::now() + chrono::TimeDelta::days(7)).date_naive().and_hms_opt(6, 0, 0).expect("valid time").and_utc();
    let order = w
        .call(
            "/order/v1/homestayOrder/createHomestayOrder",
            Some(&token),
            json!({
                "homestayId": homestay.0, "isFood": false,
                "liveStartTime": start.timestamp(), "liveEndTime": start.timestamp() + 2 * 86_400,
                "livePeopleNum": 2, "remark": "paystream demo"
            }),
        )
        .await?;
    let order_sn = order["orderSn"].as_str().context("createHomestayOrder returned no orderSn")?.to_owned();
    w.step(&format!("booked {:?} for two nights: order {order_sn}", homestay.1));

    let pay = w
        .call(
            "/payment/v1/thirdPayment/thirdPaymentWxPay",
            Some(&token),
            json!({ "orderSn": order_sn, "serviceType": "homestayOrder" }),
        )
        .await?;
    w.step(&format!("JSAPI pay parameters: package {}, signType {}", pay["package"], pay["signType"]));

    let status = w
        .call("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(&token), json!({ "orderSn": order_sn }))
        .await?;
    let pay_sn = status["paySn"].as_str().context("status returned no paySn")?.to_owned();
    let resp = http
        .post(format!("{}/sandbox/v1/transactions/{pay_sn}/pay", args.sandbox.trim_end_matches('/')))
        .json(&json!({ "result": "SUCCESS" }))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("the sandbox refused to pay {pay_sn}: {} {}", resp.status(), resp.text().await.unwrap_or_default());
    }
    w.step(&format!("the user paid {pay_sn} in WeChat (sandbox); WeChat now calls back"));
    let paid_at = Instant::now();

    let deadline = Instant::now() + Duration::from_secs(20);
    let final_status = loop {
        let s = w
            .call("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(&token), json!({ "orderSn": order_sn }))
            .await?;
        if s["payStatus"] == 1 && s["tradeState"] == 1 {
            break s;
        }
        if Instant::now() > deadline {
            bail!("order {order_sn} not paid 20 s after WeChat's payment; last status {s}");
        }
        // Poll like an impatient front end: the time printed below is within 10 ms of the real one.
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    w.step(&format!(
        "order paid: payment status {} (paid), order state {} (waitUse), {:.1} ms after WeChat's payment",
        final_status["payStatus"],
        final_status["tradeState"],
        paid_at.elapsed().as_secs_f64() * 1000.0
    ));

    let detail =
        w.call("/order/v1/homestayOrder/userHomestayOrderDetail", Some(&token), json!({ "sn": order_sn })).await?;
    println!("final order: {}", serde_json::to_string_pretty(&detail)?);
    let callbacks: Value = http
        .get(format!("{}/sandbox/v1/callbacks?out_trade_no={pay_sn}", args.sandbox.trim_end_matches('/')))
        .send()
        .await?
        .json()
        .await?;
    println!("WeChat's callback deliveries for {pay_sn}: {callbacks}");

    // The notifier tells the user: wait for the subscribe messages to reach WeChat (the sandbox).
    let sandbox = args.sandbox.trim_end_matches('/').to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let messages = loop {
        let all: Value = http.get(format!("{sandbox}/sandbox/v1/subscribe-messages")).send().await?.json().await?;
        let mine: Vec<Value> = all["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m.to_string().contains(&order_sn))
            .cloned()
            .collect();
        if mine.len() >= 2 {
            break mine;
        }
        if Instant::now() > deadline {
            bail!("the pay-success and check-in messages for {order_sn} did not reach WeChat within 20 s: {all}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    w.step(&format!("{} subscribe messages delivered to WeChat", messages.len()));
    for m in &messages {
        println!("subscribe message as WeChat received it: {}", serde_json::to_string_pretty(m)?);
    }
    println!("demo OK");
    Ok(())
}
