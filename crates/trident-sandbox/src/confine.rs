//! What an execution may do once it runs: capabilities, `no_new_privs`, resource limits and
//! a seccomp filter. Applied by the command's process right before `execve`, in this order
//! (each step needs privileges the next one gives up).
//!
//! The filter denies what Docker's default profile denies and more (see docs/SECURITY.md):
//! it is compiled once per runner, by its runner-init, which loads the bulk of it on itself
//! (inherited by everything it starts); each command adds a small layer of its own.

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

/// The seccomp programs of a runner, in two layers (the kernel runs both on every syscall
/// it has not cached as allowed, and the stricter answer wins):
///
/// - `runner`: loaded once, by runner-init before it serves, and inherited by every
///   handler and command: the refusal of foreign architectures and of the x32 ABI, the
///   unavailable syscalls (ENOSYS), the deny list (EPERM) and the socket allow-list.
/// - `execution`: loaded by each command before its exec: `clone` with namespace flags,
///   which runner-init itself needs (each handler is cloned into a pid namespace).
///
/// Why two: the kernel checks, converts, JITs and builds the action cache of a filter at
/// every install, which for the full program cost ~0.15 ms (~0.35 ms before it dispatched
/// by binary search) of every execution's start; the execution's own program is a few
/// dozen instructions.
pub struct Filters {
    runner: BpfProgram,
    execution: BpfProgram,
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
    let compile_rules = |rules: BTreeMap<i64, Vec<SeccompRule>>| {
        SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .and_then(BpfProgram::try_from)
        .map_err(seccomp_err)
    };
    // Every namespace flag lives in the low 32 bits of clone's flags: one word to compare.
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(seccomp_err)
        })
        .collect::<io::Result<Vec<_>>>()?;
    let execution = compile_rules(BTreeMap::from([(libc::SYS_clone, clone_rules)]))?;
    // Only the syscalls whose arguments decide go to seccompiler; `assemble` dispatches
    // every syscall number by itself.
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
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
    Ok(Filters {
        runner: assemble(&compile_rules(rules)?)?,
        execution,
    })
}

/// Loads `program` on the calling thread. Without `no_new_privs`: runner-init may (it holds
/// CAP_SYS_ADMIN in its user namespace), and must not set the flag for its descendants,
/// since privileged executions keep setuid programs working. (seccompiler's `apply_filter`
/// always sets it.)
fn load(program: &BpfProgram) -> io::Result<()> {
    let len = u16::try_from(program.len()).map_err(seccomp_err)?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `program`'s instructions (seccompiler's sock_filter has the
    // kernel's layout), alive for the call; the kernel copies them.
    let done = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Loads the runner's layer of the filter on runner-init, once, before it serves anything:
/// every handler and command inherits it.
pub fn restrict_runner(filters: &Filters) -> io::Result<()> {
    load(&filters.runner).map_err(|e| io::Error::other(format!("seccomp: {e}")))
}

// Classic BPF opcodes (linux/bpf_common.h), seccomp return values and offsets in struct
// seccomp_data (nr at 0, arch at 4), for the instructions written by hand.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_JA: u16 = 0x05;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const RET_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const RET_KILL_PROCESS: u32 = libc::SECCOMP_RET_KILL_PROCESS;
const RET_EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
const RET_ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

/// Syscalls up to this many are compared one after the other; above, the dispatch splits.
const LINEAR_RUN: usize = 4;

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

/// What the dispatch does with one syscall number.
#[derive(Clone, Copy)]
enum Verdict {
    /// Return this value (EPERM, ENOSYS).
    Return(u32),
    /// Jump to seccompiler's program, which looks at the arguments.
    ByArguments,
}

/// The runner's program:
///
/// ```text
/// load arch; not native → kill the process
/// load nr; x86_64: nr ≥ x32 bit → EPERM
/// binary search over the listed numbers: DENIED → EPERM, UNAVAILABLE → ENOSYS,
///     socket/socketpair → seccompiler's program (`by_arguments`); not listed → allow
/// ```
///
/// Why by hand: seccompiler compares syscall numbers one after the other, about 180
/// instructions for a number it does not list. At every install the kernel runs the filter
/// for each of its ~460 syscall numbers to find those it always allows (its action cache,
/// built with interrupts off), and that walk cost ~0.3 ms per install. With a binary
/// search, a number takes a dozen instructions, and the program is half as long to check
/// and JIT. Jumps in classic BPF are relative and forward only, so `by_arguments` works
/// unchanged behind the dispatch.
fn assemble(by_arguments: &BpfProgram) -> io::Result<BpfProgram> {
    use seccompiler::sock_filter;
    let at = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    let mut listed: Vec<(u32, Verdict)> = DENIED
        .iter()
        .map(|&nr| (nr, Verdict::Return(RET_EPERM)))
        .chain(
            UNAVAILABLE
                .iter()
                .map(|&nr| (nr, Verdict::Return(RET_ENOSYS))),
        )
        .chain(
            [libc::SYS_socket, libc::SYS_socketpair]
                .iter()
                .map(|&nr| (nr, Verdict::ByArguments)),
        )
        .map(|(nr, verdict)| Ok((u32::try_from(nr).map_err(seccomp_err)?, verdict)))
        .collect::<io::Result<_>>()?;
    listed.sort_by_key(|&(nr, _)| nr);
    if let Some(pair) = listed.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(seccomp_err(format!("syscall {} listed twice", pair[0].0)));
    }

    let mut program = vec![
        at(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        at(BPF_JEQ_K, 1, 0, native_audit_arch()?),
        at(BPF_RET_K, 0, 0, RET_KILL_PROCESS),
        at(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
    ];
    if std::env::consts::ARCH == "x86_64" {
        // x32 shares the native audit arch, under its own numbers (`nr | 0x40000000`), some
        // of which exist only there: refused as a whole.
        const X32_SYSCALL_BIT: u32 = 0x4000_0000;
        program.push(at(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT));
        program.push(at(BPF_RET_K, 0, 0, RET_EPERM));
    }
    let dispatch_start = program.len();
    program.extend(dispatch(&listed)?);
    // The dispatch's only plain jumps lead to `by_arguments`, right after it.
    let by_arguments_start = program.len();
    for (i, insn) in program.iter_mut().enumerate().skip(dispatch_start) {
        if insn.code == BPF_JA {
            insn.k = u32::try_from(by_arguments_start - (i + 1)).map_err(seccomp_err)?;
        }
    }
    program.extend_from_slice(by_arguments);
    Ok(program)
}

/// The binary search over `listed` (sorted by number), with the syscall number loaded:
/// every path ends in a return, or in a plain jump (offset filled in by `assemble`) to the
/// program that checks arguments.
fn dispatch(listed: &[(u32, Verdict)]) -> io::Result<BpfProgram> {
    use seccompiler::sock_filter;
    let at = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    if listed.len() <= LINEAR_RUN {
        let mut code = Vec::with_capacity(2 * listed.len() + 1);
        for &(nr, verdict) in listed {
            code.push(at(BPF_JEQ_K, 0, 1, nr));
            code.push(match verdict {
                Verdict::Return(value) => at(BPF_RET_K, 0, 0, value),
                Verdict::ByArguments => at(BPF_JA, 0, 0, 0),
            });
        }
        code.push(at(BPF_RET_K, 0, 0, RET_ALLOW));
        return Ok(code);
    }
    let (lower, upper) = listed.split_at(listed.len() / 2);
    let low = dispatch(lower)?;
    let high = dispatch(upper)?;
    // nr ≥ the first number of the upper half: skip the lower half's code.
    let skip_low = u8::try_from(low.len()).map_err(seccomp_err)?;
    let mut code = Vec::with_capacity(1 + low.len() + high.len());
    code.push(at(BPF_JGE_K, skip_low, 0, upper[0].0));
    code.extend(low);
    code.extend(high);
    Ok(code)
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
    // The runner's layer came with the process (`restrict_runner`); the execution's own.
    load(&filters.execution).map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The outcome of running the program on one `struct seccomp_data`.
    struct Run {
        ret: u32,
        /// Instructions executed.
        steps: usize,
        /// Whether the path loaded anything but the arch and the syscall number (the kernel's
        /// action cache can only hold syscalls whose verdict needs neither).
        read_arguments: bool,
    }

    /// A classic BPF interpreter for the instructions seccomp filters use here.
    fn run(program: &BpfProgram, arch: u32, nr: u32, args: [u64; 6]) -> Run {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&nr.to_ne_bytes());
        data.extend_from_slice(&arch.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        for arg in args {
            data.extend_from_slice(&arg.to_ne_bytes());
        }
        let (mut pc, mut acc, mut steps, mut read_arguments) = (0usize, 0u32, 0, false);
        loop {
            let insn = &program[pc];
            steps += 1;
            pc += 1;
            let k = insn.k;
            let jump = |taken: bool| if taken { insn.jt } else { insn.jf } as usize;
            match insn.code {
                BPF_LD_W_ABS => {
                    let at = k as usize;
                    read_arguments |=
                        at != SECCOMP_DATA_NR as usize && at != SECCOMP_DATA_ARCH as usize;
                    acc = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                }
                BPF_JEQ_K => pc += jump(acc == k),
                BPF_JGE_K => pc += jump(acc >= k),
                0x25 => pc += jump(acc > k),      // JGT K
                0x45 => pc += jump(acc & k != 0), // JSET K
                0x54 => acc &= k,                 // ALU AND K
                BPF_JA => pc += k as usize,
                BPF_RET_K => {
                    return Run {
                        ret: k,
                        steps,
                        read_arguments,
                    }
                }
                other => panic!("instruction {other:#x} at {} not interpreted", pc - 1),
            }
        }
    }

    /// What the kernel answers a command: both layers run, the stricter action wins (the
    /// lower action value, read as signed: KILL_PROCESS is 0x80000000).
    fn verdict(nr: i64, args: [u64; 6]) -> u32 {
        let filters = compile().unwrap();
        let arch = native_audit_arch().unwrap();
        [&filters.runner, &filters.execution]
            .into_iter()
            .map(|program| run(program, arch, nr as u32, args).ret)
            .min_by_key(|&ret| (ret & libc::SECCOMP_RET_ACTION_FULL) as i32)
            .unwrap()
    }

    #[test]
    fn every_syscall_number_gets_the_listed_verdict_by_its_number_alone() {
        let filters = compile().unwrap();
        let arch = native_audit_arch().unwrap();
        let mut longest = 0;
        for nr in 0..1024i64 {
            let expected = if DENIED.contains(&nr) {
                RET_EPERM
            } else if UNAVAILABLE.contains(&nr) {
                RET_ENOSYS
            } else {
                // socket(AF_UNSPEC...) and socketpair(AF_UNSPEC) aside, allowed.
                match nr {
                    libc::SYS_socket | libc::SYS_socketpair => RET_EPERM,
                    _ => RET_ALLOW,
                }
            };
            assert_eq!(verdict(nr, [0; 6]), expected, "syscall {nr}");
            let runner = run(&filters.runner, arch, nr as u32, [0; 6]);
            let by_arguments = [libc::SYS_socket, libc::SYS_socketpair].contains(&nr);
            assert_eq!(
                runner.read_arguments, by_arguments,
                "syscall {nr}: only socket and socketpair depend on arguments"
            );
            if !by_arguments {
                longest = longest.max(runner.steps);
            }
            let execution = run(&filters.execution, arch, nr as u32, [0; 6]);
            assert_eq!(
                execution.read_arguments,
                nr == libc::SYS_clone,
                "syscall {nr}: the execution's layer looks at clone's arguments only"
            );
            if nr != libc::SYS_clone {
                assert_eq!(execution.ret, RET_ALLOW, "syscall {nr}");
            }
        }
        // A binary search: a few loads and checks plus log2(listed) comparisons.
        assert!(
            longest <= 16,
            "{longest} instructions for one syscall number"
        );
    }

    #[test]
    fn runner_init_may_clone_into_a_pid_namespace_and_commands_may_not() {
        let filters = compile().unwrap();
        let arch = native_audit_arch().unwrap();
        let flags = [(libc::CLONE_NEWPID | libc::SIGCHLD) as u64, 0, 0, 0, 0, 0];
        assert_eq!(
            run(&filters.runner, arch, libc::SYS_clone as u32, flags).ret,
            RET_ALLOW
        );
        assert_eq!(verdict(libc::SYS_clone, flags), RET_EPERM);
    }

    #[test]
    fn arguments_decide_clone_and_sockets() {
        let clone = |flags: i32| verdict(libc::SYS_clone, [flags as u32 as u64, 0, 0, 0, 0, 0]);
        assert_eq!(clone(libc::SIGCHLD), RET_ALLOW);
        assert_eq!(clone(libc::CLONE_VM | libc::CLONE_THREAD), RET_ALLOW);
        for flag in NAMESPACE_FLAGS {
            assert_eq!(
                clone(flag | libc::SIGCHLD),
                RET_EPERM,
                "clone flag {flag:#x}"
            );
        }
        let socket = |family: i32, protocol: i32| {
            verdict(
                libc::SYS_socket,
                [
                    family as u64,
                    libc::SOCK_STREAM as u64,
                    protocol as u64,
                    0,
                    0,
                    0,
                ],
            )
        };
        for family in SOCKET_FAMILIES {
            assert_eq!(socket(family, 0), RET_ALLOW, "family {family}");
        }
        assert_eq!(socket(libc::AF_NETLINK, libc::NETLINK_ROUTE), RET_ALLOW);
        assert_eq!(socket(libc::AF_NETLINK, libc::NETLINK_AUDIT), RET_EPERM);
        for family in [libc::AF_PACKET, libc::AF_ALG, libc::AF_VSOCK, libc::AF_KEY] {
            assert_eq!(socket(family, 0), RET_EPERM, "family {family}");
        }
        let socketpair =
            |family: i32| verdict(libc::SYS_socketpair, [family as u64, 1, 0, 0, 0, 0]);
        assert_eq!(socketpair(libc::AF_UNIX), RET_ALLOW);
        assert_eq!(socketpair(libc::AF_INET), RET_EPERM);
    }

    #[test]
    fn a_foreign_arch_is_killed_and_x32_refused() {
        let filters = compile().unwrap();
        let arch = native_audit_arch().unwrap();
        let i386 = 0x4000_0003;
        for program in [&filters.runner, &filters.execution] {
            assert_eq!(run(program, i386, 39, [0; 6]).ret, RET_KILL_PROCESS);
        }
        if std::env::consts::ARCH == "x86_64" {
            for nr in [0x4000_0000 | 39, 0x4000_0000 | 528, u32::MAX] {
                assert_eq!(
                    run(&filters.runner, arch, nr, [0; 6]).ret,
                    RET_EPERM,
                    "{nr:#x}"
                );
            }
        }
    }
}
