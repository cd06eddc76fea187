"""Profile validation: every error names the file, the key and what was expected."""

import os
import re

import pytest

from jailer.profile import (SCHEMA, ProfileError, builtin_defaults, check_files, load_dir, load_profile,
                            parse_file, schema_rows)
from jailer.units import parse_duration, parse_size

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROFILES = os.path.join(ROOT, "profiles")


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def errors_of(path):
    with pytest.raises(ProfileError) as ei:
        load_profile("t", path)
    return ei.value.errors


@pytest.mark.parametrize("text,expected", [
    ("128MiB", 128 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("64KB", 64000), ("4096", 4096), (512, 512),
    ("10 MiB", 10 * 2**20), ("1b", 1),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12 parsecs", "-1MiB", "", "MiB", True, 1.5, None])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("text,expected", [("1.5s", 1.5), ("250ms", 0.25), ("2m", 120), ("1h", 3600)])
def test_durations(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["5", 5, "5 sec", "-1s", "s"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_unknown_key_names_file_key_and_known_keys(tmp_path):
    p = write(tmp_path, "acme.toml", "[limits]\nmemroy = \"64MiB\"\n")
    [err] = errors_of(p)
    assert err.startswith(f"{p}: limits.memroy: unknown key")
    assert "memory" in err  # lists what it could have been


def test_unknown_section(tmp_path):
    p = write(tmp_path, "a.toml", "[limitz]\nx = 1\n")
    [err] = errors_of(p)
    assert err == f"{p}: limitz: unknown section (known: access, capabilities, filesystem, limits, pool, runtime)"


def test_wrong_types_and_impossible_values_all_reported(tmp_path):
    p = write(tmp_path, "a.toml", """
[runtime]
name = "ruby"
[limits]
memory = 12.5
pids = "lots"
wall_time = 5
cpu_cores = -1
tmpfs = "1KiB"
[capabilities]
log = "yes"
""")
    errs = errors_of(p)
    assert f"{p}: runtime.name: expected one of auto, node, python, got 'ruby'" in errs
    assert f"{p}: limits.memory: expected a size like \"128MiB\", got 12.5" in errs
    assert f"{p}: limits.pids: expected an integer, got a string ('lots')" in errs
    assert f"{p}: limits.wall_time: expected a duration like \"1.5s\" or \"250ms\", got 5" in errs
    assert f"{p}: limits.cpu_cores: must be at least 0, got -1" in errs
    assert f"{p}: limits.tmpfs: must be at least 64KiB, got '1KiB'" in errs
    assert f"{p}: capabilities.log: expected true or false, got a string ('yes')" in errs
    assert len(errs) == 7


def test_invalid_toml_names_file(tmp_path):
    p = write(tmp_path, "a.toml", "[limits\n")
    [err] = errors_of(p)
    assert err.startswith(f"{p}: invalid TOML:")


def test_cross_field_rules(tmp_path):
    p = write(tmp_path, "a.toml", '[limits]\nmemory = "32MiB"\ntmpfs = "64MiB"\n[pool]\nmin = 3\nmax = 1\n')
    errs = errors_of(p)
    assert any(e.startswith(f"{p}: limits.tmpfs: /tmp is backed by the jail's memory") for e in errs)
    assert f"{p}: pool.min: must not exceed pool.max" in errs


def test_secrets_and_filesystem_validation(tmp_path):
    p = write(tmp_path, "a.toml", """
[capabilities.secrets]
GOOD = { file = "/etc/jailer/s/good" }
"bad-name" = { file = "/x" }
REL = { file = "relative/path" }
EXTRA = { file = "/x", mode = "r" }
[filesystem]
ro_paths = ["/opt/lib", { host = "/etc/shadow", jail = "/opt/s" }, { host = "/srv/x", jail = "/tmp/x" }, 7]
""")
    errs = errors_of(p)
    assert any("capabilities.secrets.bad-name: secret names are" in e for e in errs)
    assert f"{p}: capabilities.secrets.REL.file: expected an absolute host path, got 'relative/path'" in errs
    assert any("capabilities.secrets.EXTRA: expected { file" in e for e in errs)
    assert f"{p}: filesystem.ro_paths[1]: '/etc/shadow' may not be exposed to a jail" in errs
    assert f"{p}: filesystem.ro_paths[2]: '/tmp/x' is reserved inside the jail" in errs
    assert any(e.startswith(f"{p}: filesystem.ro_paths[3]: expected") for e in errs)


def test_http_allow_list_shape(tmp_path):
    p = write(tmp_path, "a.toml", '[capabilities.http]\nallow = ["ftp://x/", "https://ok.example/v1/"]\n')
    [err] = errors_of(p)
    assert "'ftp://x/' is not an http(s)://host[:port]/path prefix" in err


def test_tenant_overrides_defaults_key_by_key(tmp_path):
    d = write(tmp_path, "defaults.toml", '[limits]\nmemory = "96MiB"\npids = 20\n')
    t = write(tmp_path, "acme.toml", '[limits]\npids = 10\n')
    prof = load_profile("acme", t, d)
    assert prof.limits.memory_bytes == 96 * 2**20 and prof.limits.pids == 10
    assert prof.limits.wall_time_s == 5.0  # built-in default
    assert prof.sources == ("<built-in defaults>", d, t)


def test_digest_tracks_policy_not_formatting(tmp_path):
    a = write(tmp_path, "a.toml", '[limits]\nmemory = "128MiB"\n')
    b = write(tmp_path, "b.toml", '# comment\n[limits]\nmemory = "134217728"\n')
    c = write(tmp_path, "c.toml", '[limits]\nmemory = "129MiB"\n')
    da, db, dc = (load_profile("t", p).digest for p in (a, b, c))
    assert da == db != dc and re.match(r"^sha256:[0-9a-f]{64}$", da)


def test_load_dir_keeps_good_profiles_and_reports_bad(tmp_path):
    write(tmp_path, "good.toml", "[limits]\npids = 10\n")
    bad = write(tmp_path, "bad.toml", "[limits]\npids = -3\n")
    profiles, errors = load_dir(str(tmp_path))
    assert list(profiles) == ["good"]
    assert errors == [f"{bad}: limits.pids: must be at least 4, got -3"]


def test_bad_tenant_name():
    with pytest.raises(ProfileError, match="tenant '../etc'"):
        load_profile("../etc", None)


def test_example_profiles_are_valid():
    files = sorted(os.path.join(PROFILES, f) for f in os.listdir(PROFILES) if f.endswith(".toml"))
    assert len(files) >= 3
    assert check_files(files) == []


def test_cli_profile_check_lists_all_errors(tmp_path, capsys):
    from jailer.cli import main
    p1 = write(tmp_path, "a.toml", "[limits]\npids = 0\n")
    p2 = write(tmp_path, "b.toml", "[nope]\n")
    assert main(["profile", "check", p1, p2, os.path.join(PROFILES, "acme.toml")]) == 1
    err = capsys.readouterr().err
    assert f"{p1}: limits.pids: must be at least 4, got 0" in err
    assert f"{p2}: nope: unknown section" in err
    assert "2 error(s)" in err


def test_defaults_file_matches_schema_exactly():
    """profiles/defaults.toml lists every key at its built-in default: no drift."""
    values = parse_file(os.path.join(PROFILES, "defaults.toml"))
    for section, key, field in schema_rows():
        assert section in values and key in values[section], f"{section}.{key} missing from defaults.toml"
        v = values[section][key]
        assert (list(v) if isinstance(v, tuple) else v) == field.default, f"{section}.{key}"
    assert load_profile("default", os.path.join(PROFILES, "defaults.toml")).digest == builtin_defaults().digest


def test_docs_describe_every_key():
    with open(os.path.join(ROOT, "docs", "profiles.md")) as f:
        doc = f.read()
    for section, key, _ in schema_rows():
        assert f"`{section}.{key}`" in doc, f"docs/profiles.md does not describe {section}.{key}"
    for free in ("capabilities.secrets", "filesystem.ro_paths"):
        assert f"`{free}" in doc
    assert SCHEMA  # non-empty
