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

/// Pins the calling thread to one CPU (benchmarks whose per-CPU state must carry across calls,
/// or that should not migrate mid-measurement).
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity(0) applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}
