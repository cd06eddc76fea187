"""Unprivileged host identities for jails: one uid (and gid of the same number) per concurrent jail.

A jail never runs as host root: bwrap is started as the slot's uid, so everything inside is that
uid seen from the host (`ps -o uid`). Slots are claimed with flock on a lock file per uid, which
works across processes (`jailer run` next to the daemon) and is released by the kernel if we die.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
from dataclasses import dataclass

# systemd's UIDS-GIDS.md puts container ranges at 524288+; we take a slice, configurable.
DEFAULT_UID_BASE = 524288
DEFAULT_UID_COUNT = 4096


class NoFreeIdentity(Exception):
    pass


@dataclass
class Identity:
    uid: int
    gid: int
    _fd: int

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


class IdentityPool:
    def __init__(self, lock_dir: str, base: int = DEFAULT_UID_BASE, count: int = DEFAULT_UID_COUNT):
        if base < 1000 or count < 1:
            raise ValueError(f"uid range {base}+{count}: must start at 1000 or above and be non-empty")
        self.lock_dir = lock_dir
        self.base = base
        self.count = count
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)

    def acquire(self) -> Identity:
        # Random start spreads concurrent `jailer run` processes over the range.
        start = random.randrange(self.count)
        for i in range(self.count):
            uid = self.base + (start + i) % self.count
            fd = os.open(os.path.join(self.lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise
            return Identity(uid, uid, fd)
        raise NoFreeIdentity(f"all {self.count} jail uids from {self.base} are in use")
