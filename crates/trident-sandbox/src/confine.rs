//! What an execution may do once it runs: capabilities, `no_new_privs`, resource limits and
//! a seccomp filter. Applied by the command's process right before `execve`, in this order
//! (each step needs privileges the next one gives up).
//!
//! The filter denies what Docker's default profile denies and more (see docs/SECURITY.md):
//! it is compiled once per runner, by its runner-init, and only loaded per execution.

use std::collections::BTreeMap;
use std::io;

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What root inside a runner keeps for privileged executions (Docker's default set without
/// MKNOD and NET_RAW): enough to own files, change users and bind low ports, nothing that
/// reaches the kernel's global state (no SYS_ADMIN, SYS_PTRACE, SYS_MODULE, DAC_READ_SEARCH...).
const PRIVILEGED_CAPS: [Capability; 11] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_SETFCAP,
];

/// Open files per process.
const MAX_OPEN_FILES: u64 = 4096;

/// Syscalls that fail with EPERM, whatever their arguments.
const DENIED: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_settimeofday,
    libc::SYS_adjtimex,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_lookup_dcookie,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_fanotify_init,
    libc::SYS_process_vm_writev,
    libc::SYS_vhangup,
    libc::SYS_nfsservctl,
    libc::SYS_uselib,
    libc::SYS_ustat,
    libc::SYS_sysfs,
    libc::SYS__sysctl,
    libc::SYS_personality,
];

/// `clone` flags that would create namespaces.
const NAMESPACE_FLAGS: [i32; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// x32 syscalls share the x86_64 audit arch with their own numbers (nr | 0x40000000): the
/// same rules must hold for them.
const X32_BIT: i64 = 0x4000_0000;

/// The two filters every execution loads: the deny list (EPERM), and `clone3` answered with
/// ENOSYS (its flags live in memory the filter cannot read; libc then falls back to `clone`,
/// whose flags it can check).
pub struct Filters {
    deny: BpfProgram,
    clone3: BpfProgram,
}

pub fn compile() -> io::Result<Filters> {
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| io::Error::other(format!("seccomp: {e:?}")))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in DENIED {
        rules.insert(nr, Vec::new());
        rules.insert(nr | X32_BIT, Vec::new());
    }
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io::Error::other(format!("seccomp: {e:?}")))?;
    rules.insert(libc::SYS_clone, clone_rules.clone());
    rules.insert(libc::SYS_clone | X32_BIT, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| io::Error::other(format!("seccomp: {e:?}")))?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([
            (libc::SYS_clone3, Vec::new()),
            (libc::SYS_clone3 | X32_BIT, Vec::new()),
        ]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| io::Error::other(format!("seccomp: {e:?}")))?;
    Ok(Filters { deny, clone3 })
}

/// Gives up everything an execution must not have. Runs as root in the command's process,
/// after fork and before exec; `become_user` switches to `user` when `privileged` is false.
pub fn confine(
    filters: &Filters,
    privileged: bool,
    become_user: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let keep: CapsHashSet = if privileged {
        PRIVILEGED_CAPS.into_iter().collect()
    } else {
        CapsHashSet::new()
    };
    // The bounding set decides what root gets back at exec; a dropped capability can never
    // be regained by this process tree.
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(io::Error::other)?;
        }
    }
    caps::clear(None, CapSet::Inheritable).map_err(io::Error::other)?;
    caps::clear(None, CapSet::Ambient).map_err(io::Error::other)?;
    for (resource, limit) in [
        (libc::RLIMIT_NOFILE, MAX_OPEN_FILES),
        (libc::RLIMIT_CORE, 0),
    ] {
        let rlimit = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: setrlimit with a valid struct.
        if unsafe { libc::setrlimit(resource, &rlimit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if !privileged {
        become_user()?;
    }
    // Setuid binaries and file capabilities grant nothing from here on.
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if privileged {
        caps::set(None, CapSet::Effective, &keep).map_err(io::Error::other)?;
        caps::set(None, CapSet::Permitted, &keep).map_err(io::Error::other)?;
    }
    seccompiler::apply_filter(&filters.clone3).map_err(|e| io::Error::other(format!("{e:?}")))?;
    seccompiler::apply_filter(&filters.deny).map_err(|e| io::Error::other(format!("{e:?}")))?;
    Ok(())
}
