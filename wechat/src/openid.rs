//! `OpenId`: a user's id within one app id. Personal data: masked in `Debug` and `Display`.

use std::fmt;

/// Why a string is not an openid.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("openid must be 1 to 128 characters of [A-Za-z0-9_-]")]
pub struct InvalidOpenId;

/// A WeChat openid (28 characters of `[A-Za-z0-9_-]` in practice; up to 128 accepted).
///
/// `Debug` and `Display` show only the first 4 characters so that logs can correlate without
/// holding the id; [`OpenId::expose`] gives the full value for the wire.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OpenId(String);

impl OpenId {
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidOpenId> {
        let value = value.into();
        let ok = !value.is_empty()
            && value.len() <= 128
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok { Ok(Self(value)) } else { Err(InvalidOpenId) }
    }

    /// The full openid, for request bodies and storage.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The masked form used in `Debug` and `Display`.
    pub fn masked(&self) -> String {
        let head: String = self.0.chars().take(4).collect();
        format!("{head}***")
    }
}

impl TryFrom<String> for OpenId {
    type Error = InvalidOpenId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<OpenId> for String {
    fn from(id: OpenId) -> Self {
        id.0
    }
}

impl fmt::Debug for OpenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpenId({})", self.masked())
    }
}

impl fmt::Display for OpenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_validates() {
        let id = OpenId::new("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o").unwrap();
        assert_eq!(format!("{id:?}"), "OpenId(oUpF***)");
        assert_eq!(id.to_string(), "oUpF***");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o\"");
        assert!(OpenId::new("").is_err());
        assert!(OpenId::new("a b").is_err());
        assert!(serde_json::from_str::<OpenId>("\"x y\"").is_err());
    }
}
