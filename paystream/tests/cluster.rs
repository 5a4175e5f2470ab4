//! Multi-node on one machine: `paystream all` on a 3-node JetStream cluster (streams with 3 replicas), a node
//! killed in the middle of 1,000 payments, and still every payment paid exactly once with exactly one message of
//! each kind.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::System;
use futures::StreamExt as _;

const PAYMENTS: usize = 1_000;
const USERS: usize = 10;
const KILL_AFTER: usize = 300;

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_node_killed_during_1000_payments_loses_and_duplicates_nothing() {
    let mut cluster = testkit::NatsCluster::start(3).await;
    let sys = System::start_with(&[
        ("PAYSTREAM__NATS__URL", cluster.url()),
        ("PAYSTREAM__NATS__STREAM_REPLICAS", "3".into()),
    ])
    .await;
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(sys.login(&format!("u{i}")).await);
    }
    let started = AtomicUsize::new(0);
    let mut paid_at_wechat = futures::stream::iter(0..PAYMENTS)
        .map(|i| {
            let (sys, token, started) = (&sys, &users[i % USERS], &started);
            async move {
                let (order, payment) = sys.book_and_prepay(token).await;
                sys.pay_at_wechat(&payment).await;
                started.fetch_add(1, Ordering::SeqCst);
                order
            }
        })
        .buffer_unordered(16);
    let mut orders = Vec::new();
    let mut killed = false;
    while let Some(order) = paid_at_wechat.next().await {
        orders.push(order);
        if !killed && orders.len() >= KILL_AFTER {
            // A crash, not a drain: callbacks and processors are mid-flight on every node.
            cluster.kill(1);
            killed = true;
        }
    }
    assert!(killed);
    drop(paid_at_wechat);

    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let count = |sql: &'static str| {
        let url = sys.db.url.clone();
        async move {
            let mut conn = storage::connect(&storage::DbConfig::new(&url)).await.ok()?;
            storage::RunQueryDsl::get_result::<N>(diesel::sql_query(sql), &mut conn).await.ok().map(|r| r.n)
        }
    };
    testkit::eventually(Duration::from_secs(240), "every order paid", || async {
        (count("SELECT count(*) AS n FROM homestay_order WHERE trade_state = 1").await? == PAYMENTS as i64)
            .then_some(())
    })
    .await;
    assert_eq!(count("SELECT count(*) AS n FROM third_payment WHERE pay_status = 1").await, Some(PAYMENTS as i64));

    // Exactly one pay-success and one check-in message per order at WeChat.
    let messages = testkit::eventually(Duration::from_secs(240), "two messages per order at WeChat", || async {
        let list = sys.subscribe_messages().await;
        (list.len() >= 2 * PAYMENTS).then_some(list)
    })
    .await;
    let mut per_key: HashMap<(String, String), usize> = HashMap::new();
    for m in &messages {
        let key = (
            m["template_id"].as_str().unwrap_or_default().to_owned(),
            m["page"].as_str().unwrap_or_default().to_owned(),
        );
        *per_key.entry(key).or_default() += 1;
    }
    let twice: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "messages sent more than once: {twice:?}");
    for order in &orders {
        for template in ["TPL_PAY_SUCCESS", "TPL_CHECKIN"] {
            let page = format!("pages/order/detail?sn={order}");
            assert_eq!(per_key.get(&(template.to_owned(), page)), Some(&1), "{template} for {order}");
        }
    }
    // One payment.status per payment, stored on the surviving replicas.
    let servers: Vec<String> = cluster.url().split(',').map(str::to_owned).collect();
    let js = async_nats::jetstream::new(async_nats::connect(servers).await.unwrap());
    let mut stream = js.get_stream(format!("{}_PAYMENT", sys.prefix.to_uppercase())).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(info.state.messages, PAYMENTS as u64, "one payment.status per payment");
}
