//! The memory check a run makes before it loads or allocates anything: the
//! [`plan`](super::plan()) of one process against the memory of its device (a
//! GPU's own, the machine's for the CPU). A run that cannot fit stops with an
//! error naming the field that makes it too big, instead of dying in the
//! allocator minutes later.

use tch::Device;

use super::{plan, PlanOptions, GIB};
use crate::error::{Error, Result};
use crate::train::config::TrainConfig;
use crate::train::health::MemoryCheck;

/// Memory kept back on a GPU for the CUDA context and allocator slack (as `plan`'s default).
const CUDA_RESERVE: u64 = 2 << 30;

/// Checks that one of `world` processes of `cfg` fits the memory of
/// `device` (when it is known): `Ok(None)` when it does (or is not checked),
/// `Ok(Some(warning))` when it does not under [`MemoryCheck::Warn`], an error
/// naming the field to change under [`MemoryCheck::Stop`].
pub fn check_memory(
    cfg: &TrainConfig,
    world: i64,
    device: Device,
    mode: MemoryCheck,
) -> Result<Option<String>> {
    if mode == MemoryCheck::Off {
        return Ok(None);
    }
    let Some(memory) = crate::process::device_memory_bytes(device) else {
        return Ok(None);
    };
    let reserve = match device {
        Device::Cuda(_) => CUDA_RESERVE,
        _ => 0,
    };
    let opts = PlanOptions {
        world,
        memory,
        text_len: None,
        reserve,
    };
    let p = plan(cfg, &opts)?;
    let Some(largest) = p.lines.iter().max_by_key(|l| l.bytes).filter(|_| !p.fits) else {
        return Ok(None);
    };
    let gib = |b: u64| b as f64 / GIB;
    let hint = match p.smallest_world_full.filter(|&n| n > world) {
        Some(n) => format!(" (it would fit over {n} processes with parallel.sharding = \"full\")"),
        None => String::new(),
    };
    let msg = format!(
        "one process would need about {:.1} GiB, more than the {:.1} GiB of {device:?}; the largest part is {} ({:.1} GiB: {}){hint}; `dancegrpo plan` itemises it, and health.memory_check = \"warn\" tries anyway",
        gib(p.total),
        gib(memory),
        largest.what,
        gib(largest.bytes),
        largest.detail
    );
    match mode {
        MemoryCheck::Warn => Ok(Some(msg)),
        _ => Err(Error::config("config", largest.field, msg)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_run_too_big_for_the_machine_names_the_image_size() {
        let tiny = TrainConfig::tiny_demo();
        assert_eq!(
            check_memory(&tiny, 1, Device::Cpu, MemoryCheck::Stop).unwrap(),
            None
        );
        let set = [
            "sampler.height=16384".to_string(),
            "sampler.width=16384".to_string(),
        ];
        let huge = tiny.with_overrides(&set, Path::new("test")).unwrap();
        let err = check_memory(&huge, 1, Device::Cpu, MemoryCheck::Stop)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("field `sampler.height, sampler.width, sampler.decode_batch`"),
            "{err}"
        );
        assert!(err.contains("one process would need about"), "{err}");
        let warn = check_memory(&huge, 1, Device::Cpu, MemoryCheck::Warn).unwrap();
        assert!(warn.unwrap().contains("activations"));
        assert_eq!(
            check_memory(&huge, 1, Device::Cpu, MemoryCheck::Off).unwrap(),
            None
        );
    }
}
