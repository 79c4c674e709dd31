//! The process's memory budget: the most bytes one command plans to hold at once. Every
//! command estimates its peak (a volume's read, a model's parameters and activations, a
//! segmentation, an evaluation) *before* allocating, and refuses with an
//! [`IoError::OverBudget`] naming the size and the budget when the estimate does not fit, or
//! processes the work in pieces where the algorithm allows.
//!
//! The budget is `--max-memory` when given (or `ICHCAM_MAX_MEMORY`), else half the
//! machine's RAM; never more than the address-space limit (`RLIMIT_AS`, as set by
//! `ulimit -v` or `prlimit --as`) less [`ADDRESS_SPACE_RESERVE`] (or a quarter of a smaller
//! limit) for what no estimate counts
//! (the binary and its libraries, thread stacks, allocator arenas). A [`Pool`] shares the
//! budget between the stages of a pipeline that hold several items at once.
//!
//! Knows nothing about volumes or the network: callers estimate their own needs in bytes.

use super::error::human_bytes;
use super::IoError;
use std::path::Path;
use std::sync::{Condvar, Mutex, OnceLock};

/// Default budget: this fraction of the machine's RAM.
pub const DEFAULT_RAM_FRACTION: f64 = 0.5;
/// Address space kept back from an `RLIMIT_AS` for what estimates do not count (a
/// quarter of a smaller limit).
pub const ADDRESS_SPACE_RESERVE: u64 = 1 << 30;

/// The budget an address-space limit of `limit` bytes leaves.
pub fn under_address_space(limit: u64) -> u64 {
    limit.saturating_sub(ADDRESS_SPACE_RESERVE.min(limit / 4))
}
/// The budget when neither the RAM nor an address-space limit can be read.
pub const FALLBACK_BUDGET: u64 = 4 << 30;
/// Environment variable read when `--max-memory` is not given.
pub const ENV_MAX_MEMORY: &str = "ICHCAM_MAX_MEMORY";

/// Where the budget comes from (for messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--max-memory` or `ICHCAM_MAX_MEMORY`.
    Option,
    /// [`DEFAULT_RAM_FRACTION`] of the RAM (bytes).
    Ram(u64),
    /// Lowered to fit the address-space limit (bytes).
    AddressSpace(u64),
    /// Neither the RAM nor a limit could be read.
    Fallback,
}

/// The budget in bytes and where it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub bytes: u64,
    pub source: Source,
}

impl Budget {
    /// `"4.0 GiB (--max-memory)"`, `"11.7 GiB (half of the 23.4 GiB of RAM)"`, ...
    pub fn describe(&self) -> String {
        let b = human_bytes(self.bytes as u128);
        match self.source {
            Source::Option => format!("{b} (--max-memory)"),
            Source::Ram(r) => format!(
                "{b} ({:.0} % of the {} of RAM; set --max-memory)",
                DEFAULT_RAM_FRACTION * 100.0,
                human_bytes(r as u128)
            ),
            Source::AddressSpace(l) => format!(
                "{b} (the address-space limit of {} less {} reserved)",
                human_bytes(l as u128),
                human_bytes((l - under_address_space(l)) as u128)
            ),
            Source::Fallback => format!("{b} (default; set --max-memory)"),
        }
    }

    /// An [`IoError::OverBudget`] about `path` unless `need` bytes fit; `what` names the
    /// work (called only on failure).
    pub fn check(
        &self,
        path: &Path,
        need: u128,
        what: impl FnOnce() -> String,
    ) -> Result<(), IoError> {
        if need <= self.bytes as u128 {
            Ok(())
        } else {
            Err(self.refuse(path, need, what()))
        }
    }

    /// The error for `need` bytes of `what` on `path`.
    pub fn refuse(&self, path: &Path, need: u128, what: String) -> IoError {
        IoError::OverBudget {
            path: path.to_path_buf(),
            what,
            need,
            budget: self.describe(),
        }
    }
}

static CHOSEN: OnceLock<Budget> = OnceLock::new();

/// Sets the process's budget from `--max-memory` (bytes; `None` = the environment variable,
/// else the default); the first call wins. Returns the budget in force.
pub fn set_max_memory(requested: Option<u64>) -> Budget {
    *CHOSEN.get_or_init(|| compute(requested.or_else(env_request)))
}

/// The process's budget (the default when [`set_max_memory`] was not called).
pub fn budget() -> Budget {
    *CHOSEN.get_or_init(|| compute(env_request()))
}

fn env_request() -> Option<u64> {
    std::env::var(ENV_MAX_MEMORY)
        .ok()
        .and_then(|v| parse_size(&v).ok())
}

/// The budget for a request (or the default), capped by the address-space limit.
pub fn compute(requested: Option<u64>) -> Budget {
    let wanted = match requested {
        Some(b) => Budget {
            bytes: b,
            source: Source::Option,
        },
        None => match ram_bytes() {
            Some(r) => Budget {
                bytes: (r as f64 * DEFAULT_RAM_FRACTION) as u64,
                source: Source::Ram(r),
            },
            None => Budget {
                bytes: FALLBACK_BUDGET,
                source: Source::Fallback,
            },
        },
    };
    match address_space_limit() {
        Some(l) if under_address_space(l) < wanted.bytes => Budget {
            bytes: under_address_space(l),
            source: Source::AddressSpace(l),
        },
        _ => wanted,
    }
}

/// Parses `"8G"`, `"512M"`, `"1.5GiB"`, `"2048"` (bytes): K, M, G and T are powers of 1024,
/// with or without a trailing `B` or `iB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let num_end = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(num_end);
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("`{t}`: unknown unit `{u}` (use K, M, G or T)")),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{t}` is not a size (e.g. 8G, 512M)"))?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(format!("`{t}` is not a usable memory size"));
    }
    Ok(bytes as u64)
}

/// Total RAM from `/proc/meminfo`.
pub fn ram_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The soft address-space limit (`RLIMIT_AS`) in bytes, `None` when unlimited.
pub fn address_space_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct through a valid pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut r) };
    if rc != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(r.rlim_cur)
    }
}

/// Bytes shared by the stages of a pipeline: each item reserves its estimated peak before
/// its work starts and gives it back when done, so the items in flight together stay within
/// the total.
#[derive(Debug)]
pub struct Pool {
    total: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// Bytes held from a [`Pool`]; given back on drop.
#[derive(Debug)]
pub struct Reservation<'a> {
    pool: &'a Pool,
    bytes: u64,
}

impl Pool {
    pub fn new(total: u64) -> Self {
        Pool {
            total,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Waits until `bytes` fit beside the reservations held, then holds them; `None` when
    /// they exceed the pool's total (they would never fit).
    pub fn reserve(&self, bytes: u64) -> Option<Reservation<'_>> {
        if bytes > self.total {
            return None;
        }
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while used.saturating_add(bytes) > self.total {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += bytes;
        Some(Reservation { pool: self, bytes })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(bytes);
        self.freed.notify_all();
    }
}

impl Reservation<'_> {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back all but `bytes` (when the work moves to a stage that needs less).
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.pool.release(self.bytes - bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.pool.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("2048").unwrap(), 2048);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size(" 512m ").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        for bad in ["", "G", "-1G", "8X", "0", "1e400", "nan"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn explicit_budget_is_kept_below_the_address_space_limit() {
        let b = compute(Some(1 << 20));
        assert_eq!(b.bytes, 1 << 20);
        assert_eq!(b.source, Source::Option);
        let huge = compute(Some(u64::MAX / 2));
        if let Some(l) = address_space_limit() {
            assert!(huge.bytes <= l);
        }
        assert!(b.describe().contains("--max-memory"));
    }

    #[test]
    fn pool_blocks_until_freed_and_refuses_what_never_fits() {
        let pool = Pool::new(100);
        assert!(pool.reserve(101).is_none());
        let mut a = pool.reserve(70).unwrap();
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                let b = pool.reserve(50).unwrap();
                b.bytes()
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!h.is_finished(), "70 + 50 > 100 must wait");
            a.shrink_to(40);
            assert_eq!(h.join().unwrap(), 50);
        });
        assert_eq!(pool.used(), 40);
        drop(a);
        assert_eq!(pool.used(), 0);
    }
}
