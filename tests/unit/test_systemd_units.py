"""systemd/: the unit files, sysusers.d and tmpfiles.d entries, and supervisor/systemd.py for real.

- The units are checked with `systemd-analyze verify` when it is installed (Debian's `systemd`
  package ships it; it needs no running systemd). verify refuses a unit whose ExecStart binary
  does not exist, and /usr/local/bin/jailer is only there once jailer is installed, so the test
  verifies copies of the units whose ExecStart points at a stub executable in the temp dir. verify
  reports unknown directives and bad values as warnings with exit code 0, so any output naming
  our units fails the test (and a planted typo proves the check has teeth).
- sysusers.d and tmpfiles.d entries are applied to an empty --root in the temp dir (needs root:
  they chown to root).
- notify() talks to a real AF_UNIX datagram socket; listen_fds() gets a real listening socket on
  fd 3 in a child process, set up the way systemd does it (LISTEN_PID is the child's own pid).
- The last test (marked root, like tests/root/) runs `jailer serve` the way jailer.service does:
  socket on fd 3, NOTIFY_SOCKET, then SIGHUP and SIGTERM, and checks READY=1, RELOADING=1 +
  MONOTONIC_USEC and STOPPING=1 arrive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from supervisor import systemd
from supervisor.config import SCHEMA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS = os.path.join(ROOT, "systemd")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian: package systemd); the units are then only "
           "checked by the parsing tests in this file")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the entries chown to root")
needs_sysusers = pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                                    reason="systemd-sysusers is not installed (Debian: package systemd)")
needs_tmpfiles = pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None,
                                    reason="systemd-tmpfiles is not installed (Debian: package systemd)")


def read(name: str) -> str:
    with open(os.path.join(UNITS, name)) as f:
        return f.read()


def directives(text: str) -> dict[str, list[tuple[str, str, bool]]]:
    """section -> [(key, value, commented_out)], in file order. '#Key=value' lines count as
    directives left out on purpose; other comments are ignored."""
    out: dict[str, list[tuple[str, str, bool]]] = {}
    section = None
    for line in text.splitlines():
        m = re.match(r"^\[(\w+)\]$", line)
        if m:
            section = m.group(1)
            out[section] = []
            continue
        m = re.match(r"^(#?)([A-Z][A-Za-z0-9]+)=(.*)$", line)
        if m and section:
            out[section].append((m.group(2), m.group(3), bool(m.group(1))))
    return out


def values(text: str, section: str) -> dict[str, str]:
    return {k: v for k, v, commented in directives(text)[section] if not commented}


# ---- the unit files, parsed ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jailer.service", "jailer.socket"])
def test_directives_are_sorted_within_each_section(name):
    for section, entries in directives(read(name)).items():
        keys = [k for k, _, _ in entries]
        assert keys == sorted(keys), f"{name} [{section}] not sorted: {keys}"


def test_every_hardening_option_left_out_says_why():
    """A '#Option=' line in [Service] is a choice, explained by the comment block just above it."""
    lines = read("jailer.service").splitlines()
    left_out = [i for i, line in enumerate(lines) if re.match(r"^#[A-Z][A-Za-z]+=", line)]
    assert len(left_out) >= 10
    for i in left_out:
        block = []
        j = i - 1
        while j >= 0 and lines[j].startswith("#") and not re.match(r"^#[A-Z][A-Za-z]+=", lines[j]):
            block.insert(0, lines[j])
            j -= 1
        text = " ".join(block)
        assert re.search(r"Left (out|at)", text), f"{lines[i]} has no 'Left out: ... why' comment above it"


def test_service_essentials():
    svc = values(read("jailer.service"), "Service")
    assert svc["Type"] == "notify"
    assert svc["KillMode"] == "mixed"
    assert svc["Delegate"] == "yes"
    assert svc["Restart"] == "on-failure"
    assert svc["ExecReload"].endswith("-HUP $MAINPID")
    assert svc["ExecStart"] == "/usr/local/bin/jailer serve --config /etc/jailer/config.toml"
    assert svc["RuntimeDirectory"] == svc["StateDirectory"] == svc["ConfigurationDirectory"] == "jailer"
    assert svc["RuntimeDirectoryPreserve"] == "yes"  # the socket unit's socket lives in /run/jailer
    assert svc["OOMPolicy"] == "continue"  # a tenant's OOM kill must not stop the daemon
    assert "UMask" not in svc  # the broker dirs rely on 0022
    # Options that break bwrap or the cgroups must never be switched on.
    for breaking in ("ProtectKernelTunables", "ProtectControlGroups", "ProtectHostname", "RestrictNamespaces",
                     "SystemCallFilter", "MemoryDenyWriteExecute", "PrivateUsers", "ProcSubset", "User"):
        assert breaking not in svc, breaking


def test_stop_timeout_covers_the_drain():
    """TimeoutStopSec must exceed shutdown.drain + 10 s (kill the rest) + 2 s (flush replies)."""
    timeout = values(read("jailer.service"), "Service")["TimeoutStopSec"]
    assert timeout.endswith("s")
    assert float(timeout[:-1]) > SCHEMA["shutdown"]["drain"].default + 12


def test_socket_unit():
    sock = values(read("jailer.socket"), "Socket")
    assert sock["ListenStream"] == "/run/jailer/jailer.sock"
    assert sock["SocketMode"] == "0660"
    assert sock["SocketGroup"] == "jailer-clients"
    assert sock["DirectoryMode"] == "0711"
    unit = values(read("jailer.service"), "Unit")
    assert unit["Requires"] == unit["After"] == "jailer.socket"


# ---- systemd-analyze verify ---------------------------------------------------------------------


def verify(tmp_path, edit=lambda text: text) -> tuple[int, list[str]]:
    """Copies of both units with ExecStart on a stub; returns verify's exit code and every output
    line that names one of them (warnings come with exit code 0)."""
    stub = tmp_path / "jailer-stub"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for name in ("jailer.service", "jailer.socket"):
        text = read(name).replace("ExecStart=/usr/local/bin/jailer ", f"ExecStart={stub} ")
        if not os.access("/bin/kill", os.X_OK):
            text = text.replace("ExecReload=/bin/kill ", f"ExecReload={stub} ")
        (tmp_path / name).write_text(edit(text) if name == "jailer.service" else text)
    assert f"ExecStart={stub} serve" in (tmp_path / "jailer.service").read_text()
    p = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(tmp_path / "jailer.socket"),
                        str(tmp_path / "jailer.service")], capture_output=True, text=True, timeout=60)
    ours = [line for line in (p.stdout + p.stderr).splitlines()
            if str(tmp_path) in line or "jailer.s" in line]
    return p.returncode, ours


@needs_analyze
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    rc, complaints = verify(tmp_path)
    assert (rc, complaints) == (0, [])


@needs_analyze
@pytest.mark.parametrize("typo", ["KillMode=mixd", "ProtectSystm=strict"])
def test_systemd_analyze_verify_catches_a_typo(tmp_path, typo):
    key = typo.split("=")[0]
    good = {"KillMode": "KillMode=mixed", "ProtectSystm": "ProtectSystem=strict"}[key]
    _, complaints = verify(tmp_path, lambda text: text.replace(good + "\n", typo + "\n"))
    assert complaints, f"verify said nothing about {typo}"


# ---- sysusers.d and tmpfiles.d, applied to an empty root ----------------------------------------


@needs_sysusers
@needs_root
def test_sysusers_creates_the_client_group(tmp_path):
    (tmp_path / "etc").mkdir()
    p = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", os.path.join(UNITS, "jailer.sysusers")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    groups = [line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()]
    assert groups == ["jailer-clients"]  # and no accounts: jail uids are not users
    assert not (tmp_path / "etc" / "passwd").exists() or "jailer" not in (tmp_path / "etc" / "passwd").read_text()


@needs_tmpfiles
@needs_root
def test_tmpfiles_creates_the_directories_with_their_modes(tmp_path):
    p = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", os.path.join(UNITS, "jailer.tmpfiles")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for path, mode in (("run/jailer", 0o711), ("var/lib/jailer", 0o700), ("etc/jailer/profiles", 0o755)):
        st = os.stat(tmp_path / path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, 0), path


# ---- supervisor/systemd.py: notify ---------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's notify socket; NOTIFY_SOCKET points at it."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield s


def test_notify_sends_the_state_as_one_datagram(notify_socket):
    assert systemd.notify("READY=1\nSTATUS=accepting jobs") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=accepting jobs"
    assert systemd.notify("STOPPING=1") is True
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_notify_abstract_namespace(monkeypatch):
    name = f"jailer-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1") is True
        assert s.recv(4096) == b"READY=1"


def test_notify_without_systemd_is_a_no_op(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert systemd.notify("READY=1") is False  # never raises: the daemon runs on regardless


# ---- supervisor/systemd.py: listen_fds, in a child that gets a socket on fd 3 --------------------

CHILD = textwrap.dedent("""
    import json, os, socket, sys
    from supervisor.systemd import listen_fds
    socks = listen_fds()
    out = {"n": len(socks), "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_"))}
    if socks:
        s = socks[0]
        out.update(fd=s.fileno(), family=s.family.name, type=s.type.name, inheritable=os.get_inheritable(s.fileno()))
        conn, _ = s.accept()
        conn.sendall(b"pong:" + conn.recv(100))
        conn.close()
    print(json.dumps(out), flush=True)
""")

# What systemd does between fork and exec: the socket to fd 3, LISTEN_PID = the child's own pid.
LAUNCHER = textwrap.dedent("""
    import os, sys
    fd, listen_pid, child = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.dup2(fd, 3)  # dup2 leaves fd 3 inheritable
    os.environ["LISTEN_PID"] = str(os.getpid()) if listen_pid == "self" else listen_pid
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_FDNAMES"] = "jailer.socket"
    os.execv(sys.executable, [sys.executable, "-c", child])
""")


def run_activated(tmp_path, listen_pid="self", client=True):
    path = str(tmp_path / "api.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    env = {**os.environ, "PYTHONPATH": ROOT}
    try:
        p = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(listener.fileno()), listen_pid, CHILD],
                             pass_fds=(listener.fileno(),), env=env, stdout=subprocess.PIPE, text=True)
        reply = None
        if client:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(10)
                c.connect(path)  # queued in the backlog until the child accepts
                c.sendall(b"ping")
                reply = c.recv(100)
        out, _ = p.communicate(timeout=30)
    finally:
        listener.close()
    assert p.returncode == 0
    return json.loads(out), reply


def test_listen_fds_takes_the_socket_on_fd_3(tmp_path):
    out, reply = run_activated(tmp_path)
    assert out == {"n": 1, "env_left": [], "fd": 3, "family": "AF_UNIX", "type": "SOCK_STREAM",
                   "inheritable": False}  # LISTEN_* removed, fd 3 not passed on to what the daemon spawns
    assert reply == b"pong:ping"


def test_listen_fds_ignores_sockets_meant_for_another_process(tmp_path):
    out, _ = run_activated(tmp_path, listen_pid="1", client=False)
    assert out == {"n": 0, "env_left": ["LISTEN_FDNAMES", "LISTEN_FDS", "LISTEN_PID"]}


def test_listen_fds_without_systemd(monkeypatch):
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(k, raising=False)
    assert systemd.listen_fds() == []


# ---- `jailer serve` as jailer.service runs it (root) ---------------------------------------------

SERVE_LAUNCHER = textwrap.dedent("""
    import os, sys
    fd = int(sys.argv[1])
    os.dup2(fd, 3)
    os.close(fd)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="jailer.socket")
    os.execv(sys.executable, [sys.executable, "-m", "jailer.cli", "serve", "--config", sys.argv[2]])
""")


def wait_for_state(sock: socket.socket, prefix: str, log_path: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            break
        if msg.startswith(prefix):
            return msg
    with open(log_path) as f:
        raise AssertionError(f"no {prefix!r} from the daemon; its log:\n{f.read()}")


@pytest.mark.root
def test_serve_speaks_the_notify_protocol_on_an_activated_socket(tmp_path):
    from ..conftest import processes_with_uid_in

    tag = f"jailer-test-{os.getpid()}-sd"
    run_dir = f"/run/{tag}"
    uid_base, uid_count = 900000 + (os.getpid() % 1000) * 16, 16
    (tmp_path / "profiles").mkdir()
    cfg = tmp_path / "config.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        socket_mode = "0666"   # must be ignored: systemd's socket keeps its own mode
        [paths]
        profiles = "{tmp_path / 'profiles'}"
        state_dir = "{tmp_path / 'state'}"
        run_dir = "{run_dir}"
        [jails]
        uid_base = {uid_base}
        uid_count = {uid_count}
        cgroup_parent = "{tag}"
        [log]
        format = "json"
        [shutdown]
        drain = "2s"
    """))
    api_path, notify_path = str(tmp_path / "api.sock"), str(tmp_path / "notify.sock")
    log_path = str(tmp_path / "serve.log")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(api_path)
    os.chmod(api_path, 0o600)
    listener.listen(16)
    inode = os.stat(api_path).st_ino
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "PYTHONPATH": ROOT}
    p = None
    try:
        with open(log_path, "ab") as log:
            p = subprocess.Popen([sys.executable, "-c", SERVE_LAUNCHER, str(listener.fileno()), str(cfg)],
                                 pass_fds=(listener.fileno(),), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        listener.close()  # the daemon holds it now, as systemd would
        assert wait_for_state(notify, "READY=1", log_path) == "READY=1\nSTATUS=accepting jobs"
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(10)
            c.connect(api_path)
            c.sendall(b'{"id": 1, "op": "ping"}\n')
            assert b'"pong"' in c.makefile("rb").readline()
        # The daemon served on our socket: it did not unlink, rebind or chmod it.
        st = os.stat(api_path)
        assert (st.st_ino, stat.S_IMODE(st.st_mode)) == (inode, 0o600)
        assert not os.path.exists(os.path.join(run_dir, "jailer.sock"))

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        p.send_signal(signal.SIGHUP)
        reloading = wait_for_state(notify, "RELOADING=1", log_path)
        m = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", reloading)
        assert m and before <= int(m.group(1)) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert wait_for_state(notify, "READY=1", log_path) == "READY=1"

        p.send_signal(signal.SIGTERM)
        assert wait_for_state(notify, "STOPPING=1", log_path) == "STOPPING=1"
        assert p.wait(timeout=30) == 0
        assert os.path.exists(api_path)  # systemd's socket: not ours to remove
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        notify.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        left = processes_with_uid_in(uid_base, uid_count)
        dirs = [os.path.join("/sys/fs/cgroup", c, tag) for c in os.listdir("/sys/fs/cgroup")
                if os.path.isdir(os.path.join("/sys/fs/cgroup", c, tag))]
        for d in dirs:
            subprocess.run(["find", d, "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"], capture_output=True)
        assert left == [] and dirs == [], (left, dirs)
