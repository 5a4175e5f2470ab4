//! `homestay`: what can be booked.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::{Conn, Result};
use crate::domain::HomestayId;
use crate::schema::homestay as h;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = h, check_for_backend(diesel::pg::Pg))]
pub struct HomestayRow {
    pub id: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub title: String,
    pub sub_title: String,
    pub banner: String,
    pub info: String,
    pub people_num: i32,
    pub homestay_business_id: i64,
    pub user_id: i64,
    pub row_state: i16,
    pub row_type: i16,
    pub food_info: String,
    pub food_price: i64,
    pub homestay_price: i64,
    pub market_homestay_price: i64,
}

impl HomestayRow {
    pub fn id(&self) -> HomestayId {
        HomestayId(self.id)
    }
    pub fn is_listed(&self) -> bool {
        self.row_state == 1
    }
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = h)]
pub struct NewHomestay {
    pub title: String,
    pub sub_title: String,
    pub info: String,
    pub people_num: i32,
    pub row_state: i16,
    pub row_type: i16,
    pub food_info: String,
    pub food_price: i64,
    pub homestay_price: i64,
    pub market_homestay_price: i64,
}

pub async fn insert(conn: &mut Conn, new: &NewHomestay) -> Result<HomestayRow> {
    Ok(diesel::insert_into(h::table).values(new).returning(HomestayRow::as_returning()).get_result(conn).await?)
}

pub async fn find(conn: &mut Conn, id: HomestayId) -> Result<Option<HomestayRow>> {
    Ok(h::table.find(id.0).select(HomestayRow::as_select()).first(conn).await.optional()?)
}
