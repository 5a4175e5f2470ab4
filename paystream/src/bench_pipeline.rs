//! `paystream bench pipeline`: N users through login → order → prepay → WeChat pays → order paid, over HTTP against
//! a running system. Reports throughput and the latency from WeChat's callback (the sandbox's delivery time) to the
//! order's transition (its `update_time` in the database), next to a raw JetStream round trip measured in the same
//! run on the same server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use futures::StreamExt;
use serde_json::{Value, json};
use storage::RunQueryDsl;

use crate::{bench, config::Config, roles::Infra};

struct Client {
    http: reqwest::Client,
    api: String,
}

impl Client {
    async fn call(&self, path: &str, token: Option<&str>, body: Value) -> anyhow::Result<Value> {
        let mut req = self.http.post(format!("{}{path}", self.api)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() || body["code"] != 200 {
            bail!("{path}: {status} {body}");
        }
        Ok(body["data"].clone())
    }
}

/// One user's walk up to WeChat's payment; returns (order sn, payment sn).
async fn walk(c: &Client, sandbox: &str, homestay: i64, i: usize, run: &str) -> anyhow::Result<(String, String)> {
    let login = c.call("/usercenter/v1/user/wxMiniAuth", None, json!({ "code": format!("bench{i}{run}:1") })).await?;
    let token = login["accessToken"].as_str().context("no token")?.to_owned();
    let start = Utc::now().timestamp() / 86_400 * 86_400 + 7 * 86_400;
    let order = c
        .call(
            "/order/v1/homestayOrder/createHomestayOrder",
            Some(&token),
            json!({ "homestayId": homestay, "isFood": false, "liveStartTime": start, "liveEndTime": start + 86_400,
                    "livePeopleNum": 1, "remark": "" }),
        )
        .await?;
    let sn = order["orderSn"].as_str().context("no orderSn")?.to_owned();
    c.call(
        "/payment/v1/thirdPayment/thirdPaymentWxPay",
        Some(&token),
        json!({ "orderSn": sn, "serviceType": "homestayOrder" }),
    )
    .await?;
    let status =
        c.call("/payment/v1/thirdPayment/thirdPaymentWxPayStatus", Some(&token), json!({ "orderSn": sn })).await?;
    let pay_sn = status["paySn"].as_str().context("no paySn")?.to_owned();
    let r = c
        .http
        .post(format!("{sandbox}/sandbox/v1/transactions/{pay_sn}/pay"))
        .json(&json!({"result":"SUCCESS"}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("sandbox refused to pay {pay_sn}: {}", r.status());
    }
    Ok((sn, pay_sn))
}

pub async fn run(cfg: &Config, users: usize, concurrency: usize, api: &str, sandbox: &str) -> anyhow::Result<()> {
    let sandbox = sandbox.trim_end_matches('/').to_owned();
    let client = Arc::new(Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(concurrency)
            .build()?,
        api: api.trim_end_matches('/').to_owned(),
    });
    let mut conn = storage::connect(&cfg.database).await?;
    let homestay: i64 = {
        use storage::schema::homestay as h;
        h::table
            .filter(h::row_state.eq(1))
            .order(h::id)
            .select(h::id)
            .first(&mut conn)
            .await
            .context("no listed homestay")?
    };
    println!("pipeline benchmark: {users} users, {concurrency} at a time, API {api}");
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..6].to_owned();
    let started = Instant::now();
    let results: Vec<anyhow::Result<(String, String)>> = futures::stream::iter(0..users)
        .map(|i| {
            let (c, s, r) = (client.clone(), sandbox.clone(), run_id.clone());
            async move { walk(&c, &s, homestay, i, &r).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let walks: Vec<(String, String)> = results.into_iter().collect::<anyhow::Result<_>>()?;
    let walked = started.elapsed();

    // Wait until every order is paid (the pipeline is asynchronous), then read the transition times.
    let orders: Vec<String> = walks.iter().map(|w| w.0.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let paid: Vec<(String, DateTime<Utc>)> = loop {
        use storage::schema::homestay_order as o;
        let rows: Vec<(String, DateTime<Utc>)> = o::table
            .filter(o::sn.eq_any(&orders))
            .filter(o::trade_state.eq(storage::TradeState::WaitUse.code()))
            .select((o::sn, o::update_time))
            .load(&mut conn)
            .await?;
        if rows.len() == orders.len() {
            break rows;
        }
        if Instant::now() > deadline {
            bail!("only {} of {} orders paid after 120 s", rows.len(), orders.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let all_paid = started.elapsed();

    let callbacks: Value = client.http.get(format!("{sandbox}/sandbox/v1/callbacks")).send().await?.json().await?;
    let mut first_callback: HashMap<String, DateTime<Utc>> = HashMap::new();
    for c in callbacks["data"].as_array().into_iter().flatten() {
        if c["kind"] == "delivery" && c["acknowledged"] == true {
            let at: DateTime<Utc> = c["at"].as_str().unwrap_or_default().parse()?;
            let key = c["out_trade_no"].as_str().unwrap_or_default().to_owned();
            first_callback.entry(key).and_modify(|t| *t = (*t).min(at)).or_insert(at);
        }
    }
    let order_of: HashMap<&str, &str> = walks.iter().map(|(o, p)| (o.as_str(), p.as_str())).collect();
    let mut latencies = Vec::new();
    for (order, at) in &paid {
        if let Some(cb) = order_of.get(order.as_str()).and_then(|p| first_callback.get(*p)) {
            latencies.push(((*at - *cb).num_microseconds().unwrap_or(0) as f64 / 1e6).max(0.0));
        }
    }
    if latencies.is_empty() {
        bail!("no callback records matched the orders (is --sandbox the sandbox paystream uses?)");
    }
    let f = bench::figures(latencies, all_paid);
    println!(
        "  users through login→order→prepay→pay: {:.0}/s over {:.1} s; all {users} orders paid after {:.1} s",
        users as f64 / walked.as_secs_f64(),
        walked.as_secs_f64(),
        all_paid.as_secs_f64()
    );
    println!(
        "  callback → order paid: p50 {:.2} ms, p99 {:.2} ms ({} payments, 0 lost)",
        f.p50_ms,
        f.p99_ms,
        paid.len()
    );

    // The reference: a raw JetStream publish→consume round trip on the same server, now.
    let mut bench_cfg = cfg.clone();
    bench_cfg.nats.prefix = format!("bench-{run_id}");
    let infra = Infra::connect(&bench_cfg).await?;
    let topology = infra.publisher.topology().clone();
    let raw = bench::raw_round_trip(infra.publisher.jetstream(), &topology, 5000, 8).await?;
    for stream in topology.streams() {
        let _ = infra.publisher.jetstream().delete_stream(&stream).await;
    }
    println!(
        "  reference, raw JetStream round trip: {:.0} ev/s, p50 {:.2} ms, p99 {:.2} ms",
        raw.per_second, raw.p50_ms, raw.p99_ms
    );
    println!("  ratio callback→paid p50 / raw p50: {:.1}x", f.p50_ms / raw.p50_ms);
    Ok(())
}
