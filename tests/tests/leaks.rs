//! Ending a guest frees what it held: file descriptors, VMs (and with
//! them their memory slots), vCPUs, mappings, threads and host memory
//! return to their starting level after thousands of guests exit and
//! crash. (Alone in its test binary so no other test's guests are
//! counted.)

mod common;

use shoal_host::{GuestConfig, GuestEnd};

/// The `FIELD:   N kB` line `field` of a `/proc` file, in MiB.
fn proc_mib(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

fn mem_available_mib() -> u64 {
    proc_mib("/proc/meminfo", "MemAvailable")
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Threads of this process that are not a VM's: KVM runs a helper task
/// per VM in the process of the VM (`kvm-nx-lpage-recovery`), which come
/// and go with the VMs the pool holds and are counted with them.
fn threads_outside_vms() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                .filter(|name| !name.starts_with("kvm-"))
                .count()
        })
        .unwrap_or(0)
}

/// Open fds not held by VMs ready in the host's pool (each holds a VM and
/// a vCPU fd), once that count settles.
fn fds_outside_pool(host: &shoal_host::Host, expected: Option<usize>) -> usize {
    let count_now = || count("/proc/self/fd") - 2 * host.pool().ready;
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut now = count_now();
    while expected.is_some_and(|e| e != now) && std::time::Instant::now() < give_up {
        std::thread::sleep(std::time::Duration::from_millis(5));
        now = count_now();
    }
    now
}

/// Open fds that are KVM objects of `kind` (`kvm-vm`, `kvm-vcpu`).
fn kvm_fds(kind: &str) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| {
                    target.to_str().is_some_and(|t| {
                        t.strip_prefix("anon_inode:")
                            .is_some_and(|t| t.starts_with(kind))
                    })
                })
                .count()
        })
        .unwrap_or(0)
}

/// The size of this process's mappings in MiB (`VmSize`), once the pool
/// is full again (each ready VM holds its RAM and `kvm_run` mappings):
/// new shells up to its capacity, so that none is being made (a VM
/// without its vCPU yet would count one fd outside the pool).
fn mapped_mib_with_a_full_pool(host: &shoal_host::Host) -> u64 {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let full = |p: shoal_host::pool::PoolStatus| p.ready - p.ready_reset >= p.capacity;
    while !full(host.pool()) && std::time::Instant::now() < give_up {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    proc_mib("/proc/self/status", "VmSize")
}

#[test]
fn guests_that_exit_or_crash_leave_no_fds_or_threads_behind() {
    let host = common::host();
    let hello = common::image("hello");
    let crasher = common::image("triple-fault");
    // One guest of each image first, so one-time setup (the kick handler,
    // TSC scale, each image's memory template) is not counted as a leak.
    for image in [&hello, &crasher] {
        host.spawn(image, GuestConfig::default())
            .expect("spawns")
            .wait();
    }
    // Their VMs go back to the pool: count from when both are reset (a
    // VM on its way is counted nowhere).
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while host.pool().recycled < 2 && std::time::Instant::now() < give_up {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mapped = mapped_mib_with_a_full_pool(&host);
    let fds = fds_outside_pool(&host, None);
    let threads = threads_outside_vms();
    let available = mem_available_mib();
    for round in 0..2000 {
        let image = if round % 2 == 0 { &hello } else { &crasher };
        let report = host
            .spawn(image, GuestConfig::default())
            .expect("spawns")
            .wait();
        assert!(
            matches!(report.end, GuestEnd::Exited(0) | GuestEnd::Crashed(_)),
            "{}",
            report.end
        );
    }
    assert_eq!(
        fds_outside_pool(&host, Some(fds)),
        fds,
        "file descriptors leaked"
    );
    // Each guest maps its RAM (4 MiB by default): 2000 left mapped would
    // be 8 GiB; allow the allocator's arenas.
    let grown = mapped_mib_with_a_full_pool(&host).saturating_sub(mapped);
    assert!(grown < 256, "{grown} MiB more mapped: guest memory leaked");
    // The pool is full and its filler idle. Every VM and vCPU left is
    // one of the pool's: the VMs of ended guests, and so their memory
    // slots, are gone.
    let ready = host.pool().ready;
    assert!(
        ready > 0,
        "the pool refilled, so the VM count means something"
    );
    assert_eq!(kvm_fds("kvm-vm"), ready, "VMs leaked");
    assert_eq!(kvm_fds("kvm-vcpu"), ready, "vCPUs leaked");
    assert_eq!(threads_outside_vms(), threads, "threads leaked");
    // 2000 leaked VMs would hold about 1 GiB of kernel memory; allow noise.
    let lost = available.saturating_sub(mem_available_mib());
    assert!(lost < 256, "{lost} MiB of host memory did not come back");
}
