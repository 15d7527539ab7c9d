//! UTC calendar arithmetic for partitions and index months: days as `yyyymmdd`, months as
//! `yyyymm`, from milliseconds since the epoch (proleptic Gregorian, Howard Hinnant's
//! `civil_from_days`/`days_from_civil`; no time zones are involved, so no date crate).

const MS_PER_DAY: i64 = 86_400_000;

/// `(year, month 1-12, day 1-31)` of a count of days since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The UTC day of a time, as `yyyymmdd`.
pub fn day_of(ms: i64) -> u32 {
    let (y, m, d) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    (y as u32) * 10_000 + m * 100 + d
}

/// The UTC month of a time, as `yyyymm`.
pub fn month_of(ms: i64) -> u32 {
    day_of(ms) / 100
}

/// The first millisecond of a `yyyymmdd` day.
pub fn day_start_ms(day: u32) -> i64 {
    days_from_civil(i64::from(day / 10_000), day / 100 % 100, day % 100) * MS_PER_DAY
}

/// Unix seconds at which the month of `ms` ends (the next month's first second).
pub fn month_end_secs(ms: i64) -> i64 {
    let month = month_of(ms);
    let (y, m) = (i64::from(month / 100), month % 100);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(ny, nm, 1) * 86_400
}

/// Every day from the day of `from` to the day of `to` (inclusive), oldest first.
pub fn days_between(from_ms: i64, to_ms: i64) -> Vec<u32> {
    let (a, b) = (from_ms.div_euclid(MS_PER_DAY), to_ms.div_euclid(MS_PER_DAY));
    (a..=b)
        .map(|z| {
            let (y, m, d) = civil_from_days(z);
            (y as u32) * 10_000 + m * 100 + d
        })
        .collect()
}

/// Every month from the month of `from` to the month of `to` (inclusive), oldest first.
pub fn months_between(from_ms: i64, to_ms: i64) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for day in days_between(from_ms, to_ms) {
        if out.last() != Some(&(day / 100)) {
            out.push(day / 100);
        }
    }
    out
}

// Dates are written as they read: 2026_11_29, not 20_261_129.
#[cfg(test)]
#[allow(clippy::inconsistent_digit_grouping)]
mod tests {
    use super::*;

    #[test]
    fn days_and_months_follow_the_utc_calendar() {
        assert_eq!(day_of(0), 1970_01_01);
        assert_eq!(day_of(-1), 1969_12_31);
        assert_eq!(day_of(951_782_400_000), 2000_02_29, "a leap day");
        assert_eq!(day_of(1_795_953_600_000), 2026_11_29);
        assert_eq!(month_of(1_795_953_600_000), 2026_11);
        assert_eq!(day_start_ms(2026_11_29), 1_795_910_400_000);
        assert_eq!(day_of(day_start_ms(2026_11_29) - 1), 2026_11_28);
        assert_eq!(
            month_end_secs(1_795_953_600_000),
            1_796_083_200,
            "2026-12-01"
        );
        assert_eq!(
            month_end_secs(day_start_ms(2026_12_31)),
            days_from_civil(2027, 1, 1) * 86_400
        );
        for z in -1000..100_000 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }

    #[test]
    fn ranges_list_every_day_and_month() {
        let a = day_start_ms(2026_11_29);
        let b = day_start_ms(2026_12_02) + 5;
        assert_eq!(
            days_between(a, b),
            [2026_11_29, 2026_11_30, 2026_12_01, 2026_12_02]
        );
        assert_eq!(months_between(a, b), [2026_11, 2026_12]);
        assert_eq!(days_between(a, a), [2026_11_29]);
    }
}
