"""jailer.seccomp: the policy as data, the compiled program, and real denials.

Three layers of evidence:
- pure: the resolved rules and the PFC text;
- the exact BPF bytes handed to bwrap, run through a small classic-BPF interpreter (every rule,
  every architecture, property tests over argument values), with no kernel involved;
- the kernel: a forked child sets no_new_privs, loads the program and makes real calls. As in
  bubblewrap's tests/test-seccomp.py, the program is compiled with an errno no kernel path
  returns for those calls (ECONNREFUSED), so a denial cannot be mistaken for another failure.
  Every call made there is harmless even if the filter failed to deny it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jailer import seccomp
from jailer.seccomp import DENIED, compile_filter, describe_pfc, program_fd, rules, supported

# The syscalls the design requires denied (DESIGN.md section 5 and the seccomp brief).
MUST_DENY = (
    "ptrace process_vm_readv process_vm_writev keyctl add_key request_key bpf perf_event_open"
    " userfaultfd io_uring_setup io_uring_enter io_uring_register mount umount2 pivot_root"
    " move_mount open_tree fsopen fsmount fsconfig fspick mount_setattr unshare setns kexec_load"
    " kexec_file_load init_module finit_module delete_module swapon swapoff reboot acct"
    " settimeofday clock_settime clock_adjtime adjtimex open_by_handle_at name_to_handle_at"
    " quotactl lookup_dcookie vhangup syslog uselib nfsservctl iopl ioperm pidfd_getfd"
    " personality ioctl socket socketpair clone clone3"
).split()

X86_64 = platform.machine() == "x86_64"
needs_x86_64 = pytest.mark.skipif(not X86_64, reason="x86_64 syscall numbers and ABIs")

AUDIT_ARCH = {"x86_64": 0xC000003E, "i386": 0x40000003, "aarch64": 0xC00000B7}
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
X32_SYSCALL_BIT = 0x40000000


def RET_ERRNO(code: int) -> int:  # noqa: N802 (the kernel's name)
    return 0x00050000 | code


def nr(name: str) -> int:
    """The native number of a syscall (the tests resolve names the way the module does)."""
    import pyseccomp

    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    assert number >= 0, name
    return number


# --- a classic-BPF interpreter for seccomp programs (the opcodes libseccomp emits) ----------


def run_bpf(program: bytes, syscall: int, arch: int | None = None, args=(0,) * 6) -> int:
    """What the kernel would return for this seccomp_data: SECCOMP_RET_* | data."""
    arch = AUDIT_ARCH[platform.machine()] if arch is None else arch
    args = tuple(args) + (0,) * (6 - len(args))
    data = struct.pack("=iIQ6Q", syscall, arch, 0, *(a & (2**64 - 1) for a in args))
    insns = [struct.unpack_from("=HBBI", program, o) for o in range(0, len(program), 8)]
    acc, pc = 0, 0
    for _ in range(len(insns) + 1):  # classic BPF only jumps forward
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            (acc,) = struct.unpack_from("=I", data, k)
        elif code == 0x54:  # BPF_ALU | BPF_AND | BPF_K
            acc &= k
        elif code == 0x05:  # BPF_JMP | BPF_JA
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45):  # BPF_JMP | JEQ/JGT/JGE/JSET | BPF_K
            taken = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"opcode {code:#x} at {pc - 1} not handled by this interpreter")
    raise AssertionError("program did not return")


# --- loading the program in a forked child ----------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _load(program: bytes) -> None:
    """Install `program` in this process the way bwrap does: no_new_privs, PR_SET_SECCOMP."""
    import prctl

    prctl.set_no_new_privs(1)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    if _libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def call(name_or_nr: str | int, *args: int) -> int:
    """A raw syscall: 0 or its (non-negative) result on success, -errno on failure."""
    number = nr(name_or_nr) if isinstance(name_or_nr, str) else name_or_nr
    ctypes.set_errno(0)
    rc = _libc.syscall(ctypes.c_long(number), *(ctypes.c_ulong(a & (2**64 - 1)) for a in args))
    return -ctypes.get_errno() if rc == -1 else rc


def in_filtered_child(program: bytes | None, fn) -> tuple[object, int]:
    """Fork; in the child load `program` (None: no filter) and run fn(). (fn's result, status).

    The result travels back as JSON over a pipe; the result is None if the child died.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(rfd)
            if program is not None:
                _load(program)
            out = json.dumps(fn()).encode()
            os.write(wfd, out)
        except BaseException as exc:  # report anything to the parent
            os.write(wfd, json.dumps({"child_error": repr(exc)}).encode())
            code = 3
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        raw = r.read()
    _, status = os.waitpid(pid, 0)
    result = json.loads(raw) if raw else None
    assert not (isinstance(result, dict) and "child_error" in result), result
    return result, status


# --- the policy as data -------------------------------------------------------------------------


def test_denied_is_a_tuple_of_named_reasons():
    assert isinstance(DENIED, tuple)
    names = [name for name, _ in DENIED]
    assert len(names) == len(set(names)), "a syscall is listed twice"
    for name, reason in DENIED:
        assert isinstance(name, str) and name.isidentifier()
        assert isinstance(reason, str) and reason.strip()
    assert set(MUST_DENY) <= set(names), set(MUST_DENY) - set(names)


@needs_x86_64
def test_every_listed_syscall_resolves_on_x86_64():
    resolved = rules(arch="x86_64")
    assert {r.syscall for r in resolved} == {name for name, _ in DENIED}
    assert all(r.number >= 0 for r in resolved)
    by_name = {r.syscall: r.number for r in resolved}
    assert by_name["ptrace"] == 101 and by_name["clone3"] == 435 and by_name["iopl"] == 172


def test_aarch64_skips_syscalls_it_does_not_have():
    resolved = rules(arch="aarch64")
    names = {r.syscall for r in resolved}
    assert {"iopl", "ioperm"}.isdisjoint(names)  # x86 port I/O: no such thing on arm64
    assert set(MUST_DENY) - {"iopl", "ioperm", "uselib"} <= names
    assert {r.syscall: r.number for r in resolved}["ptrace"] == 117  # arm64's own numbering


def test_an_unknown_name_fails_loudly(monkeypatch):
    monkeypatch.setattr(seccomp, "DENIED", (*DENIED, ("no_such_syscall", "typo")))
    with pytest.raises(seccomp.SeccompError, match="does not know syscall 'no_such_syscall'"):
        rules(arch="aarch64")


def test_a_name_missing_on_x86_64_fails_there_and_is_skipped_elsewhere(monkeypatch):
    # vm86 exists on i386 only: fatal on x86_64 (a hole in the policy), skipped on aarch64.
    monkeypatch.setattr(seccomp, "DENIED", (*DENIED, ("vm86", "i386 only")))
    with pytest.raises(seccomp.SeccompError, match="in the policy but not on x86_64"):
        rules(arch="x86_64")
    assert "vm86" not in {r.syscall for r in rules(arch="aarch64")}


def test_unsupported_arch_and_bad_errno_are_rejected():
    with pytest.raises(seccomp.SeccompError, match="unsupported architecture"):
        rules(arch="s390x")
    for bad in (0, -1, 4096):
        with pytest.raises(ValueError):
            rules(deny_errno=bad)
        with pytest.raises(ValueError):
            compile_filter(bad)


def test_errnos_per_rule():
    resolved = rules(deny_errno=errno.ECONNREFUSED)
    codes = {}
    for r in resolved:
        codes.setdefault(r.syscall, set()).add(r.errno)
    assert codes.pop("socket") == {errno.EAFNOSUPPORT}
    assert codes.pop("socketpair") == {errno.EAFNOSUPPORT}
    assert codes.pop("clone3") == {errno.ENOSYS}
    assert set().union(*codes.values()) == {errno.ECONNREFUSED}
    assert {r.errno for r in rules() if r.syscall == "ptrace"} == {errno.EPERM}


def test_argument_filters():
    resolved = rules()
    by_name: dict[str, list] = {}
    for r in resolved:
        by_name.setdefault(r.syscall, []).append(r.match)
    assert by_name["ptrace"] == [None]
    assert len(by_name["personality"]) == 32
    assert len(by_name["clone"]) == 7
    assert {(m.arg, m.op, m.value, m.mask) for m in by_name["ioctl"]} == {
        (1, "masked_eq", 0x5412, 0xFFFFFFFF),
        (1, "masked_eq", 0x541C, 0xFFFFFFFF),
    }
    assert [(m.arg, m.op, m.value) for m in by_name["socket"]] == [(0, "ne", socket.AF_UNIX)]


def test_docs_list_every_denied_syscall():
    doc = (Path(__file__).parents[2] / "docs" / "seccomp.md").read_text()
    missing = [name for name, _ in DENIED if f"`{name}`" not in doc]
    assert not missing, f"docs/seccomp.md does not mention {missing}"


# --- the compiled program -------------------------------------------------------------------------


def test_compile_is_cached_per_errno():
    assert compile_filter() is compile_filter()
    assert compile_filter(errno.ECONNREFUSED) is not compile_filter()
    program = compile_filter()
    assert len(program) % 8 == 0 and 0 < len(program) // 8 < 4096  # BPF_MAXINSNS


@needs_x86_64
def test_pfc_lists_every_must_deny_syscall_and_only_the_native_arch():
    pfc = describe_pfc(errno.ECONNREFUSED)
    for name in MUST_DENY:
        assert f'# filter for syscall "{name}"' in pfc, name
    assert pfc.count("# filter for arch") == 1
    assert "# filter for arch x86_64 " in pfc
    # i386 and x32 are not in the filter: they take the bad-arch action (see BAD_ARCH_ACTION).
    assert "# invalid architecture action\naction KILL_PROCESS;" in pfc
    assert "# default action\n  action ALLOW;" in pfc
    assert "action ERRNO(111);" in pfc  # ECONNREFUSED
    assert "action ERRNO(97);" in pfc  # EAFNOSUPPORT
    assert "action ERRNO(38);" in pfc  # ENOSYS, clone3
    assert "action ERRNO(1);" not in pfc
    assert "action ERRNO(1);" in describe_pfc()


def test_bpf_denies_every_rule():
    program = compile_filter(errno.ECONNREFUSED)
    for rule in rules(errno.ECONNREFUSED):
        if rule.match is None:
            assert run_bpf(program, rule.number) == RET_ERRNO(rule.errno), rule.syscall
    for name in ("read", "write", "getpid", "openat", "mmap", "futex", "execve", "wait4"):
        assert run_bpf(program, nr(name)) == RET_ALLOW, name


@needs_x86_64
def test_bpf_kills_non_native_abis():
    program = compile_filter()
    # i386 (int 0x80): any syscall, e.g. its getpid (20) or ptrace (26).
    for number in (20, 26, 0):
        assert run_bpf(program, number, arch=AUDIT_ARCH["i386"]) == RET_KILL_PROCESS
    # x32: the x86_64 arch token with bit 30 set in the number.
    for number in (39, 101, 512 + 9):
        assert run_bpf(program, X32_SYSCALL_BIT | number) == RET_KILL_PROCESS
    assert run_bpf(program, nr("getpid"), arch=AUDIT_ARCH["aarch64"]) == RET_KILL_PROCESS
    # -1 is not x32: tracers use it to skip a call; the kernel answers ENOSYS.
    assert run_bpf(program, -1) == RET_ALLOW


PERSONALITY = nr("personality")
ALLOWED_PERSONAS = {0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF}


def _persona_verdict(value: int) -> int:
    return run_bpf(compile_filter(), PERSONALITY, args=(value,))


def test_personality_allows_dockers_values_only():
    for value in ALLOWED_PERSONAS:
        assert _persona_verdict(value) == RET_ALLOW, hex(value)
        assert _persona_verdict(value | 0xDEAD << 32) == RET_ALLOW  # high half: ignored
    risky = (0x0040000, 0x0400000, 0x0100000, 0x0200000, 0x0800000, 0x8000000)  # ASLR, NX, ...
    edge = [1 << b for b in range(32)] + [0xFFFFFFFF ^ (1 << b) for b in range(32)]
    for value in (*risky, *edge, 0x20009, 0xFFFDFFF7):
        expected = RET_ALLOW if value in ALLOWED_PERSONAS else RET_ERRNO(errno.EPERM)
        assert _persona_verdict(value) == expected, hex(value)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_personality_denied_iff_low_half_not_allowed(value):
    denied = (value & 0xFFFFFFFF) not in ALLOWED_PERSONAS
    assert _persona_verdict(value) == (RET_ERRNO(errno.EPERM) if denied else RET_ALLOW)


CLONE_NEW_MASK = 0x7E020000


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_clone_denied_iff_a_namespace_flag_is_set(flags):
    verdict = run_bpf(compile_filter(), nr("clone"), args=(flags,))
    expected = RET_ERRNO(errno.EPERM) if flags & CLONE_NEW_MASK else RET_ALLOW
    assert verdict == expected


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=0, max_value=2**32 - 1))
def test_ioctl_denied_iff_low_half_is_tiocsti_or_tioclinux(high, low):
    request = high << 32 | low
    verdict = run_bpf(compile_filter(), nr("ioctl"), args=(0, request))
    expected = RET_ERRNO(errno.EPERM) if low in (0x5412, 0x541C) else RET_ALLOW
    assert verdict == expected
    for tty_request in (0x5412, 0x541C):  # with any high half (CVE-2019-10063)
        request = high << 32 | tty_request
        assert run_bpf(compile_filter(), nr("ioctl"), args=(0, request)) != RET_ALLOW


def test_socket_families():
    program = compile_filter()
    for name in ("socket", "socketpair"):
        assert run_bpf(program, nr(name), args=(socket.AF_UNIX, socket.SOCK_STREAM)) == RET_ALLOW
        for family in (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, 17, 0, 2**32 | 1):
            verdict = run_bpf(program, nr(name), args=(family, socket.SOCK_STREAM))
            assert verdict == RET_ERRNO(errno.EAFNOSUPPORT), (name, family)


def test_program_fd_is_a_sealed_copy():
    program = compile_filter()
    fd = program_fd(program)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"\0" * 8, 0)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        assert data == program
    finally:
        os.close(fd)


# --- the kernel enforces it -----------------------------------------------------------------------

CLONE_NEWUSER = 0x10000000
CLONE_FS = 0x00000200
SIGCHLD = 17


def _denials() -> dict[str, int]:
    """Calls the filter must deny; each is harmless if it is not denied (see the comments)."""
    r, w = os.pipe()
    out = {
        "ptrace": call("ptrace", 0),  # PTRACE_TRACEME: would only make this child traceable
        "keyctl": call("keyctl", 0, 2**64 - 3, 0),  # KEYCTL_GET_KEYRING_ID(session): a read
        "add_key": call("add_key", 0, 0, 0, 0, 0),  # NULL type: EFAULT from the kernel
        "unshare": call("unshare", CLONE_NEWUSER),  # would affect only this child
        # CLONE_NEWUSER|CLONE_FS is EINVAL in the kernel: no process could be created
        "clone": call("clone", CLONE_NEWUSER | CLONE_FS | SIGCHLD, 0, 0, 0, 0),
        "setns": call("setns", 2**64 - 1, 0),  # fd -1: EBADF
        "mount": call("mount", 0, 0, 0, 0, 0),  # NULL target: EFAULT
        "bpf": call("bpf", 2**64 - 1, 0, 0),  # bad command: EINVAL
        "perf_event_open": call("perf_event_open", 0, 0, 2**64 - 1, 2**64 - 1, 0),  # EFAULT
        "userfaultfd": call("userfaultfd", 2**31),  # unknown flag: EINVAL
        "io_uring_setup": call("io_uring_setup", 0, 0),  # 0 entries: EINVAL
        "pidfd_getfd": call("pidfd_getfd", 2**64 - 1, 2**64 - 1, 0),  # EBADF
        "process_vm_readv": call("process_vm_readv", 0, 0, 0, 0, 0, 0),  # nothing to read
        "open_by_handle_at": call("open_by_handle_at", 2**64 - 1, 0, 0),  # EBADF/EFAULT
        "personality_no_aslr": call("personality", 0x0040000),  # would only affect this child
        "personality_exec_data": call("personality", 0x0400000),
        "personality_high_bits": call("personality", 1 << 32 | 0x0040000),
        "ioctl_tiocsti": call("ioctl", r, 0x5412, 0),  # a pipe is no tty: ENOTTY
        "ioctl_tiocsti_high_bits": call("ioctl", r, 1 << 32 | 0x5412, 0),
        "ioctl_tioclinux": call("ioctl", r, 0x541C, 0),
        "syslog": call("syslog", 10, 0, 0),  # SYSLOG_ACTION_SIZE_BUFFER: a read
    }
    os.close(r)
    os.close(w)
    return out


@pytest.mark.parametrize("deny_errno", [errno.ECONNREFUSED, errno.EPERM])
def test_kernel_denies_with_the_chosen_errno(deny_errno):
    results, status = in_filtered_child(compile_filter(deny_errno), _denials)
    assert os.waitstatus_to_exitcode(status) == 0
    assert results == {name: -deny_errno for name in results}


def test_without_the_filter_the_same_calls_fail_differently():
    """The control: no kernel path answers these calls with ECONNREFUSED."""
    results, status = in_filtered_child(None, _denials)
    assert os.waitstatus_to_exitcode(status) == 0
    assert -errno.ECONNREFUSED not in results.values()


def _allowed_and_special() -> dict[str, object]:
    out: dict[str, object] = {}
    # socket families: AF_UNIX works, the rest look unsupported
    for family in ("AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"):
        out[f"socket_{family}"] = call("socket", getattr(socket, family), socket.SOCK_DGRAM, 0)
    out["socketpair_AF_INET"] = call("socketpair", socket.AF_INET, socket.SOCK_STREAM, 0, 0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        out["socket_AF_UNIX"] = s.fileno() >= 0
    a, b = socket.socketpair(socket.AF_UNIX)
    a.sendall(b"x")
    out["socketpair_AF_UNIX"] = b.recv(1) == b"x"
    a.close()
    b.close()
    # clone3 says "not implemented" (the kernel itself would say EINVAL for size 0) ...
    out["clone3"] = call("clone3", 0, 0)
    # ... so glibc falls back to clone for threads and fork keeps working
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(os.getpid()))
    t.start()
    t.join()
    out["thread"] = box == [os.getpid()]
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out["getpid"] = call("getpid") == os.getpid()
    out["personality_query"] = call("personality", 0xFFFFFFFF)
    out["personality_linux"] = call("personality", 0)
    r, w = os.pipe()
    os.write(w, b"abc")
    n = ctypes.c_int()
    out["ioctl_fionread"] = (call("ioctl", r, 0x541B, ctypes.addressof(n)), n.value)
    return out


def test_kernel_allows_the_rest():
    results, status = in_filtered_child(compile_filter(errno.ECONNREFUSED), _allowed_and_special)
    assert os.waitstatus_to_exitcode(status) == 0
    for family in ("AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"):
        assert results.pop(f"socket_{family}") == -errno.EAFNOSUPPORT, family
    assert results.pop("socketpair_AF_INET") == -errno.EAFNOSUPPORT
    assert results.pop("clone3") == -errno.ENOSYS
    assert results.pop("fork") == 7
    assert results.pop("ioctl_fionread") == [0, 3]
    assert results.pop("personality_query") >= 0
    assert results.pop("personality_linux") >= 0
    assert results == {
        "socket_AF_UNIX": True,
        "socketpair_AF_UNIX": True,
        "thread": True,
        "getpid": True,
    }


def _x32_getpid() -> list[int]:
    return [call(X32_SYSCALL_BIT | 39), os.getpid()]  # x32's getpid is x86_64's 39 | bit 30


@needs_x86_64
def test_kernel_kills_an_x32_syscall():
    # control: without the filter the child lives (ENOSYS on kernels built without x32)
    result, status = in_filtered_child(None, _x32_getpid)
    assert os.WIFEXITED(status) and result[0] in (-errno.ENOSYS, result[1])
    result, status = in_filtered_child(compile_filter(), _x32_getpid)
    assert result is None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def _int80_getpid() -> int:
    """getpid through the i386 ABI (int 0x80) from 64-bit code: the classic filter bypass."""
    code = bytes.fromhex("b814000000cd80c3")  # mov eax, 20 (getpid); int 0x80; ret
    m = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(code)
    fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
    return fn()


@needs_x86_64
def test_kernel_kills_an_i386_syscall():
    result, status = in_filtered_child(None, _int80_getpid)
    if not (os.WIFEXITED(status) and isinstance(result, int) and result > 0):
        pytest.skip("this kernel has no i386 emulation (int 0x80 fails without the filter)")
    result, status = in_filtered_child(compile_filter(), _int80_getpid)
    assert result is None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_supported_on_this_host():
    ok, reason = supported()
    assert ok, reason
    assert "KILL_PROCESS" in reason and "enforced" in reason


def test_supported_says_why_not(monkeypatch):
    def no_lib():
        raise seccomp.SeccompError("cannot load libseccomp (test)")

    monkeypatch.setattr(seccomp, "_pyseccomp", no_lib)
    assert supported() == (False, "cannot load libseccomp (test)")
    monkeypatch.undo()
    monkeypatch.setattr(seccomp, "_kernel_check", lambda: "no seccomp here (test)")
    assert supported() == (False, "no seccomp here (test)")


# --- bwrap --seccomp FD -------------------------------------------------------------------------

_IN_JAIL = r"""
import ctypes, json, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
    return -ctypes.get_errno() if rc == -1 else rc
nrs = json.loads(sys.argv[1])
t = threading.Thread(target=lambda: None); t.start(); t.join()
print(json.dumps({
    "unshare": call(nrs["unshare"], 0x10000000),
    "ptrace": call(nrs["ptrace"], 0),
    "socket_inet": call(nrs["socket"], 2, 1, 0),
    "clone3": call(nrs["clone3"], 0, 0),
    "thread": True,
}))
"""


@pytest.mark.root
@pytest.mark.parametrize("deny_errno", [errno.ECONNREFUSED, errno.EPERM])
def test_bwrap_enforces_the_program(deny_errno):
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("bubblewrap (bwrap) is not installed")
    numbers = {name: nr(name) for name in ("unshare", "ptrace", "socket", "clone3")}
    fd = program_fd(compile_filter(deny_errno))
    try:
        argv = [
            bwrap,
            "--ro-bind",
            "/",
            "/",
            "--unshare-user",
            "--seccomp",
            str(fd),
            sys.executable,
            "-I",
            "-S",
            "-c",
            _IN_JAIL,
            json.dumps(numbers),
        ]
        done = subprocess.run(argv, pass_fds=(fd,), capture_output=True, timeout=60)
    finally:
        os.close(fd)
    if done.returncode != 0 and done.stderr.startswith(b"bwrap:") and os.geteuid() != 0:
        pytest.skip(f"bwrap cannot create a jail as this user: {done.stderr.decode().strip()}")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == {
        "unshare": -deny_errno,
        "ptrace": -deny_errno,
        "socket_inet": -errno.EAFNOSUPPORT,
        "clone3": -errno.ENOSYS,
        "thread": True,
    }
