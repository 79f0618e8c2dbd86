//! Facts about this host and about processes on it, read from /proc.

use std::path::Path;

/// This host's name (the kernel's).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The CPUs this process may use.
pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// The host's memory in MiB.
pub fn mem_mib() -> u64 {
    meminfo_kib("MemTotal:").map(|k| k / 1024).unwrap_or(0)
}

fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&text, field)
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Whether process `pid` is alive and an argument of its command line is `marker` or a path
/// under it (so a reused pid of another program is not taken for it).
pub fn process_is(pid: u32, marker: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let marker = marker.as_os_str().as_encoded_bytes();
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == marker || (arg.starts_with(marker) && arg.get(marker.len()) == Some(&b'/')))
}

/// The processes whose command line names `marker` (as [`process_is`] tells).
pub fn processes_marked(marker: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|&pid| pid != std::process::id() && process_is(pid, marker))
        .collect()
}

/// CPU seconds (user + system) process `pid` has used.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (tick > 0).then(|| (utime + stime) as f64 / tick as f64)
}

/// Resident bytes of process `pid` (its shared memory, such as guest RAM, included).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, "VmRSS:").map(|k| k * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_measurable() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(rss_bytes(me).unwrap_or(0) > 0);
        assert!(mem_mib() > 0);
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let _ = process_is(me, &exe);
        assert!(!process_is(me, Path::new("/no/such/marker")));
    }

    #[test]
    fn kib_fields_parse() {
        assert_eq!(kib_field("VmPeak:\t 10 kB\nVmRSS:\t  2048 kB\n", "VmRSS:"), Some(2048));
        assert_eq!(kib_field("VmRSS: x kB", "VmRSS:"), None);
    }
}
