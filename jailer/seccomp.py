"""seccomp: the syscall deny-list installed in every jail (DESIGN.md section 5).

Namespaces, a dropped capability set and an unprivileged uid close most of the kernel; this
filter closes what they leave open: cross-process access (ptrace and friends), kernel
facilities that are not namespaced (keyrings), large attack surfaces with a CVE history (bpf,
perf, userfaultfd, io_uring), the mount API, new namespaces, host administration, terminal
injection, every socket family but AF_UNIX, and the non-native system call ABIs.

Plan/apply split, as nsjail's sandbox.cc: the policy is data (`DENIED`), `rules()` resolves it
for one architecture (pure: nothing is loaded), `compile_filter()` turns it into a classic-BPF
program once per process (cached), and each jail gets those bytes on a fresh fd
(`program_fd()`) for `bwrap --seccomp FD`. bwrap installs the program after setting
no_new_privs, just before it execs the payload.

The filter is a deny-list (default ALLOW): the jail's runtime (node, python) keeps working as it
evolves, and the namespaces remain the primary boundary. Denied calls fail with an errno, not a
kill, so that a tenant sees an ordinary error:
- EPERM for most calls (`deny_errno`; tests compile the same rules with an unmistakable errno);
- EAFNOSUPPORT for socket families other than AF_UNIX, the errno of a kernel without them;
- ENOSYS for clone3, so that libc falls back to clone, whose flags the filter can read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BAD_ARCH_ACTION",
    "DENIED",
    "PERSONALITY_ALLOWED",
    "ArgMatch",
    "Rule",
    "SeccompError",
    "compile_filter",
    "describe_pfc",
    "native_arch",
    "program_fd",
    "rules",
    "supported",
]


class SeccompError(Exception):
    """The host cannot build the filter; the message says why (jail setup must fail closed)."""


# The policy, as data: (syscall, why it is denied). `jailer doctor` and docs/seccomp.md print it.
# Calls listed here are denied outright unless _CONDITIONS narrows them to some arguments.
DENIED: tuple[tuple[str, str], ...] = (
    # Other processes: the pid namespace hides them, these would reach any that is visible.
    ("ptrace", "trace another process: read and write its memory and registers"),
    ("process_vm_readv", "read another process's memory"),
    ("process_vm_writev", "write another process's memory"),
    ("process_madvise", "act on another process's memory through a pidfd"),
    ("pidfd_getfd", "copy a file descriptor out of another process (ptrace-like)"),
    ("kcmp", "compare kernel objects of two processes (ptrace access check, kernel layout leak)"),
    # Kernel keyrings are not namespaced.
    ("keyctl", "kernel keyrings are not namespaced: reach keys of other jails and the host"),
    ("add_key", "kernel keyrings are not namespaced"),
    ("request_key", "kernel keyrings are not namespaced"),
    # Large kernel attack surfaces with a history of privilege escalations.
    ("bpf", "eBPF: verifier and map bugs are a steady source of kernel exploits"),
    ("perf_event_open", "perf events: kernel attack surface and side channels"),
    ("userfaultfd", "lets an exploit pause the kernel in the middle of a copy to win a race"),
    ("io_uring_setup", "io_uring: large attack surface; its operations bypass this filter"),
    ("io_uring_enter", "io_uring: large attack surface; its operations bypass this filter"),
    ("io_uring_register", "io_uring: large attack surface; its operations bypass this filter"),
    # The mount API: the jail's filesystem view is fixed by bwrap.
    ("mount", "change the jail's filesystem view"),
    ("umount2", "uncover what bwrap mounted over"),
    ("pivot_root", "change the root filesystem"),
    ("move_mount", "new mount API: change the filesystem view"),
    ("open_tree", "new mount API: clone a mount"),
    ("fsopen", "new mount API: create a filesystem context"),
    ("fsmount", "new mount API: mount a filesystem context"),
    ("fsconfig", "new mount API: configure a filesystem context"),
    ("fspick", "new mount API: reconfigure a mounted filesystem"),
    ("mount_setattr", "change mount flags (read-only, nosuid, idmap)"),
    # Namespaces: a nested user namespace hands out every capability over fresh namespaces.
    ("unshare", "create namespaces (a nested user namespace regains capabilities)"),
    ("setns", "join other namespaces"),
    ("clone", "only with a CLONE_NEW* flag: creates namespaces like unshare"),
    ("clone3", "always ENOSYS: seccomp cannot read its flags in memory; libc falls back to clone"),
    # Host administration: needs capabilities the jail lacks; deny before the kernel looks.
    ("kexec_load", "replace the running kernel"),
    ("kexec_file_load", "replace the running kernel"),
    ("init_module", "load a kernel module"),
    ("finit_module", "load a kernel module"),
    ("delete_module", "unload a kernel module"),
    ("swapon", "host memory management"),
    ("swapoff", "host memory management"),
    ("reboot", "reboot the host"),
    ("acct", "host process accounting"),
    ("settimeofday", "set the host clock (time is not namespaced)"),
    ("clock_settime", "set the host clock (time is not namespaced)"),
    ("clock_adjtime", "adjust the host clock"),
    ("adjtimex", "adjust the host clock"),
    ("quotactl", "host disk quotas"),
    ("quotactl_fd", "host disk quotas"),
    ("open_by_handle_at", "open a file by handle, past path checks (the 'shocker' escape)"),
    ("name_to_handle_at", "make file handles for open_by_handle_at"),
    ("lookup_dcookie", "kernel profiling: maps cookies to host paths"),
    ("vhangup", "hang up the controlling terminal"),
    ("syslog", "read or clear the kernel log"),
    ("uselib", "obsolete a.out loader, kernel attack surface"),
    ("nfsservctl", "obsolete NFS server control"),
    ("iopl", "raw I/O port access"),
    ("ioperm", "raw I/O port access"),
    # Argument filters (see _CONDITIONS).
    (
        "personality",
        "only 0x0, 0x8, 0x20000, 0x20008 and the 0xffffffff query (Docker's list):"
        " other values turn off ASLR or make data executable",
    ),
    ("ioctl", "only TIOCSTI and TIOCLINUX: type into or control the terminal"),
    ("socket", "every family but AF_UNIX (EAFNOSUPPORT): the broker socket is the only way out"),
    ("socketpair", "every family but AF_UNIX (EAFNOSUPPORT)"),
)


@dataclass(frozen=True, slots=True)
class ArgMatch:
    """One test of one syscall argument, on the full 64-bit register the kernel passes.

    `ne`: arg != value. `masked_eq`: (arg & mask) == value.
    """

    arg: int
    op: Literal["ne", "masked_eq"]
    value: int
    mask: int = 0


@dataclass(frozen=True, slots=True)
class Rule:
    """One resolved deny rule: a call of `syscall` (and `match`, if any) fails with `errno`."""

    syscall: str
    number: int  # on the architecture the rule was resolved for
    errno: int
    match: ArgMatch | None  # None: every call is denied
    reason: str


AF_UNIX = 1
_U32 = 0xFFFFFFFF

# Namespace flags of clone(2), in its first argument on x86_64 and aarch64. CLONE_NEWTIME
# (0x80) is left out: in clone() that bit is part of the exit signal, and the kernel accepts
# CLONE_NEWTIME only from clone3 and unshare, which are denied whole.
_CLONE_NEW_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

_TIOCSTI = 0x5412  # push bytes into the terminal's input queue: commands run by the reader
_TIOCLINUX = 0x541C  # console selection and keyboard tricks on a virtual console

# Docker's default profile allows personality() with exactly these: PER_LINUX (0), PER_LINUX32
# (0x8), UNAME26 (0x20000), both (0x20008) and the query 0xffffffff (reads, sets nothing).
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
_PERSONALITY_FREE_BITS = 0x20008


def _personality_matches() -> tuple[ArgMatch, ...]:
    """Deny personality(v) unless v (as the kernel's unsigned int) is in PERSONALITY_ALLOWED.

    libseccomp ORs rules and allows one test per argument in a rule, so "not one of these five
    values" is written as 32 masked tests on the low 32 bits (the high half is ignored, like the
    kernel ignores it). v must be denied iff it has a bit outside FREE = 0x20008 set and is not
    0xffffffff. Let O be the 30 bits outside FREE:
    - if O holds both a 1 and a 0, then going round O cyclically some 1 is followed by a 0:
      the test "bit o set, next bit of O clear" matches (30 tests);
    - if O is all 1s, v != 0xffffffff means a FREE bit is 0: the test "O all set, that FREE bit
      clear" matches (2 tests);
    - if O is all 0s, v is a subset of FREE: one of the four allowed values, and no test
      matches it (each requires a set bit of O); no test matches 0xffffffff (each requires a 0).
    """
    free = _PERSONALITY_FREE_BITS
    others = [1 << b for b in range(32) if not free & (1 << b)]
    tests = [
        ArgMatch(0, "masked_eq", value=bit, mask=bit | others[(i + 1) % len(others)])
        for i, bit in enumerate(others)
    ]
    all_others = _U32 & ~free
    tests += [
        ArgMatch(0, "masked_eq", value=all_others, mask=all_others | (1 << b))
        for b in range(32)
        if free & (1 << b)
    ]
    return tuple(tests)


# Argument filters: a call of these syscalls is denied only if one of the tests matches.
_CONDITIONS: dict[str, tuple[ArgMatch, ...]] = {
    "personality": _personality_matches(),
    # The request is an unsigned int: compare the low 32 bits only, or setting the (ignored)
    # high half would slip past an exact test (flatpak's TIOCSTI bypass, CVE-2019-10063).
    "ioctl": tuple(ArgMatch(1, "masked_eq", value=r, mask=_U32) for r in (_TIOCSTI, _TIOCLINUX)),
    # Garbage in the high half of the int family is denied too: the safe direction.
    "socket": (ArgMatch(0, "ne", value=AF_UNIX),),
    "socketpair": (ArgMatch(0, "ne", value=AF_UNIX),),
    "clone": tuple(ArgMatch(0, "masked_eq", value=f, mask=f) for f in _CLONE_NEW_FLAGS.values()),
}

# Errnos that do not follow deny_errno: they are what programs must see to carry on.
_FIXED_ERRNO = {
    "socket": errno.EAFNOSUPPORT,  # "address family not supported": as on a kernel without it
    "socketpair": errno.EAFNOSUPPORT,
    # Docker, flatpak and systemd do the same: a clone3 that fails with ENOSYS makes glibc
    # (2.34+, pthread_create, posix_spawn) retry with clone, whose flags the filter checks.
    # Any other errno would make thread creation fail.
    "clone3": errno.ENOSYS,
}

# Architecture names -> libseccomp/audit tokens (AUDIT_ARCH_*). The policy is written for these
# two (clone's flags argument, ioctl request numbers); other hosts fail closed.
_ARCH_TOKENS = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

# Not added to the filter: the compat ABIs of the native arch (i386 and x32 on x86_64, 32-bit
# arm on aarch64). A program switches ABI with `int 0x80` or the x32 bit in the syscall
# number; a filter that does not check the arch could be bypassed that way, since the numbers
# differ per ABI. libseccomp checks the arch first (and, on x86_64, treats numbers with the x32
# bit as another arch) and applies the bad-arch action to anything not native. Adding these
# arches to the filter would do the opposite of what we want: a default-allow filter would then
# allow them. KILL_PROCESS rather than ERRNO(ENOSYS): no program in the jail uses these ABIs
# (there are no 32-bit libraries), so a call is a bypass attempt, and a kill shows in the job's
# result (SIGSYS) instead of handing the attacker an errno to probe with; KILL_PROCESS
# (kernel 4.14+) rather than KILL_THREAD, which leaves the other threads running.
BAD_ARCH_ACTION = "KILL_PROCESS"

_SECCOMP_RET_KILL_PROCESS = 0x80000000
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_GET_ACTION_AVAIL = 2
_PR_GET_SECCOMP = 21
_PR_GET_NO_NEW_PRIVS = 39
_NR_SCMP_ERROR = -1  # libseccomp: the name is unknown on every architecture


def _pyseccomp():  # -> module pyseccomp
    """Import the libseccomp binding late, so that a host without libseccomp gets a reason."""
    try:
        import pyseccomp
    except (ImportError, RuntimeError) as exc:  # pyseccomp raises RuntimeError without the lib
        raise SeccompError(
            f"cannot load libseccomp ({exc}): install libseccomp2 and the pyseccomp package"
        ) from exc
    return pyseccomp


def _libseccomp_version() -> str:
    class _Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    path = ctypes.util.find_library("seccomp")
    if path is None:
        return "unknown"
    fn = ctypes.CDLL(path).seccomp_version
    fn.restype = ctypes.POINTER(_Version)
    v = fn().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def native_arch() -> str:
    """The name of the architecture libseccomp compiles for: 'x86_64' or 'aarch64'."""
    token = _pyseccomp().system_arch()
    for name, value in _ARCH_TOKENS.items():
        if value == token:
            return name
    raise SeccompError(
        f"unsupported architecture (audit token {token:#x}): jailer's seccomp policy is written"
        f" for {' and '.join(_ARCH_TOKENS)}; refusing to run jails without it"
    )


def _check_errno(deny_errno: int) -> None:
    if not isinstance(deny_errno, int) or not 0 < deny_errno < 4096:
        raise ValueError(f"deny_errno must be an errno between 1 and 4095, got {deny_errno!r}")


def rules(deny_errno: int = errno.EPERM, arch: str | None = None) -> tuple[Rule, ...]:
    """Resolve DENIED for `arch` (default: native): one Rule per (syscall, argument test).

    Loads no filter. A syscall that does not exist on `arch` (iopl on aarch64) is skipped; on
    x86_64 every listed syscall must resolve, and a name libseccomp does not know at all (too
    old a libseccomp) is an error on any arch: the filter must never be quietly weaker.
    """
    _check_errno(deny_errno)
    arch = arch or native_arch()
    if arch not in _ARCH_TOKENS:
        raise SeccompError(f"unsupported architecture {arch!r}: use one of {sorted(_ARCH_TOKENS)}")
    sc = _pyseccomp()
    out: list[Rule] = []
    for name, reason in DENIED:
        number = sc.resolve_syscall(_ARCH_TOKENS[arch], name)
        if number == _NR_SCMP_ERROR:
            raise SeccompError(
                f"libseccomp {_libseccomp_version()} does not know syscall {name!r}:"
                " upgrade libseccomp (2.5.4 or later)"
            )
        if number < 0:  # a libseccomp pseudo-number: the syscall exists on other arches only
            if arch == "x86_64":
                raise SeccompError(f"syscall {name!r} is in the policy but not on x86_64")
            continue
        code = _FIXED_ERRNO.get(name, deny_errno)
        matches = _CONDITIONS.get(name, (None,))
        out.extend(Rule(name, number, code, m, reason) for m in matches)
    return tuple(out)


def _build(deny_errno: int):  # -> pyseccomp.SyscallFilter
    sc = _pyseccomp()
    ops = {"ne": sc.NE, "masked_eq": sc.MASKED_EQ}
    try:
        filt = sc.SyscallFilter(sc.ALLOW)  # holds the native arch only: see BAD_ARCH_ACTION
        filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
        for rule in rules(deny_errno):
            args = []
            if rule.match is not None:
                m = rule.match
                if m.op == "masked_eq":  # libseccomp: datum_a is the mask, datum_b the value
                    args.append(sc.Arg(m.arg, ops[m.op], m.mask, m.value))
                else:
                    args.append(sc.Arg(m.arg, ops[m.op], m.value))
            # exactly: syscall numbers are already the native ones; no rewriting by libseccomp
            filt.add_rule_exactly(sc.ERRNO(rule.errno), rule.number, *args)
    except OSError as exc:
        raise SeccompError(f"libseccomp rejected the jail filter: {exc}") from exc
    return filt


def _export(filt, kind: Literal["bpf", "pfc"]) -> bytes:
    fd = os.memfd_create(f"jailer-seccomp-{kind}", os.MFD_CLOEXEC)
    with open(fd, "w+b", buffering=0) as f:
        try:
            getattr(filt, f"export_{kind}")(f)
        except OSError as exc:
            raise SeccompError(f"libseccomp could not export the filter as {kind}: {exc}") from exc
        f.seek(0)
        return f.readall()


@functools.cache
def compile_filter(deny_errno: int = errno.EPERM) -> bytes:
    """The jail filter as a classic-BPF program (struct sock_filter[]) for `bwrap --seccomp`.

    Compiled once per process and errno (a few ms); every jail gets the same bytes.
    """
    _check_errno(deny_errno)
    return _export(_build(deny_errno), "bpf")


def describe_pfc(deny_errno: int = errno.EPERM) -> str:
    """The same filter in libseccomp's human-readable pseudo-filter-code, for debugging.

    PFC does not show libseccomp's x32 guard (numbers with bit 0x40000000 take the bad-arch
    action); the BPF program has it.
    """
    _check_errno(deny_errno)
    return _export(_build(deny_errno), "pfc").decode()


def program_fd(program: bytes) -> int:
    """A fresh sealed memfd holding `program`, at offset 0: the FD of `bwrap --seccomp FD`.

    One per jail (bwrap reads it to the end); close-on-exec, so pass it explicitly (pass_fds)
    and close it once bwrap is started. The caller owns the fd.
    """
    fd = os.memfd_create("jailer-seccomp", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(program)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


# Run in a fresh interpreter by supported(): set no_new_privs, load the program from stdin the
# way bwrap does (prctl PR_SET_SECCOMP), then make a call the filter must deny and that has no
# effect either way (ioctl on fd -1: EBADF from the kernel, ECONNREFUSED from the filter).
_PROBE = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
prog = sys.stdin.buffer.read()
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
buf = ctypes.create_string_buffer(prog, len(prog))
fprog = Fprog(len(prog) // 8, ctypes.addressof(buf))
if libc.prctl(38, 1, 0, 0, 0) != 0:
    print("no_new_privs", ctypes.get_errno()); sys.exit()
if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
    print("load", ctypes.get_errno()); sys.exit()
libc.ioctl(-1, ctypes.c_ulong(0x5412), 0)
print("denied", ctypes.get_errno())
"""
_PROBE_TIMEOUT_S = 10.0  # a fresh python start is ~20 ms; this only bounds a wedged host


def _kernel_check() -> str | None:
    """Why the kernel cannot run the filter, or None. Changes nothing in this process."""
    with open("/proc/self/status") as f:
        fields = {line.split(":", 1)[0] for line in f}
    if "Seccomp" not in fields:
        return "the kernel has no seccomp (CONFIG_SECCOMP): no 'Seccomp:' in /proc/self/status"
    if "NoNewPrivs" not in fields:
        return "the kernel is too old (no 'NoNewPrivs:' in /proc/self/status; need 4.14+)"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0) < 0:
        return f"prctl(PR_GET_SECCOMP) failed: {os.strerror(ctypes.get_errno())}"
    if libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) < 0:
        return f"prctl(PR_GET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}"
    nr = _pyseccomp().resolve_syscall(_ARCH_TOKENS[native_arch()], "seccomp")
    for name, action in (
        ("KILL_PROCESS", _SECCOMP_RET_KILL_PROCESS),
        ("ERRNO", _SECCOMP_RET_ERRNO),
    ):
        value = ctypes.c_uint32(action)
        rc = libc.syscall(nr, _SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(value))
        if rc != 0:
            code = ctypes.get_errno()
            return (
                f"the kernel cannot run seccomp filters with action {name}:"
                f" seccomp(SECCOMP_GET_ACTION_AVAIL) failed with {errno.errorcode.get(code, code)}"
                " (need CONFIG_SECCOMP_FILTER and kernel 4.14+; under another sandbox,"
                " allow the seccomp syscall)"
            )
    return None


def supported() -> tuple[bool, str]:
    """Can this host compile and enforce the jail filter? (ok, reason) for `jailer doctor`.

    Compiles the filter, checks the kernel (seccomp filters, KILL_PROCESS and ERRNO actions,
    no_new_privs), then loads the program for real in a throwaway python process and checks
    that it denies a call. Blocks for a python start-up (~20 ms): call it at start-up or from
    a worker thread, not from the event loop.
    """
    try:
        arch = native_arch()
        program = compile_filter()
        probe = compile_filter(errno.ECONNREFUSED)
        why = _kernel_check()
    except (SeccompError, OSError) as exc:
        return False, str(exc)
    if why is not None:
        return False, why
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _PROBE],
            input=probe,
            capture_output=True,
            timeout=_PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"could not run the seccomp probe process: {exc}"
    out = done.stdout.decode(errors="replace")
    if out.split() != ["denied", str(errno.ECONNREFUSED)]:
        detail = out.strip() or done.stderr.decode(errors="replace")
        return False, (
            f"the seccomp filter did not load or was not enforced in a probe process"
            f" (exit {done.returncode}): {detail.strip()[-300:]}"
        )
    return True, (
        f"libseccomp {_libseccomp_version()}, {arch}: {len(rules())} rules,"
        f" {len(program) // 8} BPF instructions, non-native ABIs -> {BAD_ARCH_ACTION};"
        " loaded and enforced in a probe process"
    )
