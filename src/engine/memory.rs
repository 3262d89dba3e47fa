//! How much memory the KV cache takes when the user does not say: a share of what the device
//! has free once the weights are loaded, as vLLM's `gpu_memory_utilization` does.
//!
//! On a GPU the engine may use `utilization` of the device's total memory; what the weights
//! (and anything else on the device) already hold, plus a reserve for one step's
//! activations, is taken off, and the rest is the KV cache. On the CPU (and Metal, whose
//! memory is the system's) the cache takes a bounded share of the RAM available now, since
//! the same memory serves the operating system and every other program.

use anyhow::{bail, Result};
use candle_core::Device;

/// A device's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub total: u64,
    /// Free now (on the CPU: the kernel's `MemAvailable`, which counts reclaimable caches).
    pub free: u64,
}

/// The share of available RAM the KV cache takes on the CPU by default.
pub const CPU_SHARE: f64 = 0.25;
/// The most the KV cache takes on the CPU by default, in bytes (a CPU decodes a few thousand
/// tokens a minute; more cache than this only holds idle prefixes).
pub const CPU_CAP_BYTES: u64 = 4 << 30;
/// The KV cache on the CPU when the system's memory cannot be read (not Linux), in bytes.
pub const CPU_FALLBACK_BYTES: u64 = 1 << 30;

/// The memory of `device`: CUDA asks the driver; the CPU and Metal read /proc/meminfo
/// (None where there is none).
pub fn device_memory(device: &Device) -> Result<Option<DeviceMemory>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().map_err(|e| anyhow::anyhow!("asking the CUDA driver for the device's free memory: {e:?}"))?;
            Ok(Some(DeviceMemory { total: total as u64, free: free as u64 }))
        }
        _ => Ok(std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| parse_meminfo(&text))),
    }
}

/// `MemTotal` and `MemAvailable` of a /proc/meminfo text (kB there, bytes here).
pub fn parse_meminfo(text: &str) -> Option<DeviceMemory> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))?;
        let kb: u64 = line[name.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    };
    Some(DeviceMemory { total: field("MemTotal")?, free: field("MemAvailable")? })
}

/// The KV cache's bytes on a GPU: `utilization` of the total, less what is in use and the
/// `reserve` for activations. Refused, with the numbers, when nothing is left.
pub fn gpu_cache_bytes(mem: DeviceMemory, utilization: f64, reserve: u64) -> Result<u64> {
    if !(utilization > 0.0 && utilization <= 1.0) {
        bail!("--gpu-memory-utilization {utilization} is outside (0, 1]; the default is 0.9");
    }
    let budget = (mem.total as f64 * utilization) as u64;
    let used = mem.total.saturating_sub(mem.free);
    match budget.checked_sub(used + reserve) {
        Some(bytes) if bytes > 0 => Ok(bytes),
        _ => bail!(
            "no device memory is left for the KV cache: --gpu-memory-utilization {utilization} allows {} of the device's {}, and the weights and other programs already use {} (plus {} kept for activations); raise --gpu-memory-utilization, free the device, or give the cache a size with --kv-cache-mb",
            gib(budget),
            gib(mem.total),
            gib(used),
            gib(reserve)
        ),
    }
}

/// The KV cache's bytes on the CPU: [`CPU_SHARE`] of the available RAM, at most
/// [`CPU_CAP_BYTES`]; [`CPU_FALLBACK_BYTES`] when the RAM cannot be read.
pub fn cpu_cache_bytes(mem: Option<DeviceMemory>) -> u64 {
    mem.map_or(CPU_FALLBACK_BYTES, |m| ((m.free as f64 * CPU_SHARE) as u64).min(CPU_CAP_BYTES))
}

/// Bytes as "1.5 GiB" (or "7.7 MiB" below 1 GiB).
pub fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   16000000 kB\nBuffers: 1 kB\n";
        assert_eq!(parse_meminfo(text), Some(DeviceMemory { total: 24_000_000 * 1024, free: 16_000_000 * 1024 }));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None, "no MemAvailable: unknown, not zero");
        // A field whose name starts like another's is not taken for it.
        assert_eq!(parse_meminfo("MemTotalX: 5 kB\nMemTotal: 2 kB\nMemAvailable: 1 kB\n").map(|m| m.total), Some(2048));
    }

    #[test]
    fn the_gpu_share_is_taken_off_what_is_used() {
        let gb = 1u64 << 30;
        // 140 GiB device, weights use 16 GiB: 0.9 * 140 - 16 - 2 = 108 GiB.
        let mem = DeviceMemory { total: 140 * gb, free: 124 * gb };
        assert_eq!(gpu_cache_bytes(mem, 0.9, 2 * gb).unwrap(), 108 * gb);
        // Nothing left: refused with the numbers and the flags that fix it.
        let full = DeviceMemory { total: 16 * gb, free: gb };
        let e = format!("{:#}", gpu_cache_bytes(full, 0.9, 0).unwrap_err());
        assert!(e.contains("--gpu-memory-utilization 0.9") && e.contains("15.0 GiB") && e.contains("--kv-cache-mb"), "{e}");
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(gpu_cache_bytes(mem, bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_cpu_share_is_bounded() {
        let gb = 1u64 << 30;
        assert_eq!(cpu_cache_bytes(Some(DeviceMemory { total: 8 * gb, free: 4 * gb })), gb);
        assert_eq!(cpu_cache_bytes(Some(DeviceMemory { total: 512 * gb, free: 400 * gb })), CPU_CAP_BYTES);
        assert_eq!(cpu_cache_bytes(None), CPU_FALLBACK_BYTES);
    }
}
