//! GPU discovery that never panics: whether the CUDA driver and NVRTC libraries load, and
//! the devices with their compute capability, memory and shared memory per block (`--device` itself is resolved in
//! [`crate::engine::device`]). cudarc (dynamic loading) panics on
//! first use of a missing library, so every probe checks `is_culib_present` first and runs
//! inside `catch_unwind` as a second guard. Also the driver errors as `EngineError`s: a
//! failure that a kernel raised asynchronously (reported by a later call) names the
//! launches queued since the last synchronisation, so that the error says which op launched.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::driver::{result, sys};

use crate::engine::{EngineError, Result};

/// One CUDA device as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (i32, i32),
    pub total_mem: usize,
    pub multiprocessors: i32,
    /// The shared memory (static and dynamic) one block may opt into
    /// (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`): 227 KiB on sm_90, 163 KiB on
    /// sm_80 / sm_87, 99 KiB on sm_86 / sm_89, 64 KiB on sm_75. What the tensor-core
    /// convolutions' tiles are chosen by (`conv.rs`, `TcKernel`).
    pub shared_memory_per_block: u32,
}

/// Whether libcuda (the driver) loads.
pub fn driver_present() -> bool {
    catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

/// Whether libnvrtc loads.
pub fn nvrtc_present() -> bool {
    catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// The driver's CUDA version as (major, minor), e.g. (13, 0).
pub fn driver_version() -> Result<(i32, i32)> {
    guard("driver version", || {
        let mut v = 0i32;
        unsafe { sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(|e| cuda("cuDriverGetVersion", e))?;
        Ok((v / 1000, (v % 1000) / 10))
    })
}

/// The run-time NVRTC's version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(EngineError::NoCuda("libnvrtc not found".into()));
    }
    let r = catch_unwind(|| {
        let (mut a, mut b) = (0i32, 0i32);
        let ok = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
        (ok, a, b)
    });
    match r {
        Ok((cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS, a, b)) => Ok((a, b)),
        Ok((e, _, _)) => Err(EngineError::Cuda {
            op: "nvrtcVersion".into(),
            msg: format!("{e:?}"),
        }),
        Err(_) => Err(EngineError::NoCuda("libnvrtc failed to load".into())),
    }
}

/// The CUDA devices, or `NoCuda` with one line saying what is missing.
pub fn cuda_available() -> Result<Vec<DeviceInfo>> {
    if !driver_present() {
        return Err(EngineError::NoCuda(
            "no CUDA driver found (libcuda.so did not load)".into(),
        ));
    }
    guard("device discovery", || {
        result::init()
            .map_err(|e| EngineError::NoCuda(format!("the CUDA driver did not initialise: {e}")))?;
        let count = result::device::get_count().map_err(|e| cuda("cuDeviceGetCount", e))?;
        if count <= 0 {
            return Err(EngineError::NoCuda("the CUDA driver found no GPU".into()));
        }
        (0..count).map(|i| device_info(i as usize)).collect()
    })
}

/// The properties of device `ordinal` (the driver must be initialised).
fn device_info(ordinal: usize) -> Result<DeviceInfo> {
    let dev = result::device::get(ordinal as i32).map_err(|e| cuda("cuDeviceGet", e))?;
    let name = result::device::get_name(dev).map_err(|e| cuda("cuDeviceGetName", e))?;
    let attr = |a| {
        unsafe { result::device::get_attribute(dev, a) }
            .map_err(|e| cuda("cuDeviceGetAttribute", e))
    };
    use sys::CUdevice_attribute::*;
    let major = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let multiprocessors = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let shared_memory_per_block =
        u32::try_from(attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?).unwrap_or(0);
    let total_mem =
        unsafe { result::device::total_mem(dev) }.map_err(|e| cuda("cuDeviceTotalMem", e))?;
    Ok(DeviceInfo {
        ordinal,
        name,
        compute_capability: (major, minor),
        total_mem,
        multiprocessors,
        shared_memory_per_block,
    })
}

/// A CUDA error as one line (the reason `--device auto` gives for falling back to the CPU).
pub fn reason_line(e: &EngineError) -> String {
    match e {
        EngineError::NoCuda(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Runs a driver probe, turning a panic of the dynamic loader into `NoCuda`.
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(EngineError::NoCuda(format!(
            "the CUDA driver library failed during {what}"
        ))),
    }
}

pub(crate) fn cuda(op: &str, e: result::DriverError) -> EngineError {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return EngineError::OutOfMemory { bytes: 0 };
    }
    // The message comes from the driver (cuGetErrorString): guard against a missing library.
    let mut msg = catch_unwind(|| e.to_string()).unwrap_or_else(|_| format!("{:?}", e.0));
    if is_async_failure(e.0) {
        msg.push_str(&LAUNCHES.with(|l| l.borrow().note()));
    }
    EngineError::Cuda {
        op: op.to_string(),
        msg,
    }
}

/// The errors a kernel raises while it runs: the launch itself returned success, and a
/// later call on the context (a copy, a synchronisation, the next launch) reports them.
fn is_async_failure(code: sys::CUresult) -> bool {
    use sys::CUresult::*;
    matches!(
        code,
        CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ASSERT
            | CUDA_ERROR_LAUNCH_TIMEOUT
    )
}

/// The kernels this thread launched since its last completed synchronisation.
struct LaunchLog {
    /// (module, kernel) of the most recent launches.
    recent: VecDeque<(&'static str, &'static str)>,
    count: u64,
}

/// Launches remembered by name; the count goes on beyond them.
const LOG_LEN: usize = 8;

thread_local! {
    static LAUNCHES: RefCell<LaunchLog> = const {
        RefCell::new(LaunchLog {
            recent: VecDeque::new(),
            count: 0,
        })
    };
}

impl LaunchLog {
    fn note(&self) -> String {
        if self.count == 0 {
            return String::new();
        }
        let names: Vec<String> = self
            .recent
            .iter()
            .map(|(m, k)| format!("{m}::{k}"))
            .collect();
        if self.count == 1 {
            return format!(
                "; raised asynchronously by the launch of {} (the only launch since the last synchronisation)",
                names.join("")
            );
        }
        format!(
            "; raised asynchronously by one of the {} launches since the last synchronisation, the last {}: {} \
             (CUDA_LAUNCH_BLOCKING=1 makes the failing launch report it)",
            self.count,
            names.len(),
            names.join(", ")
        )
    }
}

/// Records a launch of `module::name` on this thread (for [`cuda`]'s error messages).
pub(crate) fn launched(module: &'static str, name: &'static str) {
    LAUNCHES.with(|l| {
        let mut l = l.borrow_mut();
        if l.recent.len() == LOG_LEN {
            l.recent.pop_front();
        }
        l.recent.push_back((module, name));
        l.count += 1;
    });
}

/// Forgets the launches: a synchronising call succeeded, so they all completed.
pub(crate) fn synced() {
    LAUNCHES.with(|l| {
        let mut l = l.borrow_mut();
        l.recent.clear();
        l.count = 0;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_asynchronous_failure_names_the_launches_since_the_last_sync() {
        synced();
        let e = result::DriverError(sys::CUresult::CUDA_ERROR_LAUNCH_FAILED);
        let EngineError::Cuda { msg, .. } = cuda("download", e) else {
            panic!("not a Cuda error")
        };
        assert!(!msg.contains("raised asynchronously"), "{msg}");
        launched("ccl", "ccl_merge_vox");
        let EngineError::Cuda { op, msg } = cuda("download", e) else {
            panic!("not a Cuda error")
        };
        assert_eq!(op, "download");
        assert!(msg.contains("by the launch of ccl::ccl_merge_vox"), "{msg}");
        const K: [&str; 10] = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"];
        for k in K {
            launched("norm", k);
        }
        let EngineError::Cuda { msg, .. } = cuda("synchronize", e) else {
            panic!("not a Cuda error")
        };
        assert!(msg.contains("one of the 11 launches"), "{msg}");
        assert!(
            msg.contains("norm::k9") && !msg.contains("ccl_merge_vox"),
            "{msg}"
        );
        // A synchronous error (a bad launch configuration) names no earlier launch.
        let inval = result::DriverError(sys::CUresult::CUDA_ERROR_INVALID_VALUE);
        let EngineError::Cuda { msg, .. } = cuda("launch x::y", inval) else {
            panic!("not a Cuda error")
        };
        assert!(!msg.contains("asynchronously"), "{msg}");
        synced();
        let EngineError::Cuda { msg, .. } = cuda("download", e) else {
            panic!("not a Cuda error")
        };
        assert!(!msg.contains("asynchronously"), "{msg}");
    }
}
