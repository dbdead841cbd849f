//! Instants as the history writes and reads them: Unix milliseconds,
//! RFC 3339 UTC with milliseconds on disk, and the forms `ctl history`
//! accepts (RFC 3339, `YYYY-MM-DD HH:MM[:SS]`, relative `-2h`). Pure
//! functions; "now" comes in as an argument.

/// Milliseconds since the Unix epoch, now (the one clock read of the
/// history).
pub fn unix_ms_now() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// Why a time is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a time: give RFC 3339 (2026-12-04T14:05:00Z, or with an offset), 'YYYY-MM-DD HH:MM[:SS]' (UTC unless an offset follows) or a relative time (-30m, -2h, -1d)")]
pub struct TimeError(pub String);

/// Days from 1970-01-01 to the civil date (proleptic Gregorian; H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count from 1970-01-01 (`civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// `2026-12-04T14:05:00.123Z`.
pub fn format_rfc3339_ms(unix_ms: i64) -> String {
    let days = unix_ms.div_euclid(86_400_000);
    let ms_of_day = unix_ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let secs = ms_of_day / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms_of_day % 1000
    )
}

/// A relative time: `-30s`, `-30m`, `-2h`, `-1d`, `-1w` (before `now_ms`),
/// or `now`.
fn parse_relative(s: &str, now_ms: i64) -> Option<i64> {
    if s.eq_ignore_ascii_case("now") {
        return Some(now_ms);
    }
    let rest = s.strip_prefix('-')?;
    let unit_at = rest.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = rest.split_at(unit_at);
    let n: i64 = n.parse().ok()?;
    let ms = match unit {
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return None,
    };
    now_ms.checked_sub(n.checked_mul(ms)?)
}

/// Fixed-width decimal digits.
fn digits(s: &str) -> Option<u32> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// An absolute time: `YYYY-MM-DD`, then optionally `T` or a space and
/// `HH:MM[:SS[.fff]]`, then optionally `Z`, ` UTC` or `±HH:MM` / `±HHMM`
/// (UTC when none is given).
fn parse_absolute(s: &str) -> Option<i64> {
    let s = s.trim();
    let date = s.get(..10)?;
    let (y, m, d) = (
        digits(date.get(0..4)?)?,
        digits(date.get(5..7)?)?,
        digits(date.get(8..10)?)?,
    );
    if date.as_bytes().get(4) != Some(&b'-') || date.as_bytes().get(7) != Some(&b'-') {
        return None;
    }
    let y = i64::from(y);
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    let mut rest = &s[10..];
    let mut ms_of_day: i64 = 0;
    if let Some(r) = rest
        .strip_prefix('T')
        .or_else(|| rest.strip_prefix('t'))
        .or_else(|| rest.strip_prefix(' '))
    {
        // HH:MM
        let (h, mi) = (digits(r.get(0..2)?)?, digits(r.get(3..5)?)?);
        if r.as_bytes().get(2) != Some(&b':') || h > 23 || mi > 59 {
            return None;
        }
        let mut r = &r[5..];
        let mut sec = 0;
        let mut frac_ms = 0;
        if let Some(x) = r.strip_prefix(':') {
            sec = digits(x.get(0..2)?)?;
            if sec > 60 {
                return None;
            }
            r = &x[2..];
            if let Some(f) = r.strip_prefix('.').or_else(|| r.strip_prefix(',')) {
                let end = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
                if end == 0 {
                    return None;
                }
                let frac = &f[..end];
                // Milliseconds: the first three digits, right-padded.
                let mut padded: String = frac.chars().take(3).collect();
                while padded.len() < 3 {
                    padded.push('0');
                }
                frac_ms = digits(&padded)?;
                r = &f[end..];
            }
        }
        ms_of_day = (i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(sec.min(59))) * 1000
            + i64::from(frac_ms);
        rest = r;
    }
    let offset_ms: i64 = match rest.trim_start() {
        "" | "Z" | "z" | "UTC" | "utc" => 0,
        z => {
            let sign = match z.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let z = &z[1..];
            let (h, mi) = match z.len() {
                5 if z.as_bytes().get(2) == Some(&b':') => {
                    (digits(z.get(0..2)?)?, digits(z.get(3..5)?)?)
                }
                4 => (digits(z.get(0..2)?)?, digits(z.get(2..4)?)?),
                2 => (digits(z)?, 0),
                _ => return None,
            };
            if h > 23 || mi > 59 {
                return None;
            }
            sign * (i64::from(h) * 3600 + i64::from(mi) * 60) * 1000
        }
    };
    Some(days_from_civil(y, m, d) * 86_400_000 + ms_of_day - offset_ms)
}

/// A time as `ctl history` takes it, in Unix milliseconds: RFC 3339
/// (`2026-12-04T14:05:00Z`, `2026-12-04T15:05:00+01:00`), `YYYY-MM-DD
/// HH:MM[:SS]` (UTC unless an offset follows), `YYYY-MM-DD` (midnight UTC),
/// a relative time before `now_ms` (`-30s`, `-30m`, `-2h`, `-1d`, `-1w`)
/// or `now`.
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, TimeError> {
    let t = s.trim();
    parse_relative(t, now_ms)
        .or_else(|| parse_absolute(t))
        .ok_or_else(|| TimeError(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_796_393_100_000; // 2026-12-04T14:05:00Z

    #[test]
    fn formats_rfc3339_with_milliseconds() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339_ms(T0 + 7), "2026-12-04T14:05:00.007Z");
        assert_eq!(
            format_rfc3339_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(format_rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn absolute_times_in_every_accepted_form() {
        for s in [
            "2026-12-04T14:05:00Z",
            "2026-12-04t14:05:00z",
            "2026-12-04T14:05:00.000Z",
            "2026-12-04T15:05:00+01:00",
            "2026-12-04T09:35:00-04:30",
            "2026-12-04T15:05:00+0100",
            "2026-12-04 14:05",
            "2026-12-04 14:05:00",
            "2026-12-04 14:05 UTC",
            "2026-12-04 16:05 +02:00",
            " 2026-12-04T14:05:00Z ",
        ] {
            assert_eq!(parse_time(s, 0), Ok(T0), "{s}");
        }
        assert_eq!(parse_time("2026-12-04T14:05:00.25Z", 0), Ok(T0 + 250));
        assert_eq!(
            parse_time("2026-12-04", 0),
            Ok(T0 - (14 * 3600 + 300) * 1000)
        );
        for ms in [0, T0, T0 + 999, 4_102_444_800_000] {
            assert_eq!(
                parse_time(&format_rfc3339_ms(ms), 0),
                Ok(ms),
                "round trip {ms}"
            );
        }
    }

    #[test]
    fn relative_times_count_back_from_now() {
        assert_eq!(parse_time("-30s", T0), Ok(T0 - 30_000));
        assert_eq!(parse_time("-30m", T0), Ok(T0 - 1_800_000));
        assert_eq!(parse_time("-2h", T0), Ok(T0 - 7_200_000));
        assert_eq!(parse_time("-1d", T0), Ok(T0 - 86_400_000));
        assert_eq!(parse_time("-1w", T0), Ok(T0 - 604_800_000));
        assert_eq!(parse_time("now", T0), Ok(T0));
    }

    #[test]
    fn malformed_times_are_errors_that_say_what_is_accepted() {
        for s in [
            "",
            "yesterday",
            "-2",
            "-h",
            "-2y",
            "2h",
            "2026-13-01",
            "2026-02-30 10:00",
            "2026-12-04 24:00",
            "2026-12-04 14:60",
            "2026-12-04T14:05:00+25:00",
            "2026-12-04T14:05:00 Europe/Paris",
            "2026/12/04 14:05",
            "2026-12-04T14",
            "2026-12-04T14:05:00.",
            "-99999999999999999w",
            "2026-12-04T14:05:00Zjunk",
        ] {
            let e = parse_time(s, T0).expect_err(s);
            assert!(e.to_string().contains("RFC 3339"), "{s}: {e}");
        }
    }
}
