import os
import shutil

import pytest

from jailer.cgroup import detect
from jailer.identity import IdentityPool
from jailer.profile import load_profile
from jailer.runner import Job, Runner

from ..conftest import processes_with_uid_in

UID_COUNT = 64


@pytest.fixture
def jail_env():
    """A Runner with its own cgroup parent, run dir and uid range; checks nothing is left behind."""
    tag = f"jailer-test-{os.getpid()}"
    run_dir = f"/run/{tag}"
    uid_base = 700000 + (os.getpid() % 1000) * UID_COUNT
    backend = detect(tag)
    runner = Runner(run_dir, backend, IdentityPool(os.path.join(run_dir, "uids"), uid_base, UID_COUNT))
    try:
        yield runner
    finally:
        left_cg = backend.cleanup_stale()
        left_ps = processes_with_uid_in(uid_base, UID_COUNT)
        backend.remove_parent()
        # v1: <hierarchy>/<tag>; v2: <mount>/<tag> (backend.parent_paths covers both)
        leftover_dirs = sorted(set(_cgroup_dirs(tag)) | {p for p in backend.parent_paths if os.path.isdir(p)})
        shutil.rmtree(run_dir, ignore_errors=True)
        assert left_cg == [], f"job cgroups left behind: {left_cg}"
        assert left_ps == [], f"jail processes left behind: {left_ps}"
        assert leftover_dirs == [], f"cgroup directories left behind: {leftover_dirs}"


def _cgroup_dirs(tag):
    base = "/sys/fs/cgroup"
    found = []
    for ctrl in os.listdir(base):
        p = os.path.join(base, ctrl, tag)
        if os.path.isdir(p):
            found.append(p)
    return found


@pytest.fixture
def profile(tmp_path):
    """profile("[limits]\\nmemory = ...") -> a Profile over the built-in defaults."""
    def make(text="", tenant="t"):
        path = tmp_path / f"{tenant}.toml"
        path.write_text(text)
        return load_profile(tenant, str(path))
    return make


@pytest.fixture
def run(jail_env, profile):
    """await run("code", "x.js", limits_toml, input=...) -> result dict."""
    async def go(code, filename, toml="", input=None, entry=None):
        res = await jail_env.run(Job(filename=filename, code=code, input=input or {}, entry=entry), profile(toml))
        return res.to_dict()
    return go
