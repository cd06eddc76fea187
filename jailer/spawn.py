"""Spawning jails from one long-lived thread, and waiting for them from trio.

Why not `trio.lowlevel.open_process`: it forks from a worker thread of trio's thread cache, and
PR_SET_PDEATHSIG (our launcher's and bwrap's --die-with-parent) fires when the *thread* that forked
exits, not the process (PERF_NOTES trap 3): a cached thread retiring after 10 s idle would SIGKILL
every jail it had started. So one thread that lives as long as the process does all the forking;
the event loop never blocks on fork+exec either.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from typing import Any

import outcome
import trio


class JailProcess:
    """A spawned bwrap: its pipes as trio streams, its exit awaited through a pidfd."""

    def __init__(self, popen: subprocess.Popen, stdout_fd: int, stderr_fd: int):
        self.popen = popen
        self.pid = popen.pid
        self.stdout = trio.lowlevel.FdStream(stdout_fd)
        self.stderr = trio.lowlevel.FdStream(stderr_fd)
        self._pidfd = os.pidfd_open(popen.pid)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        if self.popen.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)  # readable once the process has exited
            self.popen.wait()
        self._close_pidfd()
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.returncode is None:
            try:
                self.popen.send_signal(9)
            except ProcessLookupError:
                pass

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


class Spawner:
    """One daemon thread that runs every subprocess.Popen for jails."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="jailer-spawner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, deliver = self._requests.get()
            deliver(outcome.capture(fn))

    async def spawn(self, argv: list[str], **popen_kw: Any) -> JailProcess:
        """Popen(argv, stdout/stderr to fresh pipes, **popen_kw) in the spawner thread."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        result: list[outcome.Outcome] = []

        def deliver(o: outcome.Outcome) -> None:
            result.append(o)
            token.run_sync_soon(trio.lowlevel.reschedule, task)

        def fn() -> subprocess.Popen:
            return subprocess.Popen(argv, stdout=out_w, stderr=err_w, **popen_kw)

        self._requests.put((fn, deliver))
        try:
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        finally:
            os.close(out_w)
            os.close(err_w)
        try:
            popen = result[0].unwrap()
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        return JailProcess(popen, out_r, err_r)
