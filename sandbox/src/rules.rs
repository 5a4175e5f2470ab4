//! Subscribe-message value rules per key type (the key's name without its trailing digits:
//! `thing3` is a `thing`). Written from WeChat's published table, independently of the
//! merchant-side checks in the `wechat` crate, so the two can catch each other's mistakes.

/// The key type of a data key: `character_string12` → `character_string`.
pub(crate) fn key_type(key: &str) -> &str {
    key.trim_end_matches(|c: char| c.is_ascii_digit())
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F)
}

fn is_symbol(c: char) -> bool {
    c.is_ascii_punctuation()
}

/// Whether `value` is acceptable for a key of `key` type. Unknown types are refused: a
/// template only ever has the types below.
pub(crate) fn value_ok(key: &str, value: &str) -> bool {
    let n = value.chars().count();
    if n == 0 {
        return false;
    }
    match key_type(key) {
        // Any text, at most 20 characters.
        "thing" => n <= 20,
        // Digits, optionally with a decimal point, at most 32.
        "number" => n <= 32 && is_decimal(value),
        "letter" => n <= 32 && value.chars().all(|c| c.is_ascii_alphabetic()),
        "symbol" => n <= 5 && value.chars().all(is_symbol),
        // Digits, letters and symbols only, at most 32.
        "character_string" => n <= 32 && value.chars().all(|c| c.is_ascii_graphic()),
        "time" => is_time_or_range(value),
        "date" => is_date_or_range(value),
        "amount" => is_amount(value),
        "phone_number" => {
            n <= 17 && value.chars().all(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | ' ' | '(' | ')'))
        }
        "car_number" => n <= 8 && value.chars().all(|c| c.is_ascii_alphanumeric() || is_cjk(c)),
        // 10 CJK characters or 20 letters (with spaces / symbols), not mixed.
        "name" => {
            (n <= 10 && value.chars().all(|c| is_cjk(c) || c == '·'))
                || (n <= 20 && value.chars().all(|c| c.is_ascii_alphabetic() || c == ' ' || is_symbol(c)))
        }
        "phrase" => n <= 5 && value.chars().all(is_cjk),
        _ => false,
    }
}

fn is_decimal(v: &str) -> bool {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    !int.is_empty() && digits(int) && digits(frac) && !(v.contains('.') && frac.is_empty())
}

/// One currency symbol, at most 10 digits (a decimal part allowed), optionally ending in 元.
fn is_amount(v: &str) -> bool {
    let v = v.strip_suffix('元').unwrap_or(v);
    let v = v.trim_start_matches(['¥', '￥', '$', '€', '£', '₩', '₽']);
    let int = v.split_once('.').map_or(v, |(i, _)| i);
    is_decimal(v) && int.len() <= 10
}

/// `15:01`, `15:01:30`, or a date followed by one of those; a range `a~b` of such.
fn is_time_or_range(v: &str) -> bool {
    both_sides(v, |s| match s.rsplit_once(' ') {
        Some((date, time)) => is_date(date) && is_clock(time),
        None => is_clock(s) || is_date_with_cjk_time(s),
    })
}

/// A date (`2026-11-27`, `2026/11/27`, `2026年11月27日`), optionally followed by a time; a
/// range `a~b` of such.
fn is_date_or_range(v: &str) -> bool {
    both_sides(v, |s| match s.split_once(' ') {
        Some((date, time)) => is_date(date) && is_clock(time),
        None => is_date(s),
    })
}

fn both_sides(v: &str, f: impl Fn(&str) -> bool) -> bool {
    match v.split_once('~') {
        Some((a, b)) => f(a.trim()) && f(b.trim()),
        None => f(v.trim()),
    }
}

fn is_clock(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    (2..=3).contains(&parts.len())
        && parts.iter().all(|p| (1..=2).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        && parts[0].parse::<u32>().is_ok_and(|h| h < 24)
        && parts[1..].iter().all(|p| p.parse::<u32>().is_ok_and(|m| m < 60))
}

fn is_date(s: &str) -> bool {
    let nums: Vec<&str> = if s.contains('年') {
        let Some(s) = s.strip_suffix('日') else { return false };
        s.split(['年', '月']).collect()
    } else {
        s.split(['-', '/']).collect()
    };
    nums.len() == 3
        && nums[0].len() == 4
        && nums.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && nums[1].parse::<u32>().is_ok_and(|m| (1..=12).contains(&m))
        && nums[2].parse::<u32>().is_ok_and(|d| (1..=31).contains(&d))
}

/// `2026年11月27日15:01`: a CJK date glued to a time.
fn is_date_with_cjk_time(s: &str) -> bool {
    match s.split_once('日') {
        Some((date, time)) => is_date(&format!("{date}日")) && is_clock(time),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_per_type() {
        assert!(value_ok("thing3", "民宿订单已支付"));
        assert!(!value_ok("thing3", &"长".repeat(21)));
        assert!(!value_ok("thing3", ""));
        assert!(value_ok("number1", "12345.50"));
        assert!(!value_ok("number1", "12a"));
        assert!(value_ok("letter2", "abc"));
        assert!(!value_ok("letter2", "ab1"));
        assert!(value_ok("symbol4", "%$"));
        assert!(!value_ok("symbol4", "%%%%%%"));
        assert!(value_ok("character_string5", "HSO20261127000000012345"));
        assert!(!value_ok("character_string5", "中文"));
        assert!(value_ok("time6", "15:01"));
        assert!(value_ok("time6", "2026-11-27 15:01"));
        assert!(value_ok("time6", "2026年11月27日 15:01~2026年11月28日 12:00"));
        assert!(!value_ok("time6", "soon"));
        assert!(value_ok("date7", "2026年11月27日"));
        assert!(value_ok("date7", "2026-11-27~2026-11-29"));
        assert!(!value_ok("date7", "2026-13-01"));
        assert!(value_ok("amount8", "¥100.50"));
        assert!(value_ok("amount8", "100元"));
        assert!(!value_ok("amount8", "¥12345678901"));
        assert!(value_ok("phone_number9", "+86-138 0013 8000"));
        assert!(!value_ok("phone_number9", "call me"));
        assert!(value_ok("car_number10", "粤A12345"));
        assert!(!value_ok("car_number10", "粤A1234567"));
        assert!(value_ok("name11", "张三"));
        assert!(value_ok("name11", "John Smith"));
        assert!(!value_ok("name11", "张三John"));
        assert!(value_ok("phrase12", "已支付"));
        assert!(!value_ok("phrase12", "paid"));
        assert!(!value_ok("unknown1", "x"));
    }
}
