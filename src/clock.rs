//! Wall-clock seconds, for timestamps written into S3 objects and compared with them.

/// Seconds since the Unix epoch. A clock set before 1970 is broken, not fatal: 0 keeps the
/// caller going, and every use is informational or compared with a margin.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
