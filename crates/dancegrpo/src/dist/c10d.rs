//! PyTorch's c10d process groups through the C shim in `csrc/c10d_shim.cpp`.

use std::ffi::{c_char, c_int, CString};
use std::time::Duration;

use tch::{Device, Tensor};

use super::{Collective, Launch};
use crate::error::{Error, Result};

#[repr(C)]
struct DgPg {
    _private: [u8; 0],
}

extern "C" {
    fn dg_pg_has_nccl() -> c_int;
    fn dg_pg_new(
        kind: c_int,
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        is_server: c_int,
        prefix: *const c_char,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut DgPg;
    fn dg_pg_allreduce_sum(
        pg: *mut DgPg,
        t: *const torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn dg_pg_broadcast(
        pg: *mut DgPg,
        t: *const torch_sys::C_tensor,
        root: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn dg_pg_allgather_into(
        pg: *mut DgPg,
        output: *const torch_sys::C_tensor,
        input: *const torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn dg_pg_reduce_scatter_sum(
        pg: *mut DgPg,
        output: *const torch_sys::C_tensor,
        input: *const torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn dg_pg_all_to_all(
        pg: *mut DgPg,
        output: *const torch_sys::C_tensor,
        input: *const torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn dg_pg_free(pg: *mut DgPg);
}

/// The c10d backend of a process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistBackend {
    /// Gloo: CPU tensors (tensors elsewhere go through the CPU).
    Gloo = 0,
    /// NCCL: CUDA tensors (builds with the `cuda` feature).
    Nccl = 1,
}

impl DistBackend {
    /// The backend for tensors on `device`: Gloo on the CPU, NCCL on CUDA.
    pub fn for_device(device: Device) -> Self {
        match device {
            Device::Cuda(_) => DistBackend::Nccl,
            _ => DistBackend::Gloo,
        }
    }

    fn device(self, launch: &Launch) -> Device {
        match self {
            DistBackend::Gloo => Device::Cpu,
            DistBackend::Nccl => Device::Cuda(launch.local_rank as usize),
        }
    }
}

/// A c10d process group (one per run), joined through the TCP store of a [`Launch`].
pub struct ProcessGroup {
    pg: *mut DgPg,
    rank: i64,
    world: i64,
    device: Device,
}

const ERR_LEN: usize = 4096;

fn call(what: &str, f: impl FnOnce(*mut c_char) -> bool) -> Result<()> {
    let mut buf = vec![0 as c_char; ERR_LEN];
    if f(buf.as_mut_ptr()) {
        return Ok(());
    }
    let msg = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Err(Error::Input(format!(
        "c10d {what}: {}",
        msg.to_string_lossy()
    )))
}

impl ProcessGroup {
    /// Whether this build can create NCCL groups.
    pub fn has_nccl() -> bool {
        unsafe { dg_pg_has_nccl() != 0 }
    }

    /// Joins the process group of `launch` (blocks until every process has
    /// joined, or `timeout`, which also bounds every later collective).
    pub fn join(launch: &Launch, backend: DistBackend, timeout: Duration) -> Result<Self> {
        if backend == DistBackend::Nccl && !Self::has_nccl() {
            return Err(Error::Input(
                "NCCL process groups need a binary built with the `cuda` feature".into(),
            ));
        }
        let host = CString::new(launch.master_addr.clone())
            .map_err(|_| Error::Input("MASTER_ADDR holds a NUL byte".into()))?;
        let prefix = match launch.agent_store {
            true => format!("/worker/attempt_{}/dancegrpo/", launch.restart_count),
            false => "dancegrpo/".to_string(),
        };
        let prefix = CString::new(prefix).expect("no NUL");
        let is_server = !launch.agent_store && launch.rank == 0;
        let mut pg = std::ptr::null_mut();
        call("process group", |err| {
            pg = unsafe {
                dg_pg_new(
                    backend as c_int,
                    host.as_ptr(),
                    launch.master_port as c_int,
                    launch.rank as c_int,
                    launch.world_size as c_int,
                    is_server as c_int,
                    prefix.as_ptr(),
                    timeout.as_millis() as i64,
                    err,
                    ERR_LEN,
                )
            };
            !pg.is_null()
        })
        .map_err(|e| {
            Error::Input(format!(
                "{e} (rank {} of {} at {}:{})",
                launch.rank, launch.world_size, launch.master_addr, launch.master_port
            ))
        })?;
        Ok(ProcessGroup {
            pg,
            rank: launch.rank,
            world: launch.world_size,
            device: backend.device(launch),
        })
    }

    /// Runs `op` on `tensor`, through a contiguous copy on the group's device
    /// when `tensor` is not one.
    fn on_device(&self, tensor: &Tensor, op: impl FnOnce(&Tensor) -> Result<()>) -> Result<()> {
        if tensor.device() == self.device && tensor.is_contiguous() {
            return op(tensor);
        }
        let staged = tensor.to_device(self.device).contiguous();
        op(&staged)?;
        tensor.shallow_clone().copy_(&staged);
        Ok(())
    }
}

impl Collective for ProcessGroup {
    fn rank(&self) -> i64 {
        self.rank
    }
    fn world_size(&self) -> i64 {
        self.world
    }
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()> {
        self.on_device(tensor, |t| {
            call("all_reduce", |err| unsafe {
                dg_pg_allreduce_sum(self.pg, t.as_ptr(), err, ERR_LEN) == 0
            })
        })
    }
    fn broadcast(&self, tensor: &Tensor, root: i64) -> Result<()> {
        self.on_device(tensor, |t| {
            call("broadcast", |err| unsafe {
                dg_pg_broadcast(self.pg, t.as_ptr(), root as c_int, err, ERR_LEN) == 0
            })
        })
    }
    fn all_gather_into(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        super::check_gather_sizes(self, output, input)?;
        let input = input.to_device(self.device).contiguous();
        self.on_device(output, |out| {
            call("all_gather", |err| unsafe {
                dg_pg_allgather_into(self.pg, out.as_ptr(), input.as_ptr(), err, ERR_LEN) == 0
            })
        })
    }
    fn reduce_scatter_sum(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        super::check_gather_sizes(self, input, output)?;
        let input = input.to_device(self.device).contiguous();
        self.on_device(output, |out| {
            call("reduce_scatter", |err| unsafe {
                dg_pg_reduce_scatter_sum(self.pg, out.as_ptr(), input.as_ptr(), err, ERR_LEN) == 0
            })
        })
    }
    fn all_to_all(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        super::check_exchange_sizes(self, output, input)?;
        let input = input.to_device(self.device).contiguous();
        self.on_device(output, |out| {
            call("all_to_all", |err| unsafe {
                dg_pg_all_to_all(self.pg, out.as_ptr(), input.as_ptr(), err, ERR_LEN) == 0
            })
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { dg_pg_free(self.pg) }
    }
}
