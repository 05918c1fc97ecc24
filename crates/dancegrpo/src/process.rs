//! Facts about the running process that benchmarks report.

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

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let mib = super::peak_rss_mib().expect("VmHWM");
            assert!(mib > 1.0 && mib < 1e6, "{mib}");
        }
    }
}
