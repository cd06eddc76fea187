"""Shared fixtures. Kernel-facing tests are marked `root`; they use a real bwrap, real cgroups and
real node/python, each in its own cgroup parent, run dir and uid range, all removed afterwards."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def root_skip_reason():
    if os.geteuid() != 0:
        return "needs root: real cgroups and per-jail uids"
    if not shutil.which("bwrap"):
        return "bubblewrap is not installed (./dev setup installs it)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = root_skip_reason()
    if reason:
        for item in items:
            if "root" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def processes_with_uid_in(base, count):
    out = subprocess.run(["ps", "-eo", "uid=,pid=,ppid=,stat=,comm="], capture_output=True, text=True).stdout
    return [line.split()[:2] + [" ".join(line.split()[2:])] for line in out.splitlines()
            if line.strip() and base <= int(line.split()[0]) < base + count]
