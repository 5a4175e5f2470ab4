//! Rough throughput of the sandbox, served by ONE thread (a current-thread runtime on its own
//! OS thread) while this process's other runtime plays the merchant with 64 concurrent
//! keep-alive connections. Bounded: each phase runs SECONDS (default 3) against loopback only.
//!
//! `cargo run --release -p sandbox --example load -- [SECONDS]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sandbox::{Sandbox, SandboxOptions};
use wechat::{AuthorizationHeader, nonce_str};

const CONCURRENCY: usize = 64;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let secs: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let dir = std::env::temp_dir().join(format!("sandbox-load-{}", std::process::id()));
    let identity = sandbox::load_or_init(&dir).expect("identity");
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let server_identity = identity.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let options = SandboxOptions { write_config: false, ..Default::default() };
            let sb = Sandbox::bind(server_identity, options, listener).unwrap();
            sb.run(tokio_util::sync::CancellationToken::new()).await.unwrap();
        });
    });
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(CONCURRENCY).build().unwrap();
    let signer = Arc::new(identity.merchant_signer().unwrap());
    let id = Arc::new(identity);

    println!("sandbox on one thread, {CONCURRENCY} concurrent clients, {secs} s per phase");
    // Reference: a prepay costs the sandbox one RSA verify and one RSA sign, and the client
    // one sign, so the signing rate of one core bounds it.
    let t = Instant::now();
    for i in 0..500u32 {
        std::hint::black_box(signer.sign(&i.to_be_bytes()));
    }
    println!(
        "{:<50} {:>8.0} /s",
        "reference: RSA-2048 sign, one thread (wechat crate)",
        500.0 / t.elapsed().as_secs_f64()
    );
    let seq = Arc::new(AtomicU64::new(0));

    phase("GET /sandbox/v1/healthz (plain HTTP)", secs, {
        let (http, base) = (http.clone(), base.clone());
        move || {
            let (http, base) = (http.clone(), base.clone());
            async move { http.get(format!("{base}/sandbox/v1/healthz")).send().await.is_ok_and(|r| r.status() == 200) }
        }
    })
    .await;

    phase("GET /sns/jscode2session", secs, {
        let (http, base, id, seq) = (http.clone(), base.clone(), id.clone(), seq.clone());
        move || {
            let (http, base, id) = (http.clone(), base.clone(), id.clone());
            let n = seq.fetch_add(1, Ordering::Relaxed);
            async move {
                let url = format!(
                    "{base}/sns/jscode2session?appid={}&secret={}&js_code=user{n}:{n}&grant_type=authorization_code",
                    id.appid, id.miniprogram_secret
                );
                match http.get(url).send().await {
                    Ok(r) => r.text().await.is_ok_and(|t| t.contains("openid")),
                    Err(_) => false,
                }
            }
        }
    })
    .await;

    phase("POST /v3/pay/transactions/jsapi (verify + sign)", secs, {
        let (http, base, id, seq, signer) = (http.clone(), base.clone(), id.clone(), seq.clone(), signer.clone());
        move || {
            let (http, base, id, signer) = (http.clone(), base.clone(), id.clone(), signer.clone());
            let n = seq.fetch_add(1, Ordering::Relaxed);
            async move {
                let body = serde_json::to_vec(&serde_json::json!({
                    "appid": id.appid, "mchid": id.mchid, "description": "load", "out_trade_no": format!("LOAD{n:020}"),
                    "notify_url": "https://example.com/notify", "amount": {"total": 1, "currency": "CNY"},
                    "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
                }))
                .unwrap();
                let path = "/v3/pay/transactions/jsapi";
                let ts = chrono::Utc::now().timestamp();
                let auth = AuthorizationHeader::sign(
                    &signer,
                    &id.mchid,
                    &id.merchant_serial_no,
                    "POST",
                    path,
                    ts,
                    &nonce_str(),
                    &body,
                );
                let resp = http
                    .post(format!("{base}{path}"))
                    .header("Authorization", auth.to_string())
                    .header("User-Agent", "load")
                    .header("Content-Type", "application/json")
                    .body(body)
                    .send()
                    .await;
                resp.is_ok_and(|r| r.status() == 200)
            }
        }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn phase<F, Fut>(name: &str, secs: u64, make: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (make, ok, failed) = (make.clone(), ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                if make().await {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    println!("{name:<50} {:>8.0} req/s ({ok} ok, {} failed)", ok as f64 / elapsed, failed.load(Ordering::Relaxed));
}
