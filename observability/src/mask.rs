use std::fmt;

/// Keeps the first and last two characters of a secret or identifier and hides the rest, so log lines can still be
/// correlated by a person without revealing the value: `oUpF8uMuAJO_M2pxb1Q9zNjWeS6o` → `oU…6o(28)`.
pub fn mask(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() <= 6 {
        return format!("…({})", chars.len());
    }
    let head: String = chars[..2].iter().collect();
    let tail: String = chars[chars.len() - 2..].iter().collect();
    format!("{head}…{tail}({})", chars.len())
}

/// Wraps a value so that `Display` and `Debug` print it masked; use in `tracing` fields: `openid = %Masked(&openid)`.
pub struct Masked<'a>(pub &'a str);

impl fmt::Display for Masked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask(self.0))
    }
}

impl fmt::Debug for Masked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_all_but_the_edges() {
        assert_eq!(mask("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"), "oU…6o(28)");
        assert_eq!(mask("13800138000"), "13…00(11)");
        assert_eq!(mask("abc"), "…(3)");
        assert!(!format!("{:?}", Masked("secret-token-value")).contains("token"));
    }
}
