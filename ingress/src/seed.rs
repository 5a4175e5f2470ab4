//! Demo homestays, so a fresh database can be booked at once (the demo and tests).

use diesel::QueryDsl as _;
use storage::homestays::{self, NewHomestay};
use storage::schema::homestay;
use storage::{AsyncConnection as _, Conn, RunQueryDsl as _};

/// Inserts the demo homestays (three listed, one unlisted) when the table is empty; returns how many it inserted.
/// Idempotent and safe to run from several processes at once: an advisory lock serialises the check and insert.
pub async fn seed(conn: &mut Conn) -> storage::Result<usize> {
    conn.transaction(async |c| {
        // Any constant works; it only has to be the same for every process that seeds.
        diesel::sql_query("SELECT pg_advisory_xact_lock(7373001)").execute(c).await?;
        let existing: i64 = homestay::table.count().get_result(c).await?;
        if existing > 0 {
            return Ok(0);
        }
        let rows = demo_homestays();
        for row in &rows {
            homestays::insert(c, row).await?;
        }
        Ok(rows.len())
    })
    .await
}

fn demo_homestays() -> Vec<NewHomestay> {
    let h = |title: &str, sub: &str, people: i32, listed: bool, row_type: i16, food: i64, price: i64| NewHomestay {
        title: title.into(),
        sub_title: sub.into(),
        info: format!("{title}: {sub}"),
        people_num: people,
        row_state: i16::from(listed),
        row_type,
        food_info: if food > 0 { "breakfast".into() } else { String::new() },
        food_price: food,
        homestay_price: price,
        market_homestay_price: price + price / 5,
    };
    vec![
        h("West Lake courtyard", "quiet rooms by the water", 4, true, 0, 3_000, 38_800),
        h("Mountain cabin", "wood stove and a view", 2, true, 0, 2_500, 26_800),
        h("Old town loft", "priced per guest and night", 6, true, 1, 0, 9_900),
        h("Closed for renovation", "not bookable", 4, false, 0, 0, 19_900),
    ]
}
