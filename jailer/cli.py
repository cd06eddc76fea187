"""The `jailer` command: run, profile check, doctor (serve and submit come with the daemon)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .result import EXIT_CODES, EXIT_USAGE

DEFAULT_RUN_DIR = "/run/jailer"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jailer", description="Run untrusted scripts in per-job jails.")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run one job locally, no daemon")
    r.add_argument("file", help="the tenant's script (.js, .mjs, .cjs or .py)")
    r.add_argument("--tenant", help="tenant name (default: the profile file's name, or 'default')")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--profiles", metavar="DIR", help="profile directory (DIR/TENANT.toml over DIR/defaults.toml)")
    g.add_argument("--profile", metavar="FILE", help="one profile file (over defaults.toml beside it, if any)")
    i = r.add_mutually_exclusive_group()
    i.add_argument("--input", metavar="JSON", help="the request passed to the handler, as JSON")
    i.add_argument("--input-file", metavar="F", help="read the request JSON from a file")
    r.add_argument("--entry", help="entry function name (default: the profile's, usually 'handler')")
    r.add_argument("--json", action="store_true", help="print the result record as one JSON object")

    sv = sub.add_parser("serve", help="the daemon")
    sv.add_argument("--config", metavar="FILE", help="daemon config (TOML); embedded defaults without it")

    sb = sub.add_parser("submit", help="run one job through the daemon")
    sb.add_argument("file", help="the tenant's script (.js, .mjs, .cjs or .py)")
    sb.add_argument("--tenant", required=True)
    sb.add_argument("--socket", metavar="PATH", help="daemon socket (default $JAILER_SOCKET or /run/jailer/jailer.sock)")
    si = sb.add_mutually_exclusive_group()
    si.add_argument("--input", metavar="JSON")
    si.add_argument("--input-file", metavar="F")
    sb.add_argument("--entry")
    sb.add_argument("--json", action="store_true", help="print the result record as one JSON object")

    pr = sub.add_parser("profile", help="profile tools")
    prs = pr.add_subparsers(dest="profile_cmd", required=True)
    c = prs.add_parser("check", help="validate profile files; non-zero exit listing every error")
    c.add_argument("files", nargs="+")

    d = sub.add_parser("doctor", help="which protections this host can apply")
    d.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("JAILER_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "serve":
        return cmd_serve(args)
    if args.cmd == "submit":
        return cmd_submit(args)
    if args.cmd == "profile":
        return cmd_profile_check(args.files)
    if args.cmd == "doctor":
        from .doctor import main as doctor_main
        return doctor_main(as_json=args.json)
    return EXIT_USAGE


def _usage_error(msg: str) -> int:
    print(f"jailer: {msg}", file=sys.stderr)
    return EXIT_USAGE


def cmd_profile_check(files: list[str]) -> int:
    from .profile import check_files

    errors = check_files(files)
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        print(f"{len(errors)} error(s)", file=sys.stderr)
        return 1
    print(f"{len(files)} file(s) OK")
    return 0


def resolve_profile(args: argparse.Namespace):
    from .profile import builtin_defaults, load_profile

    if args.profile:
        tenant = args.tenant or os.path.splitext(os.path.basename(args.profile))[0]
        sibling = os.path.join(os.path.dirname(args.profile) or ".", "defaults.toml")
        is_defaults = os.path.basename(args.profile) == "defaults.toml"
        return load_profile(tenant if not is_defaults else (args.tenant or "default"), args.profile,
                            sibling if os.path.exists(sibling) and not is_defaults else None)
    if args.profiles:
        if not args.tenant:
            raise ValueError("--profiles needs --tenant")
        path = os.path.join(args.profiles, f"{args.tenant}.toml")
        if not os.path.exists(path):
            raise ValueError(f"no profile for tenant {args.tenant!r} in {args.profiles} (looked for {path})")
        defaults = os.path.join(args.profiles, "defaults.toml")
        return load_profile(args.tenant, path, defaults if os.path.exists(defaults) else None)
    if args.tenant:
        return load_profile(args.tenant, None)
    return builtin_defaults()


def _read_job_args(args: argparse.Namespace) -> tuple[str, object]:
    """(code, request) from FILE and --input/--input-file; ValueError with a clear message."""
    try:
        with open(args.file, encoding="utf-8") as f:
            code = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{args.file}: cannot read: {e}") from None
    try:
        if args.input_file:
            with open(args.input_file, encoding="utf-8") as f:
                request = json.load(f)
        else:
            request = json.loads(args.input) if args.input is not None else {}
    except (OSError, ValueError) as e:
        raise ValueError(f"--input: not valid JSON: {e}") from None
    return code, request


def _print_record(record: dict, as_json: bool) -> int:
    if as_json:
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        _print_human(record)
    return EXIT_CODES.get(record.get("status"), EXIT_CODES["internal"])


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from supervisor.config import load_config
    from supervisor.daemon import main as serve_main

    from .profile import ProfileError

    if os.geteuid() != 0:
        return _usage_error("jailer serve needs root (cgroups, per-jail uids)")
    try:
        load_config(args.config)
    except ProfileError as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        return EXIT_USAGE
    trio.run(serve_main, args.config)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from .client import DEFAULT_SOCKET, Client, ClientError

    try:
        code, request = _read_job_args(args)
    except ValueError as e:
        return _usage_error(str(e))
    try:
        with Client(args.socket or DEFAULT_SOCKET) as c:
            record = c.submit(args.tenant, code=code, filename=os.path.basename(args.file), input=request,
                              entry=args.entry)
    except ClientError as e:
        return _usage_error(str(e))
    except OSError as e:
        return _usage_error(f"cannot reach the daemon at {args.socket or DEFAULT_SOCKET}: {e}")
    return _print_record(record, args.json)


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from .profile import ProfileError

    try:
        code, request = _read_job_args(args)
    except ValueError as e:
        return _usage_error(str(e))
    try:
        profile = resolve_profile(args)
    except ProfileError as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:
        return _usage_error(str(e))

    from .runner import Job

    job = Job(filename=os.path.basename(args.file), code=code, input=request, entry=args.entry)
    try:
        result = trio.run(_run_one, job, profile)
    except SetupError as e:
        return _usage_error(str(e))
    return _print_record(result.to_dict(), args.json)


class SetupError(Exception):
    pass


async def _run_one(job, profile):
    from .cgroup import CgroupError, detect
    from .identity import IdentityPool
    from .runner import Runner

    run_dir = os.environ.get("JAILER_RUN_DIR", DEFAULT_RUN_DIR)
    if os.geteuid() != 0:
        raise SetupError("jailer run needs root: it creates cgroups and runs each jail as its own "
                         "unprivileged uid (see `jailer doctor`)")
    try:
        cgroups = detect(os.environ.get("JAILER_CGROUP_PARENT", "jailer"))
    except CgroupError as e:
        raise SetupError(f"cgroups: {e}") from None
    runner = Runner(run_dir, cgroups, IdentityPool(os.path.join(run_dir, "uids")))
    try:
        return await runner.run(job, profile)
    finally:
        try:
            cgroups.remove_parent()  # only if empty: another `jailer run` may be using it
        except (OSError, CgroupError):
            pass


def _print_human(r: dict) -> None:
    line = f"{r['status']}"
    if r.get("reason"):
        line += f" ({r['reason']})"
    u = r["usage"]
    line += f"  wall {u['wall_ms']:.1f} ms  cpu {u['cpu_ms']:.1f} ms  peak {u['memory_peak_bytes'] / 2**20:.1f} MiB"
    print(line)
    if r["status"] == "ok":
        print("result:", json.dumps(r["result"], indent=2))
    if r.get("error"):
        e = r["error"]
        print(f"error: {e.get('type')}: {e.get('message')}")
        if e.get("stack"):
            print(e["stack"])
    for name in ("stdout", "stderr"):
        if r[name]:
            print(f"--- {name}{' (truncated)' if r['truncated'][name] else ''}")
            print(r[name], end="" if r[name].endswith("\n") else "\n")
    for rec in r["logs"]:
        print(f"log {rec['level']}: {rec['msg']} {json.dumps(rec['fields']) if rec['fields'] else ''}")


if __name__ == "__main__":
    sys.exit(main())
