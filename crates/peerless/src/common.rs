//! Helpers more than one command needs: where datasets live, Ctrl-C and SIGTERM, and UTC civil time for
//! run names and report stamps.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Calls `on_terminate` at each SIGTERM, on a thread of its own.
pub fn on_terminate(on_terminate: impl Fn() + Send + 'static) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_io().build() else { return };
        rt.block_on(async move {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            while term.recv().await.is_some() {
                on_terminate();
            }
        });
    });
}

/// Calls `on_press` with the count of Ctrl-C presses so far (1, 2, …) at each press, on a
/// thread of its own: the one place a command learns of Ctrl-C.
pub fn on_interrupt(on_press: impl Fn(u32) + Send + 'static) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_io().build() else { return };
        rt.block_on(async move {
            let mut presses = 0;
            while tokio::signal::ctrl_c().await.is_ok() {
                presses += 1;
                on_press(presses);
            }
        });
    });
}

/// The data directory: the flag, else `$PEERLESS_DATA_DIR`, else `$XDG_DATA_HOME/peerless`,
/// else `~/.local/share/peerless`.
pub fn data_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag.filter(|p| !p.as_os_str().is_empty()) {
        return p.to_owned();
    }
    if let Some(p) = std::env::var_os("PEERLESS_DATA_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_DATA_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("peerless");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/peerless")
}

/// `YYYYmmdd-HHMMSS` in UTC, for default run names.
pub fn timestamp() -> String {
    let (y, m, d, h, mi, s) = civil_utc(SystemTime::now());
    format!("{y:04}{m:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// (year, month, day, hour, minute, second) of `t` in UTC.
pub fn civil_utc(t: SystemTime) -> (i64, i64, i64, u64, u64, u64) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}
