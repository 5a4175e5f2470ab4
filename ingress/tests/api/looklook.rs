//! The looklook compatibility suite: every request body looklook's mini-program sends to the usercenter, order and
//! payment services, with every field its `.api` definitions declare (Mikaelemmmm/go-zero-looklook:
//! `app/usercenter/cmd/api/desc/user/user.api`, `app/order/cmd/api/desc/order/order.api`,
//! `app/payment/cmd/api/desc/thirdPayment/thirdPayment.api`), is accepted, and every response field its front end
//! reads is there with looklook's name and JSON type. Where paystream deliberately differs, the README's API
//! section says so.

use serde_json::{Value, json};

use crate::common::{spawn_app, tomorrow};

#[derive(Clone, Copy, Debug)]
enum T {
    Str,
    Int,
    Num,
}

/// Asserts `v` has each field with looklook's JSON type (go-zero's int64 is a JSON integer, float64 a number,
/// string a string).
fn shaped(what: &str, v: &Value, fields: &[(&str, T)]) {
    for &(name, t) in fields {
        let f = &v[name];
        let ok = match t {
            T::Str => f.is_string(),
            T::Int => f.is_i64(),
            T::Num => f.is_number(),
        };
        assert!(ok, "{what}.{name}: looklook's front end reads a {t:?}, got {f} in {v}");
    }
}

const TOKEN: &[(&str, T)] = &[("accessToken", T::Str), ("accessExpire", T::Int), ("refreshAfter", T::Int)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looklooks_requests_are_accepted_and_its_fields_answered() {
    let app = spawn_app().await;
    // usercenter: RegisterReq, LoginReq, WXMiniAuthReq, UserInfoReq.
    let creds = json!({ "mobile": "13900139000", "password": "looklook compat pass" });
    shaped("RegisterResp", &app.ok("/usercenter/v1/user/register", &creds, None).await, TOKEN);
    shaped("LoginResp", &app.ok("/usercenter/v1/user/login", &creds, None).await, TOKEN);
    let (data, iv) = app.control.user_info("lou:1", "Lou", "https://thirdwx.qlogo.cn/x/132", None).await.unwrap();
    let auth = app
        .ok("/usercenter/v1/user/wxMiniAuth", &json!({ "code": "lou:1", "iv": iv, "encryptedData": data }), None)
        .await;
    shaped("WXMiniAuthResp", &auth, TOKEN);
    let token = auth["accessToken"].as_str().unwrap().to_owned();
    let me = app.ok("/usercenter/v1/user/detail", &json!({}), Some(&token)).await;
    shaped(
        "UserInfoResp.userInfo",
        &me["userInfo"],
        &[
            ("id", T::Int),
            ("mobile", T::Str),
            ("nickname", T::Str),
            ("sex", T::Int),
            ("avatar", T::Str),
            ("info", T::Str),
        ],
    );

    // order: CreateHomestayOrderReq, UserHomestayOrderListReq (tradeState -99 all, 0 unpaid, 1 paid),
    // UserHomestayOrderDetailReq.
    let homestay = app.homestay(true, 4, 30_000, 2_000).await;
    let start = tomorrow();
    let created = app
        .ok(
            "/order/v1/homestayOrder/createHomestayOrder",
            &json!({ "homestayId": homestay, "isFood": true, "liveStartTime": start, "liveEndTime": start + 86_400,
                     "livePeopleNum": 2, "remark": "" }),
            Some(&token),
        )
        .await;
    shaped("CreateHomestayOrderResp", &created, &[("orderSn", T::Str)]);
    let sn = created["orderSn"].as_str().unwrap().to_owned();
    for trade_state in [-99, 0] {
        let list = app
            .ok(
                "/order/v1/homestayOrder/userHomestayOrderList",
                &json!({ "lastId": 0, "pageSize": 10, "tradeState": trade_state }),
                Some(&token),
            )
            .await;
        let rows = list["list"].as_array().unwrap_or_else(|| panic!("list: {list}"));
        assert_eq!(rows.len(), 1, "tradeState {trade_state}: {list}");
        shaped(
            "UserHomestayOrderListView",
            &rows[0],
            &[
                ("sn", T::Str),
                ("title", T::Str),
                ("subTitle", T::Str),
                ("homestayId", T::Int),
                ("cover", T::Str),
                ("orderTotalPrice", T::Num),
                ("createTime", T::Int),
                ("tradeState", T::Int),
                ("liveStartDate", T::Int),
                ("liveEndDate", T::Int),
                ("tradeCode", T::Str),
            ],
        );
    }
    let paid = app
        .ok(
            "/order/v1/homestayOrder/userHomestayOrderList",
            &json!({ "lastId": 0, "pageSize": 10, "tradeState": 1 }),
            Some(&token),
        )
        .await;
    assert_eq!(paid["list"].as_array().map(Vec::len), Some(0), "nothing paid yet: {paid}");
    let detail = app.ok("/order/v1/homestayOrder/userHomestayOrderDetail", &json!({ "sn": sn }), Some(&token)).await;
    shaped(
        "UserHomestayOrderDetailResp",
        &detail,
        &[
            ("sn", T::Str),
            ("userId", T::Int),
            ("homestayId", T::Int),
            ("title", T::Str),
            ("subTitle", T::Str),
            ("cover", T::Str),
            ("info", T::Str),
            ("foodInfo", T::Str),
            ("foodPrice", T::Num),
            ("homestayPrice", T::Num),
            ("marketHomestayPrice", T::Num),
            ("homestayBusinessId", T::Num),
            ("homestayUserId", T::Num),
            ("orderTotalPrice", T::Num),
            ("createTime", T::Int),
            ("tradeState", T::Int),
            ("liveStartDate", T::Int),
            ("liveEndDate", T::Int),
            ("tradeCode", T::Str),
            ("foodTotalPrice", T::Num),
            ("homestayTotalPrice", T::Num),
            ("remark", T::Str),
            ("livePeopleNum", T::Int),
            ("needFood", T::Int),
            ("payTime", T::Int),
            ("payType", T::Str),
        ],
    );

    // payment: ThirdPaymentWxPayReq.
    let pay = app
        .ok(
            "/payment/v1/thirdPayment/thirdPaymentWxPay",
            &json!({ "orderSn": sn, "serviceType": "homestayOrder" }),
            Some(&token),
        )
        .await;
    shaped(
        "ThirdPaymentWxPayResp",
        &pay,
        &[
            ("appid", T::Str),
            ("nonceStr", T::Str),
            ("paySign", T::Str),
            ("package", T::Str),
            ("timestamp", T::Str),
            ("signType", T::Str),
        ],
    );
}
