//! Facts about the running process and its machine that benchmarks and run
//! directories report.

/// Peak resident memory of this process in MiB (`VmHWM` of `/proc/self/status`),
/// where the platform reports it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The machine's host name (the kernel's, else `$HOSTNAME`, else `localhost`),
/// reduced to the characters `[A-Za-z0-9._-]` so it can be part of a file name.
pub fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let mib = super::peak_rss_mib().expect("VmHWM");
            assert!(mib > 1.0 && mib < 1e6, "{mib}");
        }
    }

    #[test]
    fn hostname_is_a_plain_file_name_part() {
        let h = super::hostname();
        assert!(!h.is_empty() && !h.contains('/') && !h.contains(' '), "{h}");
    }
}
