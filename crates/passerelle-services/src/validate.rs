//! Field rules shared by the resources. Each returns a message fit for a 422 `errors` entry.

/// A display name: 1 to `max` characters after trimming, no control characters.
pub fn text(value: &str, min: usize, max: usize) -> Result<String, String> {
    let v = value.trim();
    let n = v.chars().count();
    if n < min || n > max {
        return Err(if min == 0 {
            format!("must be at most {max} characters")
        } else {
            format!("must be {min} to {max} characters")
        });
    }
    if v.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(v.to_string())
}

/// 3 to 32 of `a-z 0-9 _ . -`, starting with a letter or digit.
pub fn username(value: &str) -> Result<String, String> {
    let ok = (3..=32).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        && value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(value.to_string())
    } else {
        Err("must be 3 to 32 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit".into())
    }
}

/// A pragmatic address check (what a mail server would accept, without quoting or IP
/// literals), normalized to lower case.
pub fn email(value: &str) -> Result<String, String> {
    let bad = || Err("must be an email address like name@example.com".to_string());
    let v = value.trim();
    if v.len() > 254 {
        return Err("must be at most 254 characters".into());
    }
    let Some((local, domain)) = v.rsplit_once('@') else {
        return bad();
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if local_ok && domain_ok {
        Ok(v.to_ascii_lowercase())
    } else {
        bad()
    }
}

/// The largest price accepted, in cents (ten billion units).
pub const MAX_PRICE_CENTS: i64 = 1_000_000_000_000;

/// An exact decimal amount with at most two decimals (`"19.99"`, `"5"`, `"0.5"`), as cents.
/// Floats never enter: the text is parsed digit by digit.
pub fn price(text: &str) -> Result<i64, String> {
    let bad = || "must be a non-negative amount with at most 2 decimals, like 19.99".to_string();
    let (units, frac) = match text.split_once('.') {
        Some((u, f)) => (u, f),
        None => (text, ""),
    };
    if units.is_empty()
        || units.len() > 12
        || frac.len() > 2
        || (text.contains('.') && frac.is_empty())
    {
        return Err(bad());
    }
    if !units.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let units: i64 = units.parse().map_err(|_| bad())?;
    let frac_cents: i64 = match frac.len() {
        0 => 0,
        1 => frac.parse::<i64>().map_err(|_| bad())? * 10,
        _ => frac.parse::<i64>().map_err(|_| bad())?,
    };
    let cents = units
        .checked_mul(100)
        .and_then(|c| c.checked_add(frac_cents))
        .ok_or_else(bad)?;
    cents_in_range(cents)
}

pub fn cents_in_range(cents: i64) -> Result<i64, String> {
    if (0..=MAX_PRICE_CENTS).contains(&cents) {
        Ok(cents)
    } else {
        Err(format!("must be between 0 and {MAX_PRICE_CENTS} cents"))
    }
}

/// `1999` → `"19.99"`.
pub fn format_cents(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// ISO 4217 shape: three capital letters.
pub fn currency(value: &str) -> Result<String, String> {
    if value.len() == 3 && value.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(value.to_string())
    } else {
        Err("must be a three-letter ISO 4217 code such as EUR".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_exact() {
        let ok = |s: &str, c: i64| assert_eq!(price(s), Ok(c), "{s}");
        ok("19.99", 1999);
        ok("5", 500);
        ok("0.5", 50);
        ok("0", 0);
        ok("10000000000", 1_000_000_000_000);
        for bad in [
            "",
            ".5",
            "5.",
            "1.999",
            "-1",
            "1e3",
            "1,5",
            " 5",
            "NaN",
            "10000000000.01",
        ] {
            assert!(price(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_cents(1999), "19.99");
        assert_eq!(format_cents(5), "0.05");
    }

    #[test]
    fn emails() {
        assert_eq!(email("Ada@Example.COM").unwrap(), "ada@example.com");
        assert!(email("first.last+tag@sub.example.org").is_ok());
        for bad in [
            "",
            "a",
            "a@b",
            "@example.com",
            "a@.com",
            "a..b@example.com",
            "a b@example.com",
            "a@-x.com",
        ] {
            assert!(email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usernames_and_text() {
        assert!(username("user_1").is_ok());
        for bad in ["ab", "User", "_x1", "a b c", &"a".repeat(33)] {
            assert!(username(bad).is_err(), "{bad:?}");
        }
        assert_eq!(text("  Ada  ", 1, 10).unwrap(), "Ada");
        assert!(text("   ", 1, 10).is_err());
        assert!(text("a\u{0}b", 1, 10).is_err());
        assert!(currency("EUR").is_ok() && currency("eur").is_err());
    }
}
