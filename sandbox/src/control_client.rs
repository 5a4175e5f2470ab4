//! A typed client of the control API, for tests in other crates (ingress, notifier, e2e):
//! pay an order, read what the sandbox sent and received, inject faults.

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::faults::Fault;
use crate::mini::SubscribeRecord;
use crate::notify::CallbackRecord;
use crate::sms::SmsRecord;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control API unreachable: {0}")]
    Http(String),
    #[error("control API answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// Talks to `/sandbox/v1/…` of a sandbox.
#[derive(Debug, Clone)]
pub struct Control {
    base: String,
    http: reqwest::Client,
}

#[derive(serde::Deserialize)]
struct Data<T> {
    data: Vec<T>,
}

impl Control {
    /// `base_url` is the sandbox's `http://HOST:PORT`.
    pub fn new(base_url: impl Into<String>) -> Self {
        let base = base_url.into().trim_end_matches('/').to_owned();
        // Loopback only: never route through a proxy from the environment.
        let http = reqwest::Client::builder().no_proxy().build().unwrap_or_default();
        Self { base, http }
    }

    async fn json<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ControlError> {
        let resp = req.send().await.map_err(|e| ControlError::Http(e.to_string()))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| ControlError::Http(e.to_string()))?;
        if !status.is_success() {
            return Err(ControlError::Status {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| ControlError::Http(format!("undecodable answer: {e}")))
    }

    /// The user pays `out_trade_no`: `result` is SUCCESS, PAYERROR, USERPAYING or CLOSED.
    /// Returns the transaction as a query would show it.
    pub async fn pay(&self, out_trade_no: &str, result: &str) -> Result<Value, ControlError> {
        let url = format!("{}/sandbox/v1/transactions/{out_trade_no}/pay", self.base);
        self.json(self.http.post(url).json(&json!({"result": result}))).await
    }

    /// The order as a query would show it; `None` when unknown.
    pub async fn order(&self, out_trade_no: &str) -> Result<Option<Value>, ControlError> {
        let url = format!("{}/sandbox/v1/transactions/{out_trade_no}", self.base);
        match self.json(self.http.get(url)).await {
            Ok(v) => Ok(Some(v)),
            Err(ControlError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every callback attempt, optionally only those of one order.
    pub async fn callbacks(&self, out_trade_no: Option<&str>) -> Result<Vec<CallbackRecord>, ControlError> {
        let mut url = reqwest::Url::parse(&format!("{}/sandbox/v1/callbacks", self.base))
            .map_err(|e| ControlError::Http(format!("bad base URL: {e}")))?;
        if let Some(no) = out_trade_no {
            url.query_pairs_mut().append_pair("out_trade_no", no);
        }
        Ok(self.json::<Data<CallbackRecord>>(self.http.get(url)).await?.data)
    }

    /// Every refund the sandbox made (as WeChat's refund query shows it), optionally only those of one order.
    pub async fn refunds(&self, out_trade_no: Option<&str>) -> Result<Vec<wechat::Refund>, ControlError> {
        let mut url = reqwest::Url::parse(&format!("{}/sandbox/v1/refunds", self.base))
            .map_err(|e| ControlError::Http(format!("bad base URL: {e}")))?;
        if let Some(no) = out_trade_no {
            url.query_pairs_mut().append_pair("out_trade_no", no);
        }
        Ok(self.json::<Data<wechat::Refund>>(self.http.get(url)).await?.data)
    }

    pub async fn subscribe_messages(&self) -> Result<Vec<SubscribeRecord>, ControlError> {
        let req = self.http.get(format!("{}/sandbox/v1/subscribe-messages", self.base));
        Ok(self.json::<Data<SubscribeRecord>>(req).await?.data)
    }

    pub async fn sms(&self) -> Result<Vec<SmsRecord>, ControlError> {
        Ok(self.json::<Data<SmsRecord>>(self.http.get(format!("{}/sandbox/v1/sms", self.base))).await?.data)
    }

    pub async fn fault(&self, fault: &Fault) -> Result<(), ControlError> {
        let req = self.http.post(format!("{}/sandbox/v1/faults", self.base)).json(fault);
        self.json::<Value>(req).await.map(|_| ())
    }

    /// What WeChat's client hands the mini-program as the user's info for the login `code`: `(encryptedData, iv)`,
    /// encrypted with that login's session key; `appid` puts another mini-program's appid in the watermark.
    pub async fn user_info(
        &self,
        code: &str,
        nick_name: &str,
        avatar_url: &str,
        appid: Option<&str>,
    ) -> Result<(String, String), ControlError> {
        let body = json!({"code": code, "nickName": nick_name, "avatarUrl": avatar_url, "appid": appid});
        let v: Value = self.json(self.http.post(format!("{}/sandbox/v1/user-info", self.base)).json(&body)).await?;
        let field = |k: &str| v[k].as_str().map(str::to_owned).ok_or_else(|| ControlError::Http(format!("no {k}")));
        Ok((field("encryptedData")?, field("iv")?))
    }

    /// Known subscribe-message template ids (empty: any id is accepted).
    pub async fn set_templates(&self, template_ids: &[&str]) -> Result<(), ControlError> {
        let req =
            self.http.put(format!("{}/sandbox/v1/templates", self.base)).json(&json!({"template_ids": template_ids}));
        self.json::<Value>(req).await.map(|_| ())
    }
}
