//! How glibc's `malloc` serves libtorch's CPU tensors: kept for reuse instead
//! of handed back to the kernel after each free.
//!
//! libtorch allocates every CPU tensor with `posix_memalign` and frees it when
//! its last reference goes; one training iteration allocates and frees
//! gigabytes this way. By default glibc serves every block above its mmap
//! threshold (128 KiB, growing to at most 32 MiB) with a fresh `mmap` and
//! unmaps it on `free`, and shrinks its heap when its top grows free: the next
//! tensor of that size faults every page in again and the kernel zeroes each
//! one. [`keep_freed_memory`] turns both off for the process (`mallopt`:
//! no mmap-served blocks, no trimming), so a freed tensor's pages serve the
//! next one without a fault, as PyTorch's caching allocator does on a GPU
//! (a thread other than the main one still gets a mapping for a block above
//! 64 MiB, the most glibc's per-thread heaps hold; the models run on the main
//! thread).
//! The allocator decides only where a tensor lives, never its values: every
//! result is bit for bit the same.
//!
//! Measured on the medium benchmark preset (`docs/performance.md`): page
//! faults per run from 1.35 million to 0.50 million with the batched ("fast")
//! settings (0.90 of the iteration time), from 1.04 to 0.14 million in the
//! reference order. Other allocators were measured too (jemalloc, mimalloc,
//! gperftools' tcmalloc, through `LD_PRELOAD`): tcmalloc was as fast or faster
//! but has no crate that replaces `malloc` for the shared libraries as well;
//! jemalloc and mimalloc kept more memory than glibc at the same speed.
//!
//! A user who wants glibc's own behaviour back sets one of its `MALLOC_*_`
//! variables below or a `glibc.malloc.*` tunable in `GLIBC_TUNABLES`: the
//! settings are then left as glibc read them.

/// The `MALLOC_*_` variables that set what [`keep_freed_memory`] sets.
const GLIBC_MALLOC_ENV: [&str; 3] = [
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
];

/// Whether the environment (read through `var`) configures glibc's malloc:
/// one of [`GLIBC_MALLOC_ENV`], or a `glibc.malloc.` tunable (other tunables,
/// `glibc.cpu.*` say, leave it to us).
fn user_configured(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    let tunables =
        var("GLIBC_TUNABLES").is_some_and(|t| t.to_string_lossy().contains("glibc.malloc."));
    tunables || GLIBC_MALLOC_ENV.iter().any(|v| var(v).is_some())
}

/// What [`keep_freed_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorSetting {
    /// glibc now keeps freed memory for reuse.
    KeepFreed,
    /// The user configured the allocator through the environment: left alone.
    UserConfigured,
    /// Not glibc on Linux (nothing set), or glibc refused a setting.
    Unsupported,
}

/// Tells glibc's malloc to serve every block from its heap and never trim it
/// (see the module documentation), unless the environment configures malloc.
/// Call it once, at the start of `main`, before other threads exist.
pub fn keep_freed_memory() -> AllocatorSetting {
    if user_configured(|v| std::env::var_os(v)) {
        return AllocatorSetting::UserConfigured;
    }
    set_glibc()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_glibc() -> AllocatorSetting {
    // SAFETY: `mallopt` only changes malloc's parameters; both values are in
    // range (0 blocks; a threshold of i32::MAX bytes, about 2 GiB, above any
    // heap top this process leaves free)
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    };
    match ok {
        true => AllocatorSetting::KeepFreed,
        false => AllocatorSetting::Unsupported,
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_glibc() -> AllocatorSetting {
    AllocatorSetting::Unsupported
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Bytes glibc's malloc holds in mmap-served blocks, process-wide.
    fn mmapped_bytes() -> usize {
        // SAFETY: mallinfo2 only reads malloc's counters
        unsafe { libc::mallinfo2() }.hblkhd
    }

    #[test]
    fn only_malloc_settings_count_as_the_users() {
        fn env<'a>(pairs: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
            move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.into())
        }
        assert!(!user_configured(env(&[])));
        assert!(!user_configured(env(&[(
            "GLIBC_TUNABLES",
            "glibc.cpu.hwcaps=-AVX512F"
        )])));
        let tunable = [(
            "GLIBC_TUNABLES",
            "glibc.cpu.x=1:glibc.malloc.trim_threshold=0",
        )];
        assert!(user_configured(env(&tunable)));
        assert!(user_configured(env(&[(
            "MALLOC_TRIM_THRESHOLD_",
            "131072"
        )])));
    }

    #[test]
    fn a_large_tensor_comes_from_the_heap_not_a_fresh_mapping() {
        if keep_freed_memory() == AllocatorSetting::UserConfigured {
            return; // the environment decides; nothing of ours to check
        }
        let before = mmapped_bytes();
        // 48 MiB: above glibc's largest mmap threshold (32 MiB), so mapped on
        // its own by default; below the 64 MiB of a test thread's own heap
        let n = 12i64 << 20;
        let t = tch::Tensor::ones([n], (tch::Kind::Float, tch::Device::Cpu));
        assert_eq!(t.sum(tch::Kind::Float).double_value(&[]), n as f64);
        assert!(
            mmapped_bytes() <= before,
            "a 48 MiB tensor was mmap-served ({} -> {} bytes)",
            before,
            mmapped_bytes()
        );
    }
}
