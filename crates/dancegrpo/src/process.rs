//! Facts about the running process and its machine that benchmarks and run
//! directories report.

/// Peak resident memory of this process in MiB (`VmHWM` of `/proc/self/status`),
/// where the platform reports it.
pub fn peak_rss_mib() -> Option<f64> {
    Some(proc_kb("/proc/self/status", "VmHWM:")? as f64 / 1024.0)
}

/// The `key:   N kB` line of a `/proc` file, in kB.
fn proc_kb(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix(key))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

extern "C" {
    fn dg_cuda_peak_allocated(device: std::os::raw::c_int) -> i64;
    fn dg_cuda_total_memory(device: std::os::raw::c_int) -> i64;
}

/// The memory `device` has, in bytes: a GPU's own (`None` in a build without
/// CUDA), the machine's physical memory (`MemTotal` of `/proc/meminfo`) for the CPU.
pub fn device_memory_bytes(device: tch::Device) -> Option<u64> {
    match device {
        tch::Device::Cuda(i) => {
            // SAFETY: reads the device's properties; -1 when CUDA is not compiled in
            // or the device cannot be read
            let bytes = unsafe { dg_cuda_total_memory(i as std::os::raw::c_int) };
            (bytes >= 0).then_some(bytes as u64)
        }
        _ => Some(proc_kb("/proc/meminfo", "MemTotal:")? * 1024),
    }
}

/// The most memory `device` has held for this process: the CUDA caching
/// allocator's peak allocated bytes on a GPU (`None` in a build without CUDA),
/// the peak resident set on the CPU, in MiB.
pub fn peak_device_mib(device: tch::Device) -> Option<f64> {
    match device {
        tch::Device::Cuda(i) => {
            // SAFETY: reads allocator statistics; -1 when CUDA is not compiled in
            // or the device cannot be read
            let bytes = unsafe { dg_cuda_peak_allocated(i as std::os::raw::c_int) };
            (bytes >= 0).then(|| bytes as f64 / (1u64 << 20) as f64)
        }
        _ => peak_rss_mib(),
    }
}

/// Seconds since `start`, after `device` has finished its queued work (a
/// GPU runs asynchronously: without the wait a timing measures the queueing).
pub fn seconds_since(start: std::time::Instant, device: tch::Device) -> f64 {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    start.elapsed().as_secs_f64()
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
    fn host_memory_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let bytes = super::device_memory_bytes(tch::Device::Cpu).expect("MemTotal");
            assert!(bytes > 1 << 28, "{bytes}");
        }
    }

    #[test]
    fn hostname_is_a_plain_file_name_part() {
        let h = super::hostname();
        assert!(!h.is_empty() && !h.contains('/') && !h.contains(' '), "{h}");
    }
}
