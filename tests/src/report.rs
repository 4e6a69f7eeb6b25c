//! What benchmark reports say about where and when they ran.

/// A small /proc file's content, trimmed (empty if unreadable).
pub fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The machine a benchmark ran on: CPU model, CPUs, whether virtual, kernel.
pub fn machine() -> String {
    let cpuinfo = read_trimmed("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let virt = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    // Not available_parallelism(): it honours this thread's CPU affinity.
    // SAFETY: sysconf has no preconditions.
    let nproc = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let kernel = read_trimmed("/proc/sys/kernel/osrelease");
    format!(
        "{model}, {nproc} CPUs{}, Linux {kernel}",
        if virt { " (virtual machine)" } else { "" }
    )
}

/// Now, as `YYYY-MM-DD HH:MM UTC`.
pub fn date() -> String {
    // SAFETY: time(NULL) and gmtime_r into a zeroed tm have no other preconditions.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::gmtime_r(&t, &mut tm);
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            tm.tm_year + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min
        )
    }
}
