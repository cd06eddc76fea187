"""supervisor.config: the shipped example config, validation errors, operator ceilings.

Pure: temporary files only, no root. Every error must name the file and the key (`section.key`)
and say what was expected, like profile errors do.
"""

from __future__ import annotations

import grp
import os
import tomllib

import pytest

from jailer.profile import ProfileError, builtin_defaults, load_profile
from supervisor.config import SCHEMA, ceiling_errors, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "systemd", "config.toml.example")


def write(tmp_path, text, name="config.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def errors_of(path):
    with pytest.raises(ProfileError) as exc:
        load_config(path)
    return exc.value.errors


def schema_rows():
    return [(section, key, field) for section, keys in SCHEMA.items() for key, field in keys.items()]


def plain(value):
    """Parsed list values come back as tuples; schema defaults are lists."""
    return list(value) if isinstance(value, tuple) else value


# ---- the example shipped in systemd/ ------------------------------------------------------------


def test_example_lists_every_schema_key_at_its_default():
    """systemd/config.toml.example has every key of SCHEMA, each at its built-in default: no drift."""
    cfg = load_config(EXAMPLE)  # also proves it is valid
    for section, key, field in schema_rows():
        assert key in cfg.values.get(section, {}), f"{section}.{key} missing from config.toml.example"
        assert plain(cfg.values[section][key]) == field.default, f"{section}.{key} is not at its default"


def test_example_has_nothing_but_schema_keys():
    with open(EXAMPLE, "rb") as f:
        data = tomllib.load(f)
    assert set(data) == set(SCHEMA)
    for section, table in data.items():
        assert set(table) == set(SCHEMA[section]), section


def test_example_behaves_like_no_config_at_all():
    from_file, builtin = load_config(EXAMPLE), load_config(None)
    for section, key, _ in schema_rows():
        assert plain(from_file.get(section, key)) == plain(builtin.get(section, key)), f"{section}.{key}"
    assert from_file.socket_path == builtin.socket_path == "/run/jailer/jailer.sock"
    assert from_file.source == EXAMPLE and builtin.source == "<built-in defaults>"


def test_units_and_the_example_agree_on_paths():
    """The example's paths are the ones the systemd units create and protect."""
    cfg = load_config(EXAMPLE)
    with open(os.path.join(ROOT, "systemd", "jailer.service")) as f:
        service = f.read()
    with open(os.path.join(ROOT, "systemd", "jailer.socket")) as f:
        socket_unit = f.read()
    assert f"ListenStream={cfg.socket_path}\n" in socket_unit
    assert f"RuntimeDirectory={os.path.basename(cfg.run_dir)}\n" in service
    assert f"StateDirectory={os.path.basename(cfg.get('paths', 'state_dir'))}\n" in service
    rw = next(line for line in service.splitlines() if line.startswith("ReadWritePaths="))
    assert set(rw.split("=", 1)[1].split()) == {cfg.run_dir, cfg.get("paths", "state_dir")}
    assert "--config /etc/jailer/config.toml" in service
    assert cfg.get("paths", "profiles").startswith("/etc/jailer/")


# ---- validation errors name the file and the key -----------------------------------------------


def test_unknown_section(tmp_path):
    path = write(tmp_path, "[serverr]\nsocket = \"/run/x.sock\"\n")
    errs = errors_of(path)
    assert len(errs) == 1
    assert errs[0].startswith(f"{path}: serverr: unknown section")
    assert "server" in errs[0] and "ceilings" in errs[0]  # lists the known sections


def test_unknown_key_lists_the_known_keys(tmp_path):
    path = write(tmp_path, "[server]\nsockt = \"/run/x.sock\"\n")
    errs = errors_of(path)
    assert len(errs) == 1
    assert errs[0].startswith(f"{path}: server.sockt: unknown key")
    assert "socket_mode" in errs[0] and "max_frame" in errs[0]


@pytest.mark.parametrize("section, key, value, expected", [
    ("server", "max_in_flight", '"many"', "expected an integer"),
    ("server", "socket", "3", "expected a string"),
    ("server", "max_frame", '"lots"', "expected a size"),
    ("shutdown", "drain", "30", "duration"),  # a bare number: say the unit
    ("http", "allow_internal", '"http://10.0.0.5:80"', "expected a list of strings"),
    ("log", "level", '"verbose"', "expected one of debug, info, warning, error"),
    ("jails", "uid_base", "0", "must be at least 1000"),
    ("jails", "uid_count", "true", "expected an integer"),
])
def test_wrong_type_or_value_names_file_key_and_expectation(tmp_path, section, key, value, expected):
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    errs = errors_of(path)
    assert len(errs) == 1, errs
    assert errs[0].startswith(f"{path}: {section}.{key}: "), errs[0]
    assert expected in errs[0], errs[0]


def test_section_that_is_not_a_table(tmp_path):
    path = write(tmp_path, "server = 1\n")
    assert errors_of(path) == [f"{path}: [server]: expected a table"]


@pytest.mark.parametrize("mode", ["rw-rw----", "0999", "", "0x1b0"])
def test_bad_socket_mode(tmp_path, mode):
    path = write(tmp_path, f'[server]\nsocket_mode = "{mode}"\n')
    errs = errors_of(path)
    assert errs == [f'{path}: server.socket_mode: expected octal digits like "0660"']


@pytest.mark.parametrize("mode", ["0660", "600", "0711"])
def test_good_socket_modes(tmp_path, mode):
    assert load_config(write(tmp_path, f'[server]\nsocket_mode = "{mode}"\n')).get("server", "socket_mode") == mode


def test_unknown_groups_are_named(tmp_path):
    missing = "jailer-no-such-group-xyz"
    with pytest.raises(KeyError):
        grp.getgrnam(missing)
    path = write(tmp_path, f'[server]\nsocket_group = "{missing}"\nadmin_group = "{missing}"\n')
    errs = errors_of(path)
    assert f"{path}: server.socket_group: no such group {missing!r}" in errs
    assert f"{path}: server.admin_group: no such group {missing!r}" in errs


def test_numeric_and_existing_groups_are_accepted(tmp_path):
    existing = grp.getgrgid(os.getgid()).gr_name
    cfg = load_config(write(tmp_path, f'[server]\nsocket_group = "{existing}"\nadmin_group = "12345"\n'))
    assert cfg.get("server", "socket_group") == existing


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, '[nope]\n[server]\nbogus = 1\nsocket_mode = "abc"\nmax_connections = 0\n'
                           '[log]\nformat = "xml"\n')
    errs = errors_of(path)
    assert len(errs) == 5, errs
    assert all(e.startswith(f"{path}: ") for e in errs)
    for needle in ("nope: unknown section", "server.bogus: unknown key", "server.socket_mode",
                   "server.max_connections: must be at least 1", "log.format: expected one of json, text"):
        assert any(needle in e for e in errs), needle


def test_unreadable_and_invalid_toml(tmp_path):
    missing = str(tmp_path / "absent.toml")
    assert errors_of(missing) == [f"{missing}: cannot read: No such file or directory"]
    path = write(tmp_path, "[server\n")
    (err,) = errors_of(path)
    assert err.startswith(f"{path}: invalid TOML: ")


def test_values_are_parsed_into_units(tmp_path):
    cfg = load_config(write(tmp_path, '[server]\nmax_frame = "1MiB"\n[shutdown]\ndrain = "1m"\n'
                                      '[ceilings]\nmemory = "1GiB"\n[paths]\nrun_dir = "/run/j2"\n'))
    assert cfg.get("server", "max_frame") == 1024 * 1024
    assert cfg.get("shutdown", "drain") == 60.0
    assert cfg.get("ceilings", "memory") == 1024**3
    assert cfg.socket_path == "/run/j2/jailer.sock"  # follows run_dir unless server.socket is set


# ---- ceilings: a profile over one is refused, naming both keys ---------------------------------

# One value per ceiling, below the built-in profile default, so builtin_defaults() exceeds it.
LOW_CEILINGS = {"wall_time": '"1s"', "cpu_time": '"1s"', "memory": '"128MiB"', "pids": "32",
                "tmpfs": '"8MiB"', "output": '"512KiB"', "concurrency": "2", "queue": "10"}


def test_every_ceiling_is_covered():
    assert set(LOW_CEILINGS) == set(SCHEMA["ceilings"])


@pytest.mark.parametrize("key", sorted(LOW_CEILINGS))
def test_profile_over_a_ceiling_is_refused(tmp_path, key):
    path = write(tmp_path, f"[ceilings]\n{key} = {LOW_CEILINGS[key]}\n")
    errs = ceiling_errors(load_config(path), builtin_defaults())
    assert len(errs) == 1, errs
    assert f"limits.{key}: " in errs[0] and "exceeds the operator ceiling" in errs[0]
    assert f"(ceilings.{key} in {path})" in errs[0]


def test_ceiling_message_names_the_profile_file_and_both_keys(tmp_path):
    cfg_path = write(tmp_path, '[ceilings]\nmemory = "192MiB"\nwall_time = "10s"\n')
    prof_path = write(tmp_path, '[limits]\nmemory = "256MiB"\nwall_time = "10s"\n', "acme.toml")
    errs = ceiling_errors(load_config(cfg_path), load_profile("acme", prof_path))
    assert errs == [f"{prof_path}: limits.memory: {256 * 1024**2} exceeds the operator ceiling "
                    f"{192 * 1024**2} (ceilings.memory in {cfg_path})"]  # wall_time at the ceiling is fine


def test_default_ceilings_admit_the_default_profile():
    assert ceiling_errors(load_config(None), builtin_defaults()) == []
    assert ceiling_errors(load_config(EXAMPLE), builtin_defaults()) == []


def test_daemon_refuses_a_profile_over_a_ceiling_and_keeps_the_last_good_one(tmp_path):
    """What `systemctl reload jailer` does with a profile edited past a ceiling (docs/operations.md)."""
    from supervisor.daemon import Daemon

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    cfg_path = write(tmp_path, f'[paths]\nprofiles = "{profiles}"\n[ceilings]\nmemory = "192MiB"\n')
    acme = profiles / "acme.toml"
    acme.write_text('[limits]\nmemory = "128MiB"\n')
    (profiles / "globex.toml").write_text('[limits]\nmemory = "1GiB"\n')
    daemon = Daemon(load_config(cfg_path), cfg_path)

    errs = daemon.load_profiles()
    assert sorted(daemon.profiles) == ["acme"]  # a new tenant over a ceiling gets no profile
    assert len(errs) == 1 and "globex.toml: limits.memory" in errs[0] and "ceilings.memory" in errs[0]

    acme.write_text('[limits]\nmemory = "256MiB"\n')
    errs = daemon.load_profiles()
    assert any("acme.toml: limits.memory" in e for e in errs)
    assert daemon.profiles["acme"].limits.memory_bytes == 128 * 1024**2  # last good version kept
