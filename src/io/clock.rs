//! The wall clock in UTC as a civil date and time of day, for the timestamps outputs carry
//! (a model's provenance, a DICOM object's dates). Knows nothing of what it stamps.

/// A moment in UTC, to the second (proleptic Gregorian calendar).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UtcTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl UtcTime {
    /// Now (the Unix epoch if the system clock is before it).
    pub fn now() -> UtcTime {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        UtcTime::from_unix(secs)
    }

    /// The moment `secs` seconds after 1970-01-01T00:00:00Z (before it when negative).
    pub fn from_unix(secs: i64) -> UtcTime {
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        UtcTime {
            year: yoe + era * 400 + i64::from(m <= 2),
            month: m as u32,
            day: d as u32,
            hour: (rem / 3600) as u32,
            minute: ((rem / 60) % 60) as u32,
            second: (rem % 60) as u32,
        }
    }

    /// `YYYY-MM-DDTHH:MM:SSZ` (ISO 8601).
    pub fn iso8601(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// DICOM's date (DA, `YYYYMMDD`) and time (TM, `HHMMSS`).
    pub fn dicom_da_tm(&self) -> (String, String) {
        (
            format!("{:04}{:02}{:02}", self.year, self.month, self.day),
            format!("{:02}{:02}{:02}", self.hour, self.minute, self.second),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_796_300_000, "2026-12-03T12:13:20Z"),
            (-1, "1969-12-31T23:59:59Z"),
            (4_107_542_399, "2100-02-28T23:59:59Z"),
        ] {
            assert_eq!(UtcTime::from_unix(secs).iso8601(), want, "{secs}");
        }
        let t = UtcTime::from_unix(1_796_300_000);
        assert_eq!(t.dicom_da_tm(), ("20261203".into(), "121320".into()));
    }
}
