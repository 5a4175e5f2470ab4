//! `/openapi.json`: the API described by hand (no macro crate: it keeps the build small, and the document is
//! short). Keep it in step with `routes/` when an endpoint changes.

use serde_json::{Value, json};

fn envelope(data: Value) -> Value {
    json!({
        "type": "object",
        "required": ["code", "msg", "data"],
        "properties": { "code": { "type": "integer", "example": 200 }, "msg": { "type": "string", "example": "OK" }, "data": data }
    })
}

fn op(summary: &str, auth: bool, body: Value, data: Value, errors: &[(&str, &str)]) -> Value {
    let body_required = body["required"].as_array().is_some_and(|r| !r.is_empty()) || body.get("anyOf").is_some();
    let mut responses = serde_json::Map::new();
    responses.insert(
        "200".into(),
        json!({ "description": "OK", "content": { "application/json": { "schema": envelope(data) } } }),
    );
    for (status, what) in errors {
        responses.insert(
            (*status).into(),
            json!({ "description": what, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } }),
        );
    }
    let mut o = json!({
        "summary": summary,
        // An endpoint whose every field is optional also answers a request without a body.
        "requestBody": { "required": body_required, "content": { "application/json": { "schema": body } } },
        "responses": responses,
    });
    if auth {
        o["security"] = json!([{ "bearer": [] }]);
    } else {
        o["security"] = json!([]);
    }
    json!({ "post": o })
}

fn obj(required: &[&str], props: Value) -> Value {
    json!({ "type": "object", "required": required, "properties": props, "additionalProperties": false })
}

pub fn document() -> Value {
    let token = json!({ "$ref": "#/components/schemas/Token" });
    let order = json!({ "$ref": "#/components/schemas/Order" });
    let bad = ("400", "malformed JSON, missing field, wrong type or unknown value");
    let unauth = ("401", "missing, expired or forged access token");
    let invalid = ("422", "a business rule is broken (the message says which)");
    let not_found = ("404", "no such order among yours");
    let limited = ("429", "over a rate limit (42900); retry after Retry-After");
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "paystream",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The homestay shop's back end (looklook paths). Every answer is {code, msg, data}; errors carry a stable numeric code and a message to act on. Money is in fen (1/100 yuan), times in unix seconds."
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } },
            "schemas": {
                "Error": { "type": "object", "required": ["code", "msg"], "properties": { "code": { "type": "integer", "example": 42200 }, "msg": { "type": "string" } } },
                "Token": obj(&["accessToken", "accessExpire", "refreshAfter"], json!({
                    "accessToken": { "type": "string" },
                    "accessExpire": { "type": "integer", "description": "unix seconds" },
                    "refreshAfter": { "type": "integer", "description": "unix seconds" }
                })),
                "Order": { "type": "object", "properties": {
                    "id": { "type": "integer" }, "sn": { "type": "string" }, "userId": { "type": "integer" },
                    "homestayId": { "type": "integer" }, "homestayBusinessId": { "type": "integer" },
                    "homestayUserId": { "type": "integer" },
                    "title": { "type": "string" }, "subTitle": { "type": "string" }, "cover": { "type": "string" },
                    "info": { "type": "string" }, "peopleNum": { "type": "integer" }, "rowType": { "type": "integer" },
                    "needFood": { "type": "integer", "enum": [0, 1], "description": "1 with meals (looklook's int)" }, "foodInfo": { "type": "string" },
                    "foodPrice": { "type": "integer", "description": "fen" }, "homestayPrice": { "type": "integer", "description": "fen" },
                    "marketHomestayPrice": { "type": "integer", "description": "fen" },
                    "liveStartDate": { "type": "integer" }, "liveEndDate": { "type": "integer" }, "livePeopleNum": { "type": "integer" },
                    "tradeState": { "type": "integer", "description": "-1 cancelled, 0 waitPay, 1 waitUse, 2 used, 3 refunded, 4 expired" },
                    "tradeCode": { "type": "string" }, "remark": { "type": "string" },
                    "orderTotalPrice": { "type": "integer", "description": "fen" }, "foodTotalPrice": { "type": "integer" },
                    "homestayTotalPrice": { "type": "integer" }, "payDeadline": { "type": "integer" }, "createTime": { "type": "integer" }
                } }
            }
        },
        "paths": {
            "/usercenter/v1/user/register": op("Register with mobile and password", false,
                obj(&["mobile", "password"], json!({ "mobile": { "type": "string" }, "password": { "type": "string", "minLength": 8 } })),
                token.clone(), &[bad, invalid, ("409", "mobile already registered"), limited]),
            "/usercenter/v1/user/login": op("Log in with mobile and password", false,
                obj(&["mobile", "password"], json!({ "mobile": { "type": "string" }, "password": { "type": "string" } })),
                token.clone(), &[bad, ("401", "mobile or password is wrong"), invalid, limited,
                                 ("503", "too many logins are being checked right now (50302); retry after Retry-After")]),
            "/usercenter/v1/user/wxMiniAuth": op("Log in with a wx.login code (creates the user on first login)", false,
                obj(&["code"], json!({
                    "code": { "type": "string", "minLength": 1, "maxLength": 128 },
                    "iv": { "type": "string", "maxLength": 64,
                            "description": "with encryptedData, from wx.getUserInfo: fills nickname and avatar on first login" },
                    "encryptedData": { "type": "string", "maxLength": 8192,
                            "description": "AES-128-CBC with the login's session key; its watermark must name our appid" }
                })),
                token, &[bad, ("401", "code invalid or already used"),
                         ("422", "iv without encryptedData or the reverse, or user info that does not decrypt with this login's session key or was issued for another mini-program"),
                         ("429", "too many logins from this address"), ("502", "WeChat unavailable")]),
            "/usercenter/v1/user/detail": op("The caller's own details", true, obj(&[], json!({})),
                json!({ "type": "object", "properties": { "userInfo": { "type": "object" } } }), &[unauth]),
            "/order/v1/homestayOrder/createHomestayOrder": op("Book a homestay", true,
                obj(&["homestayId", "liveStartTime", "liveEndTime", "livePeopleNum"], json!({
                    "homestayId": { "type": "integer" }, "isFood": { "type": "boolean" },
                    "liveStartTime": { "type": "integer", "description": "unix seconds" },
                    "liveEndTime": { "type": "integer", "description": "unix seconds; whole nights after liveStartTime" },
                    "livePeopleNum": { "type": "integer", "minimum": 1 }, "remark": { "type": "string", "maxLength": 200 }
                })),
                json!({ "type": "object", "properties": { "orderSn": { "type": "string" } } }),
                &[bad, unauth, ("404", "no such homestay"), ("409", "too many unpaid orders (40908)"), invalid, limited]),
            "/order/v1/homestayOrder/userHomestayOrderList": op("The caller's orders, newest first (cursor paging)", true,
                obj(&[], json!({
                    "lastId": { "type": "integer", "description": "id of the last order of the previous page; 0 for the first" },
                    "pageSize": { "type": "integer", "minimum": 1, "maximum": 50, "default": 10 },
                    "tradeState": { "type": "integer", "enum": [-99, -1, 0, 1, 2, 3, 4],
                                    "description": "one state, or -99 (or absent) for all, as looklook's front end asks" }
                })),
                json!({ "type": "object", "properties": { "list": { "type": "array", "items": order } } }),
                &[bad, unauth, invalid]),
            "/order/v1/homestayOrder/userHomestayOrderDetail": op("One of the caller's orders, with payment time and type", true,
                obj(&["sn"], json!({ "sn": { "type": "string" } })),
                json!({ "allOf": [order, { "type": "object", "properties": { "payTime": { "type": "integer" }, "payType": { "type": "string" } } }] }),
                &[bad, unauth, not_found]),
            "/order/v1/homestayOrder/refundHomestayOrder": op("Give back a paid order before the stay starts: the whole payment is refunded (asking again answers with the refund under way)", true,
                obj(&["sn"], json!({ "sn": { "type": "string" } })),
                json!({ "type": "object", "properties": {
                    "orderSn": { "type": "string" },
                    "refundState": { "type": "string", "enum": ["requested", "processing", "succeeded", "failed"] },
                    "refundTotal": { "type": "integer", "description": "fen" }
                } }),
                &[bad, unauth, not_found, ("409", "not paid, already used or refunded (40906), or the stay has started (40907)"), limited]),
            "/payment/v1/thirdPayment/thirdPaymentWxPay": op("WeChat JSAPI prepay: the parameters for wx.requestPayment", true,
                obj(&["orderSn", "serviceType"], json!({ "orderSn": { "type": "string" }, "serviceType": { "type": "string", "enum": ["homestayOrder"] } })),
                json!({ "type": "object", "properties": {
                    "appid": { "type": "string" }, "nonceStr": { "type": "string" }, "package": { "type": "string" },
                    "paySign": { "type": "string" }, "signType": { "type": "string", "enum": ["RSA"] },
                    "timestamp": { "type": "string" }, "paySn": { "type": "string" }
                } }),
                &[bad, unauth, not_found, ("409", "order already paid, closed or past its deadline"), ("422", "log in with WeChat first"), limited, ("502", "WeChat Pay unavailable or refused")]),
            "/payment/v1/thirdPayment/thirdPaymentWxPayStatus": op("Payment and order state (trust this, not the mini-program's own result)", true,
                json!({ "type": "object", "additionalProperties": false,
                        "properties": { "orderSn": { "type": "string" }, "sn": { "type": "string", "description": "payment or order serial" } },
                        "anyOf": [{ "required": ["orderSn"] }, { "required": ["sn"] }] }),
                json!({ "type": "object", "properties": {
                    "paySn": { "type": "string", "nullable": true }, "payStatus": { "type": "integer", "nullable": true, "description": "-1 closed, 0 waiting, 1 paid, 2 refunded" },
                    "orderSn": { "type": "string" }, "tradeState": { "type": "integer" }, "payTime": { "type": "integer" }
                } }),
                &[bad, unauth, not_found, invalid, limited]),
            "/payment/v1/thirdPayment/thirdPaymentWxPayCallback": { "post": {
                "summary": "WeChat Pay's payment callback (WeChat only): 204 once stored, else {\"code\":\"FAIL\",\"message\"}",
                "security": [],
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object" } } } },
                "responses": {
                    "204": { "description": "verified, decrypted and stored in JetStream" },
                    "401": { "description": "bad signature, stale timestamp, SIGNTEST probe or undecryptable resource" },
                    "503": { "description": "could not be stored now; WeChat retries" }
                }
            } },
            "/healthz": { "get": { "summary": "alive", "security": [], "responses": { "200": { "description": "ok" } } } },
            "/openapi.json": { "get": { "summary": "this document", "security": [], "responses": { "200": { "description": "OpenAPI 3.0" } } } },
            "/readyz": { "get": { "summary": "Postgres and NATS reachable", "security": [], "responses": { "200": { "description": "ready" }, "503": { "description": "not ready" } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "security": [], "responses": { "200": { "description": "text exposition format" } } } }
        }
    })
}
