"""The result record (DESIGN.md section 4) and the pure rule that picks a job's status."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATUSES = ("ok", "error", "incomplete", "timeout", "cpu_limit", "memory_limit", "output_limit",
            "crashed", "rejected", "cancelled", "internal")

# `jailer run` / `jailer submit` exit codes, one per status (documented in docs/cli.md).
EXIT_CODES = {"ok": 0, "error": 1, "incomplete": 2, "timeout": 3, "cpu_limit": 4, "memory_limit": 5,
              "output_limit": 6, "crashed": 7, "rejected": 8, "cancelled": 9, "internal": 10}
EXIT_USAGE = 64  # bad command line / unreadable file / invalid profile (EX_USAGE)


@dataclass
class Facts:
    """What the host observed about one job; `decide` turns it into a status."""

    killed_for: str | None = None  # timeout | cpu_limit | output_limit | cancelled: the host's own kill
    oom_kills: int = 0
    protocol_error: str | None = None  # the jail broke the broker protocol
    hello: bool = False  # the shim came up and connected
    script_mode: bool = False
    result: dict | None = None  # the shim's result frame
    uncaught: dict | None = None  # first uncaught error after the result (or in script mode)
    exit_code: int | None = None  # the runtime's exit code as reported by bwrap (None: killed)
    exit_signal: int | None = None
    internal: str | None = None  # jailer's own failure


def decide(f: Facts) -> tuple[str, dict | None, str | None]:
    """(status, error, reason). Order matters: the host's own verdicts first, then the kernel's,
    then what the runtime reported. A tenant cannot talk its way out of a limit."""
    if f.internal:
        return "internal", {"type": "InternalError", "message": f.internal, "stack": ""}, "internal"
    if f.killed_for == "cancelled":
        return "cancelled", None, None
    if f.killed_for == "output_limit":
        return "output_limit", None, None
    if f.oom_kills > 0:
        return "memory_limit", None, None
    if f.killed_for in ("cpu_limit", "timeout"):
        return f.killed_for, None, None
    if f.protocol_error:
        return "error", {"type": "ProtocolError", "message": f.protocol_error, "stack": ""}, None
    if not f.hello:
        # The tenant's code never arrived: the jail itself failed to start.
        return "internal", {"type": "JailStartError",
                            "message": f"the runtime exited before connecting to the broker "
                                       f"(exit {f.exit_code}, signal {f.exit_signal})", "stack": ""}, \
            "jail_start_failed"
    if f.uncaught:
        return "error", f.uncaught, None
    if f.result is not None:
        status = f.result.get("status")
        if status == "ok":
            return "ok", None, None
        if status == "error":
            return "error", f.result.get("error"), None
        return "incomplete", None, None
    if f.script_mode and f.exit_code is not None:
        if f.exit_code == 0:
            return "ok", None, None
        return "error", {"type": "ExitError", "message": f"script exited with code {f.exit_code}",
                         "stack": ""}, None
    if f.exit_signal is not None:
        return "crashed", {"type": "Crashed", "message": f"the runtime died by signal {f.exit_signal}",
                           "stack": ""}, None
    # Exited (e.g. process.exit() or sys.exit()) without completing the handler.
    return "incomplete", None, None


@dataclass
class Result:
    id: str
    tenant: str
    status: str
    result: Any = None
    error: dict | None = None
    reason: str | None = None  # for rejected / internal: a machine-readable code
    stdout: str = ""
    stderr: str = ""
    logs: list = field(default_factory=list)
    truncated: dict = field(default_factory=lambda: {"stdout": False, "stderr": False, "logs": False})
    exit: dict = field(default_factory=lambda: {"code": None, "signal": None})
    usage: dict = field(default_factory=lambda: {"wall_ms": 0.0, "cpu_ms": 0.0, "memory_peak_bytes": 0})
    timings: dict = field(default_factory=lambda: {"queued_ms": 0.0, "start_ms": 0.0, "run_ms": 0.0})
    profile_digest: str | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id, "tenant": self.tenant, "status": self.status, "result": self.result,
            "error": self.error, "reason": self.reason, "stdout": self.stdout, "stderr": self.stderr,
            "logs": self.logs, "truncated": self.truncated, "exit": self.exit, "usage": self.usage,
            "timings": self.timings, "profile_digest": self.profile_digest,
        }


def rejected(job_id: str, tenant: str, reason: str, message: str) -> Result:
    return Result(id=job_id, tenant=tenant, status="rejected", reason=reason,
                  error={"type": "Rejected", "message": message, "stack": ""})
