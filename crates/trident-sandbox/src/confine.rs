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

/// Address families a socket may have: local sockets, IPv4, IPv6. Netlink only for
/// NETLINK_ROUTE (what libc's interface and address queries need). Everything else (vsock,
/// which network namespaces do not separate; AF_ALG, the kernel's crypto API; packet
/// sockets; AF_KEY; Bluetooth...) gets EPERM from the filter itself, whatever the kernel has.
const SOCKET_FAMILIES: [i32; 3] = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];

/// Syscalls answered with ENOSYS, as if the kernel lacked them: `clone3` (its flags live in
/// memory the filter cannot read; libc then falls back to `clone`, whose flags it can check)
/// and Linux AIO (its contexts come from a host-wide table, `aio-max-nr`, that one runner
/// could exhaust; without `io_setup` there is no context for the others to use, and
/// programs fall back to threads).
const UNAVAILABLE: &[i64] = &[
    libc::SYS_clone3,
    libc::SYS_io_setup,
    libc::SYS_io_destroy,
    libc::SYS_io_submit,
    libc::SYS_io_cancel,
    libc::SYS_io_getevents,
];

/// The one filter every execution loads: the refusal of the x32 ABI (x86_64), the
/// unavailable syscalls (ENOSYS), then the deny list (EPERM) with the socket allow-list.
/// One program, not three stacked ones: the kernel checks, converts, JITs and caches every
/// filter at each install, and runs each stacked filter on every syscall.
pub struct Filters {
    program: BpfProgram,
}

fn seccomp_err(e: impl std::fmt::Debug) -> io::Error {
    io::Error::other(format!("seccomp: {e:?}"))
}

/// `arg` (a 32-bit int argument) compared with `value`.
fn int_arg(arg: u8, op: SeccompCmpOp, value: i32) -> io::Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value as u32 as u64)
        .map_err(seccomp_err)
}

pub fn compile() -> io::Result<Filters> {
    let arch: TargetArch = std::env::consts::ARCH.try_into().map_err(seccomp_err)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in DENIED {
        rules.insert(nr, Vec::new());
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
            .map_err(seccomp_err)
        })
        .collect::<io::Result<Vec<_>>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    // socket(domain, type, protocol): denied unless the domain is allowed; netlink only
    // with protocol 0 (NETLINK_ROUTE).
    let mut other_family: Vec<SeccompCondition> = SOCKET_FAMILIES
        .iter()
        .map(|&family| int_arg(0, SeccompCmpOp::Ne, family))
        .collect::<io::Result<_>>()?;
    other_family.push(int_arg(0, SeccompCmpOp::Ne, libc::AF_NETLINK)?);
    let other_netlink = vec![
        int_arg(0, SeccompCmpOp::Eq, libc::AF_NETLINK)?,
        int_arg(2, SeccompCmpOp::Ne, libc::NETLINK_ROUTE)?,
    ];
    rules.insert(
        libc::SYS_socket,
        vec![
            SeccompRule::new(other_family).map_err(seccomp_err)?,
            SeccompRule::new(other_netlink).map_err(seccomp_err)?,
        ],
    );
    // socketpair makes local sockets only.
    rules.insert(
        libc::SYS_socketpair,
        vec![
            SeccompRule::new(vec![int_arg(0, SeccompCmpOp::Ne, libc::AF_UNIX)?])
                .map_err(seccomp_err)?,
        ],
    );
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(seccomp_err)?;
    Ok(Filters {
        program: merged(&deny)?,
    })
}

// Classic BPF opcodes (linux/bpf_common.h) and offsets in struct seccomp_data (nr at 0,
// arch at 4), for the instructions written by hand: seccompiler builds one filter with one
// match action, and matches exact syscall numbers only.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_JA: u16 = 0x05;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;

/// The audit arch of the syscalls native to this build (what seccompiler's prologue checks).
fn native_audit_arch() -> io::Result<u32> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(0xc000_003e),
        "aarch64" => Ok(0xc000_00b7),
        "riscv64" => Ok(0xc000_00f3),
        other => Err(io::Error::other(format!(
            "seccomp: no audit arch known for {other}"
        ))),
    }
}

/// One program from the hand-written checks and seccompiler's `deny` program after them:
///
/// ```text
/// load arch; not native → deny (whose own prologue kills a foreign arch)
/// load nr; x86_64: nr ≥ x32 bit → EPERM
/// nr ∈ UNAVAILABLE → ENOSYS
/// deny
/// ```
///
/// Jumps in classic BPF are relative and forward only, so `deny` works unchanged behind a
/// prefix.
fn merged(deny: &BpfProgram) -> io::Result<BpfProgram> {
    use seccompiler::sock_filter;
    let at = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    let x32 = std::env::consts::ARCH == "x86_64";
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let n = UNAVAILABLE.len();
    // Instructions before `deny`: 2 (arch) + 1 (load nr) + 2 (x32) + n + 2 (skip, ENOSYS).
    let prefix_len = 3 + if x32 { 2 } else { 0 } + n + 2;
    let to_deny = u8::try_from(prefix_len - 2).map_err(seccomp_err)?;
    let mut program = vec![
        at(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        at(BPF_JEQ_K, 0, to_deny, native_audit_arch()?),
        at(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
    ];
    if x32 {
        // x32 shares the native audit arch, under its own numbers (`nr | 0x40000000`), some
        // of which exist only there: refused as a whole.
        program.push(at(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT));
        program.push(at(
            BPF_RET_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ));
    }
    for (i, &nr) in UNAVAILABLE.iter().enumerate() {
        // A match jumps to the ENOSYS return right after the skip below.
        let to_enosys = u8::try_from(n - i).map_err(seccomp_err)?;
        program.push(at(BPF_JEQ_K, to_enosys, 0, nr as u32));
    }
    program.push(at(BPF_JA, 0, 0, 1));
    program.push(at(
        BPF_RET_K,
        0,
        0,
        libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
    ));
    debug_assert_eq!(program.len(), prefix_len);
    program.extend_from_slice(deny);
    Ok(program)
}

/// Narrows runner-init's bounding set to what privileged executions keep, once per runner,
/// so that an execution drops at most `PRIVILEGED_CAPS` (a `prctl` each) instead of every
/// capability the kernel knows. The bounding set only limits what an `execve` grants:
/// runner-init and its handlers keep their effective capabilities, and they exec nothing but
/// the executions' commands.
pub fn narrow_bounding_set() -> io::Result<()> {
    for cap in caps::all() {
        if !PRIVILEGED_CAPS.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(io::Error::other)?;
        }
    }
    Ok(())
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
    // be regained by this process tree. runner-init narrowed it to PRIVILEGED_CAPS already
    // (`narrow_bounding_set`); an unprivileged execution drops those too.
    if !privileged {
        for cap in PRIVILEGED_CAPS {
            caps::drop(None, CapSet::Bounding, cap).map_err(io::Error::other)?;
        }
    }
    caps::clear(None, CapSet::Inheritable).map_err(io::Error::other)?;
    caps::clear(None, CapSet::Ambient).map_err(io::Error::other)?;
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    if !privileged {
        become_user()?;
    }
    // Setuid binaries and file capabilities grant nothing from here on.
    nix::sys::prctl::set_no_new_privs()?;
    if privileged {
        caps::set(None, CapSet::Effective, &keep).map_err(io::Error::other)?;
        caps::set(None, CapSet::Permitted, &keep).map_err(io::Error::other)?;
    }
    seccompiler::apply_filter(&filters.program).map_err(seccomp_err)?;
    Ok(())
}
