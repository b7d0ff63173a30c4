//! The Linux facilities the host-side benchmark needs: CPU affinity,
//! per-process CPU time, page-cache eviction and residency, anonymous
//! request memory.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

use super::error::{HostBenchError, Result};

/// Pins thread `tid` (0: the calling thread) to `cpu`.
pub fn pin_thread(tid: i32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set`; cpu is far below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(HostBenchError::last_os(format!("pinning thread {tid} to CPU {cpu}")));
    }
    Ok(())
}

/// Pins every thread process `pid` has now to `cpu`. sched_setaffinity
/// acts on one thread, and a daemon's workers already exist by the time it
/// is pinned; threads it starts later inherit the mask of the thread that
/// starts them (the kernel's io_uring workers follow the cpuset instead).
pub fn pin_process(pid: u32, cpu: usize) -> Result<usize> {
    let dir = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&dir).map_err(|e| HostBenchError::io(format!("listing {dir}"), e))?;
    let mut pinned = 0;
    for entry in entries {
        let entry = entry.map_err(|e| HostBenchError::io(format!("listing {dir}"), e))?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        match pin_thread(tid, cpu) {
            Ok(()) => pinned += 1,
            // The thread exited between the listing and the call.
            Err(HostBenchError::Io { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(pinned)
}

/// utime + stime of a whole process (all its threads, exited ones
/// included) from the text of `/proc/<pid>/stat`, in clock ticks.
pub fn parse_stat_cpu(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself: count fields from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime), 1-based; `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| HostBenchError::io(format!("reading {path}"), e))?;
    let ticks = parse_stat_cpu(&text)
        .ok_or_else(|| HostBenchError::Parse { path: path.clone(), what: "no utime/stime fields".into() })?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// What a process holds in memory, from the `Rss*` lines of
/// /proc/<pid>/status, KiB: anonymous memory (heap, stacks: what the
/// backend itself allocates), file pages (its binary and libraries) and
/// shared memory (memfds: guest RAM, libblkio's buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProcessMemory {
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    pub rss_shmem_kib: u64,
}

/// Parses the `Rss*` lines of a /proc/<pid>/status text.
pub fn parse_status_memory(status: &str) -> Option<ProcessMemory> {
    let field = |name: &str| {
        status.lines().find_map(|line| line.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    Some(ProcessMemory {
        rss_anon_kib: field("RssAnon:")?,
        rss_file_kib: field("RssFile:")?,
        rss_shmem_kib: field("RssShmem:")?,
    })
}

/// Process `pid`'s memory now.
pub fn memory(pid: u32) -> Result<ProcessMemory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| HostBenchError::io(format!("reading {path}"), e))?;
    parse_status_memory(&text).ok_or_else(|| HostBenchError::Parse { path, what: "no RssAnon/RssFile/RssShmem".into() })
}

/// The unit of /proc's CPU times (USER_HZ, 100 on Linux).
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// CPU time the whole host spent busy (user, nice, system, irq, softirq,
/// steal; not idle or iowait) from the text of /proc/stat, in clock ticks.
pub fn parse_host_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user and nice).
    let busy = [0, 1, 2, 5, 6, 7].iter().map(|&i| fields.get(i).copied().unwrap_or(0)).sum();
    (fields.len() >= 4).then_some(busy)
}

/// CPU seconds the whole host has spent busy so far (all CPUs together).
pub fn host_busy_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").map_err(|e| HostBenchError::io("reading /proc/stat", e))?;
    let ticks = parse_host_busy(&text)
        .ok_or_else(|| HostBenchError::Parse { path: "/proc/stat".into(), what: "no cpu line".into() })?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// The 1-minute load average, from /proc/loadavg.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Writes back `file`'s dirty pages and drops all its pages from the page
/// cache (POSIX_FADV_DONTNEED drops clean pages only, hence the sync).
pub fn evict(file: &File, path: &Path) -> Result<()> {
    file.sync_data().map_err(|e| HostBenchError::io(format!("fdatasync {}", path.display()), e))?;
    // SAFETY: a valid fd; offset 0 and length 0 mean the whole file.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(HostBenchError::io(
            format!("posix_fadvise(DONTNEED) {}", path.display()),
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}

/// The fraction of `file`'s pages in the page cache, as fincore(1) counts
/// it: mmap the file (without touching it) and ask mincore.
pub fn resident_fraction(file: &File, path: &Path) -> Result<f64> {
    let len = file.metadata().map_err(|e| HostBenchError::io(format!("stat {}", path.display()), e))?.len() as usize;
    if len == 0 {
        return Ok(0.0);
    }
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    // SAFETY: a fresh shared read-only mapping of a valid fd; nothing reads
    // through it, mincore only looks at the page tables / page cache.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    if addr == libc::MAP_FAILED {
        return Err(HostBenchError::last_os(format!("mmap {}", path.display())));
    }
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: addr..addr+len is the mapping above; vec has a byte per page.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let error = (rc != 0).then(|| HostBenchError::last_os(format!("mincore {}", path.display())));
    // SAFETY: unmapping exactly what was mapped above.
    unsafe { libc::munmap(addr, len) };
    if let Some(error) = error {
        return Err(error);
    }
    let resident = vec.iter().filter(|b| **b & 1 == 1).count();
    Ok(resident as f64 / vec.len() as f64)
}

/// Anonymous page-aligned memory (O_DIRECT needs aligned buffers), unmapped
/// on drop.
#[derive(Debug)]
pub struct AnonMemory {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: it owns its mapping; moving the owner to another thread changes
// nothing about who may use the memory.
unsafe impl Send for AnonMemory {}

impl AnonMemory {
    pub fn new(len: usize) -> Result<AnonMemory> {
        // SAFETY: a fresh private anonymous mapping; no fd, no fixed address.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(HostBenchError::last_os(format!("mmap of {len} bytes")));
        }
        let base = NonNull::new(addr.cast::<u8>()).ok_or_else(|| HostBenchError::last_os("mmap returned NULL"))?;
        Ok(AnonMemory { base, len })
    }

    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `new` made.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_memory_fields() {
        let status =
            "Name:\tgmemd\nVmRSS:\t   70000 kB\nRssAnon:\t    2100 kB\nRssFile:\t    3900 kB\nRssShmem:\t   64000 kB\n";
        assert_eq!(
            parse_status_memory(status),
            Some(ProcessMemory { rss_anon_kib: 2100, rss_file_kib: 3900, rss_shmem_kib: 64000 })
        );
        assert_eq!(parse_status_memory("Name:\tx\nRssAnon:\t1 kB\n"), None);
    }

    #[test]
    fn stat_cpu_fields() {
        let stat = "1234 (qemu-storage (d)) S 1 1234 1234 0 -1 4194560 500 0 0 0 \
                    250 75 0 0 20 0 3 0 100 1000000 200 18446744073709551615";
        assert_eq!(parse_stat_cpu(stat), Some(325));
        assert_eq!(parse_stat_cpu("1234 (x) S 1"), None);
        assert_eq!(parse_stat_cpu("no parenthesis"), None);
    }

    #[test]
    fn host_busy_ticks() {
        let stat = "cpu  100 5 50 1000 30 2 3 10 0 0\ncpu0 50 2 25 500 15 1 1 5 0 0\n";
        assert_eq!(parse_host_busy(stat), Some(100 + 5 + 50 + 2 + 3 + 10));
        assert_eq!(parse_host_busy("intr 5\n"), None);
    }
}
