"""The runtime shims (jailer/shims/shim.js, shim.py), run outside a jail against a fake broker host.

Each test spawns one real shim process over a real Unix socket (tests/shimhost.py), which reaps it
(killing it by pid at a hard deadline) before returning. No root needed.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shimhost import NODE, PYTHON, HostError, ShimRun, run_shim  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (os.access(NODE, os.X_OK) and os.access(PYTHON, os.X_OK)), reason=f"needs {NODE} and {PYTHON}"
)

BOTH = pytest.mark.parametrize("rt", ["node", "python"])
IDLE = {"op": "idle"}
SCRIPT = {"op": "script"}
INCOMPLETE = {"op": "result", "status": "incomplete"}


def ok(value):
    return {"op": "result", "status": "ok", "result": value}


def after_hello(run: ShimRun, rt: str) -> list[dict]:
    """Checks the hello frame and the run's hygiene; returns the frames after hello."""
    assert not run.timed_out, run
    assert not run.protocol_errors, run.protocol_errors
    hello = run.frames[0]
    assert hello["op"] == "hello" and hello["runtime"] == rt, run.frames
    assert isinstance(hello["pid"], int) and isinstance(hello["version"], str) and hello["version"]
    assert set(hello) == {"op", "runtime", "version", "pid"}
    return run.frames[1:]


def assert_error(frame: dict, op: str, type_: str, message: str) -> str:
    """An error-carrying frame with exactly this type and message; returns its stack."""
    assert frame["op"] == op, frame
    if op == "result":
        assert frame["status"] == "error", frame
        assert set(frame) == {"op", "status", "error"}
    else:
        assert set(frame) == {"op", "error"}
    err = frame["error"]
    assert set(err) == {"type", "message", "stack"}, err
    assert (err["type"], err["message"]) == (type_, message), err
    assert "shim.js" not in err["stack"] and "shim.py" not in err["stack"], err["stack"]
    return err["stack"]


# ---------------------------------------------------------------------------------------------
# Handlers returning values


ASYNC_OK = {
    "node": "exports.handler = async (request, modules) => {\n"
    "  await new Promise((r) => setTimeout(r, 5));\n"
    "  return { echo: request, n: 1.5 };\n"
    "};\n",
    "python": "import asyncio\n"
    "async def handler(request, modules):\n"
    "    await asyncio.sleep(0.005)\n"
    "    return {'echo': request, 'n': 1.5}\n",
}


@BOTH
def test_async_return_is_the_result(rt):
    run = run_shim(rt, ASYNC_OK[rt], input={"a": [1, "é"]})
    assert after_hello(run, rt) == [ok({"echo": {"a": [1, "é"]}, "n": 1.5}), IDLE]
    assert run.exit_code == 0
    assert run.stdout == run.stderr == ""


SYNC_OK = {
    "node": "exports.handler = function (request, modules) { return request.x * 2; };\n",
    "python": "def handler(request, modules):\n    return request['x'] * 2\n",
}


@BOTH
def test_sync_return_is_the_result(rt):
    run = run_shim(rt, SYNC_OK[rt], input={"x": 21})
    assert after_hello(run, rt) == [ok(42), IDLE]
    assert run.exit_code == 0


PRINTS = {
    "node": "exports.handler = () => { console.log('to stdout'); console.error('to stderr'); return 'done'; };\n",
    "python": "import sys\n"
    "def handler(request, modules):\n"
    "    print('to stdout')\n"
    "    print('to stderr', file=sys.stderr)\n"
    "    return 'done'\n",
}


@BOTH
def test_console_output_goes_to_the_tenant_pipes(rt):
    run = run_shim(rt, PRINTS[rt])
    assert after_hello(run, rt) == [ok("done"), IDLE]
    assert (run.stdout, run.stderr) == ("to stdout\n", "to stderr\n")


NO_VALUE = {
    "node": "exports.handler = async () => {};\n",
    "python": "def handler(request, modules):\n    pass\n",
}


@BOTH
def test_no_return_value_is_null(rt):
    run = run_shim(rt, NO_VALUE[rt])
    assert after_hello(run, rt) == [ok(None), IDLE]


NOT_JSON = {
    "node": "exports.handler = () => { const a = {}; a.self = a; return a; };\n",
    "python": "def handler(request, modules):\n    return {1, 2}\n",
}


@BOTH
def test_non_json_result_is_a_type_error(rt):
    run = run_shim(rt, NOT_JSON[rt])
    frames = after_hello(run, rt)
    assert frames[1:] == [IDLE]
    assert frames[0]["error"]["type"] == "TypeError"
    assert frames[0]["error"]["message"].startswith("handler result is not JSON-serialisable: ")
    assert frames[0]["error"]["stack"] == ""


HUGE = {
    "node": "exports.handler = () => 'x'.repeat(2 * 1024 * 1024);\n",
    "python": "def handler(request, modules):\n    return 'x' * (2 * 1024 * 1024)\n",
}


@BOTH
def test_result_over_the_frame_limit_is_refused(rt):
    run = run_shim(rt, HUGE[rt])
    frames = after_hello(run, rt)
    assert frames[1:] == [IDLE]
    assert_error(
        frames[0], "result", "OutputTooLarge",
        "handler result is 2097194 bytes as a result frame; the limit is 1048576 bytes",
    )


OTHER_ENTRY = {
    "node": "exports.main = (req) => 'main';\nexports.handler = () => 'handler';\n",
    "python": "def main(request, modules):\n    return 'main'\ndef handler(request, modules):\n    return 'handler'\n",
}


@BOTH
def test_entry_name_comes_from_the_job(rt):
    run = run_shim(rt, OTHER_ENTRY[rt], entry="main")
    assert after_hello(run, rt) == [ok("main"), IDLE]


# ---------------------------------------------------------------------------------------------
# Errors


THROWS = {
    "node": "function check(x) {\n"
    "  throw new TypeError('bad input: ' + x);\n"
    "}\n"
    "exports.handler = async (request) => check(request);\n",
    "python": "def check(x):\n"
    "    raise ValueError(f'bad input: {x}')\n"
    "\n"
    "def handler(request, modules):\n"
    "    return check(request)\n",
}


@BOTH
def test_throw_is_an_error_result_with_type_message_stack(rt):
    run = run_shim(rt, THROWS[rt], input=7)
    frames = after_hello(run, rt)
    assert frames[1:] == [IDLE]
    if rt == "node":
        stack = assert_error(frames[0], "result", "TypeError", "bad input: 7")
        assert stack.startswith("TypeError: bad input: 7\n    at check (/tmp/.jailer-job/handler.js:2:9)\n")
        assert "at exports.handler (/tmp/.jailer-job/handler.js:4:" in stack
    else:
        stack = assert_error(frames[0], "result", "ValueError", "bad input: 7")
        lines = [l for l in stack.split("\n") if l.strip("^ ")]  # without 3.11's caret lines
        assert "\n".join(lines) == (
            "Traceback (most recent call last):\n"
            '  File "/tmp/.jailer-job/handler.py", line 5, in handler\n'
            "    return check(request)\n"
            '  File "/tmp/.jailer-job/handler.py", line 2, in check\n'
            "    raise ValueError(f'bad input: {x}')\n"
            "ValueError: bad input: 7"
        )
    assert run.exit_code == 0


SYNTAX = {
    "node": "exports.handler = () => 1;\nconst x = ;\n",
    "python": "def handler(request, modules):\n    return = 1\n",
}


@BOTH
def test_syntax_error_names_the_line(rt):
    run = run_shim(rt, SYNTAX[rt])
    frames = after_hello(run, rt)
    assert frames[1:] == [IDLE]
    if rt == "node":
        stack = assert_error(frames[0], "result", "SyntaxError", "Unexpected token ';' (handler.js:2)")
        assert stack == "/tmp/.jailer-job/handler.js:2\nconst x = ;\n          ^\n\nSyntaxError: Unexpected token ';'"
    else:
        stack = assert_error(frames[0], "result", "SyntaxError", "invalid syntax (handler.py, line 2)")
        assert stack.startswith('  File "/tmp/.jailer-job/handler.py", line 2\n    return = 1\n')
    assert run.exit_code == 0


NON_ERROR_THROWN = {
    "node": "exports.handler = () => Promise.reject('just a string');\n",
    "python": "def handler(request, response, modules):\n    response.error('just a string')\n",
}


@BOTH
def test_non_error_failure_is_an_error_with_its_text(rt):
    run = run_shim(rt, NON_ERROR_THROWN[rt])
    assert after_hello(run, rt) == [
        {"op": "result", "status": "error", "error": {"type": "Error", "message": "just a string", "stack": ""}},
        IDLE,
    ]


# ---------------------------------------------------------------------------------------------
# Callback style


CALLBACK_COMPLETE = {
    "node": "exports.handler = (request, response, modules) => {\n"
    "  setTimeout(() => response.complete({ got: request }), 5);\n"
    "};\n",
    "python": "import threading\n"
    "def handler(request, response, modules):\n"
    "    threading.Timer(0.005, response.complete, [{'got': request}]).start()\n",
}


@BOTH
def test_callback_complete(rt):
    run = run_shim(rt, CALLBACK_COMPLETE[rt], input="x")
    assert after_hello(run, rt) == [ok({"got": "x"}), IDLE]
    assert run.exit_code == 0


CALLBACK_SUCCESS_TWICE = {
    "node": "exports.handler = (request, response, modules) => {\n"
    "  response.success(1); response.complete(2); response.error('no');\n"
    "};\n",
    "python": "def handler(request, response, modules):\n"
    "    response.success(1)\n    response.complete(2)\n    response.error('no')\n",
}


@BOTH
def test_callback_success_alias_and_only_first_completion_counts(rt):
    run = run_shim(rt, CALLBACK_SUCCESS_TWICE[rt])
    assert after_hello(run, rt) == [ok(1), IDLE]


CALLBACK_ERROR = {
    "node": "exports.handler = (request, response, modules) => { response.error(new RangeError('out of range')); };\n",
    "python": "def handler(request, response, modules):\n    response.error(LookupError('out of range'))\n",
}


@BOTH
def test_callback_error(rt):
    run = run_shim(rt, CALLBACK_ERROR[rt])
    frames = after_hello(run, rt)
    assert frames[1:] == [IDLE]
    assert_error(frames[0], "result", "RangeError" if rt == "node" else "LookupError", "out of range")


CALLBACK_NEVER = {
    "node": "exports.handler = (request, response, modules) => { setTimeout(() => {}, 5); };\n",
    "python": "def handler(request, response, modules):\n    pass\n",
}


@BOTH
def test_callback_never_completing_is_incomplete(rt):
    run = run_shim(rt, CALLBACK_NEVER[rt])
    assert after_hello(run, rt) == [INCOMPLETE, IDLE]
    assert run.exit_code == 0


NEVER_RESOLVES = {
    "node": "exports.handler = () => new Promise(() => {});\n",
    "python": "import asyncio\n"
    "async def handler(request, modules):\n"
    "    await asyncio.get_running_loop().create_future()\n",
}


@BOTH
def test_promise_that_can_never_resolve_is_incomplete(rt):
    run = run_shim(rt, NEVER_RESOLVES[rt])
    assert after_hello(run, rt) == [INCOMPLETE, IDLE]
    assert run.exit_code == 0


KEEPS_ITSELF_ALIVE = {
    "node": "exports.handler = () => { setInterval(() => {}, 10); return new Promise(() => {}); };\n",
    "python": "import asyncio\n"
    "async def handler(request, modules):\n"
    "    while True:\n"
    "        await asyncio.sleep(0.01)\n",
}


@BOTH
def test_handler_that_keeps_running_is_left_to_the_host(rt):
    run = run_shim(rt, KEEPS_ITSELF_ALIVE[rt], timeout_s=1.5)
    assert run.timed_out  # killed by pid at the fake host's deadline
    assert run.exit_code == -9
    assert [f["op"] for f in run.frames] == ["hello"]


# ---------------------------------------------------------------------------------------------
# After the result


LATE_THROW = {
    "node": "exports.handler = async () => {\n"
    "  setTimeout(() => { throw new Error('late'); }, 20);\n"
    "  return { ok: true };\n"
    "};\n",
    "python": "import asyncio\n"
    "async def later():\n"
    "    await asyncio.sleep(0.02)\n"
    "    raise RuntimeError('late')\n"
    "\n"
    "async def handler(request, modules):\n"
    "    asyncio.get_running_loop().create_task(later())\n"
    "    return {'ok': True}\n",
}


@BOTH
def test_exception_after_the_result_is_uncaught(rt):
    run = run_shim(rt, LATE_THROW[rt])
    frames = after_hello(run, rt)
    assert frames[0] == ok({"ok": True})
    assert len(frames) == 2
    if rt == "node":
        stack = assert_error(frames[1], "uncaught", "Error", "late")
        assert "/tmp/.jailer-job/handler.js:2:" in stack
    else:
        stack = assert_error(frames[1], "uncaught", "RuntimeError", "late")
        assert 'File "/tmp/.jailer-job/handler.py", line 4, in later' in stack
    assert run.exit_code == 1


PENDING_WORK_FINISHES = {
    "node": "exports.handler = async () => {\n"
    "  setTimeout(() => console.log('after the result'), 20);\n"
    "  return 1;\n"
    "};\n",
    "python": "import asyncio\n"
    "async def later():\n"
    "    await asyncio.sleep(0.02)\n"
    "    await asyncio.to_thread(print, 'after the result')\n"
    "\n"
    "async def handler(request, modules):\n"
    "    asyncio.get_running_loop().create_task(later())\n"
    "    return 1\n",
}


@BOTH
def test_pending_work_runs_before_idle(rt):
    run = run_shim(rt, PENDING_WORK_FINISHES[rt])
    assert after_hello(run, rt) == [ok(1), IDLE]
    assert run.stdout == "after the result\n"
    assert run.ms_until("idle") - run.ms_until("result") >= 15


UNHANDLED_REJECTION = {
    "node": "exports.handler = (req, res, modules) => { res.complete('x'); Promise.reject(new SyntaxError('nope')); };\n",
    "python": "import threading\n"
    "def fail():\n"
    "    raise OSError('nope')\n"
    "def handler(request, response, modules):\n"
    "    response.complete('x')\n"
    "    threading.Thread(target=fail).start()\n",
}


@BOTH
def test_unhandled_rejection_or_thread_exception_is_uncaught(rt):
    run = run_shim(rt, UNHANDLED_REJECTION[rt])
    frames = after_hello(run, rt)
    assert frames[0] == ok("x") and len(frames) == 2
    assert_error(frames[1], "uncaught", "SyntaxError" if rt == "node" else "OSError", "nope")
    assert run.exit_code == 1


# ---------------------------------------------------------------------------------------------
# Capability calls


LOG = {
    "node": "exports.handler = async (request, modules) => {\n"
    "  const v = await modules.log.info('hello', { user: 'ann' });\n"
    "  await modules.log.warn('careful');\n"
    "  return { logged: v };\n"
    "};\n",
    "python": "def handler(request, modules):\n"
    "    v = modules.log.info('hello', user='ann')\n"
    "    modules.log.warn('careful')\n"
    "    return {'logged': v}\n",
}


@BOTH
def test_log_call_round_trip(rt):
    seen = []

    def log(args):
        seen.append(args)
        return None

    run = run_shim(rt, LOG[rt], handlers={"log": log})
    assert after_hello(run, rt) == [
        {"op": "call", "id": 1, "cap": "log", "method": "info", "args": {"msg": "hello", "fields": {"user": "ann"}}},
        {"op": "call", "id": 2, "cap": "log", "method": "warn", "args": {"msg": "careful", "fields": {}}},
        ok({"logged": None}),
        IDLE,
    ]
    assert seen == [{"msg": "hello", "fields": {"user": "ann"}}, {"msg": "careful", "fields": {}}]


DENIED_CAUGHT = {
    "node": "exports.handler = async (request, modules) => {\n"
    "  try {\n"
    "    await modules.secrets.get('db_password');\n"
    "    return 'unreachable';\n"
    "  } catch (e) {\n"
    "    return { name: e.name, message: e.message, isError: e instanceof Error };\n"
    "  }\n"
    "};\n",
    "python": "def handler(request, modules):\n"
    "    try:\n"
    "        modules.secrets.get('db_password')\n"
    "        return 'unreachable'\n"
    "    except modules.Error as e:\n"
    "        return {'name': type(e).__name__, 'message': str(e), 'isError': isinstance(e, Exception)}\n",
}


@BOTH
def test_denied_call_raises_an_error_named_after_the_reply(rt):
    run = run_shim(rt, DENIED_CAUGHT[rt], handlers={"log": lambda a: None})
    assert after_hello(run, rt) == [
        {"op": "call", "id": 1, "cap": "secrets", "method": "get", "args": {"name": "db_password"}},
        ok({"name": "CapabilityDenied", "message": "capability 'secrets' is not granted", "isError": True}),
        IDLE,
    ]


DENIED_UNCAUGHT = {
    "node": "exports.handler = async (request, modules) => modules.kv.get('k');\n",
    "python": "def handler(request, modules):\n    return modules.kv.get('k')\n",
}


@BOTH
def test_denied_call_not_caught_fails_the_job_with_that_type(rt):
    def quota(args):
        raise HostError("QuotaExceeded", "kv quota of 1 MiB used up")

    run = run_shim(rt, DENIED_UNCAUGHT[rt], handlers={"kv.get": quota})
    frames = after_hello(run, rt)
    assert frames[0] == {"op": "call", "id": 1, "cap": "kv", "method": "get", "args": {"key": "k"}}
    assert frames[2:] == [IDLE]
    stack = assert_error(frames[1], "result", "QuotaExceeded", "kv quota of 1 MiB used up")
    assert "handler" in stack


ALL_CAPS = {
    "node": "exports.handler = async (request, m) => [\n"
    "  await m.kv.set('a', { n: 1 }, { ttl: 60 }),\n"
    "  await m.kv.set('b', 2),\n"
    "  await m.kv.get('a'),\n"
    "  await m.kv.list('a'),\n"
    "  await m.kv.delete('a'),\n"
    "  await m.http.fetch('https://api.example/x', { method: 'POST', headers: { h: '1' }, body: 'payload' }),\n"
    "  await m.secrets.get('token'),\n"
    "  await m.call('geo', 'lookup', { ip: '10.0.0.1' }),\n"
    "];\n",
    "python": "def handler(request, m):\n"
    "    return [\n"
    "        m.kv.set('a', {'n': 1}, ttl=60),\n"
    "        m.kv.set('b', 2),\n"
    "        m.kv.get('a'),\n"
    "        m.kv.list('a'),\n"
    "        m.kv.delete('a'),\n"
    "        m.http.fetch('https://api.example/x', method='POST', headers={'h': '1'}, body='payload'),\n"
    "        m.secrets.get('token'),\n"
    "        m.call('geo', 'lookup', ip='10.0.0.1'),\n"
    "    ]\n",
}


@BOTH
def test_capability_call_frames(rt):
    handlers = {
        "kv": lambda args: {"kv": args},
        "http": lambda args: {"status": 200},
        "secrets": lambda args: "s3cret",
        "geo": lambda args: "NL",
    }
    run = run_shim(rt, ALL_CAPS[rt], handlers=handlers)
    frames = after_hello(run, rt)
    calls = [(f["id"], f["cap"], f["method"], f["args"]) for f in frames if f["op"] == "call"]
    assert calls == [
        (1, "kv", "set", {"key": "a", "value": {"n": 1}, "ttl": 60}),
        (2, "kv", "set", {"key": "b", "value": 2}),
        (3, "kv", "get", {"key": "a"}),
        (4, "kv", "list", {"prefix": "a"}),
        (5, "kv", "delete", {"key": "a"}),
        (6, "http", "fetch", {"url": "https://api.example/x", "method": "POST", "headers": {"h": "1"}, "body": "payload"}),
        (7, "secrets", "get", {"name": "token"}),
        (8, "geo", "lookup", {"ip": "10.0.0.1"}),
    ]
    assert frames[8:] == [
        ok([
            {"kv": {"key": "a", "value": {"n": 1}, "ttl": 60}},
            {"kv": {"key": "b", "value": 2}},
            {"kv": {"key": "a"}},
            {"kv": {"prefix": "a"}},
            {"kv": {"key": "a"}},
            {"status": 200},
            "s3cret",
            "NL",
        ]),
        IDLE,
    ]


# ---------------------------------------------------------------------------------------------
# Script mode


SCRIPT_OK = {
    "node": "const total = [1, 2, 3].reduce((a, b) => a + b);\n"
    "setTimeout(() => console.log('total', total), 5);\n",
    "python": "total = sum([1, 2, 3])\nprint('total', total)\n",
}


@BOTH
def test_script_mode_exit_0(rt):
    run = run_shim(rt, SCRIPT_OK[rt])
    assert after_hello(run, rt) == [SCRIPT, IDLE]
    assert run.stdout == "total 6\n"
    assert run.exit_code == 0


SCRIPT_EXIT_CODE = {
    "node": "console.log('failing');\nprocess.exit(3);\n",
    "python": "import sys\nprint('failing')\nsys.exit(3)\n",
}


@BOTH
def test_script_mode_exit_code_decides(rt):
    run = run_shim(rt, SCRIPT_EXIT_CODE[rt])
    assert after_hello(run, rt) == [SCRIPT]
    assert run.stdout == "failing\n"
    assert run.exit_code == 3


def test_node_script_exit_code_without_process_exit():
    run = run_shim("node", "process.exitCode = 5;\n")
    assert after_hello(run, "node") == [SCRIPT, IDLE]
    assert run.exit_code == 5


SCRIPT_THROW = {
    "node": "console.log('before');\nthrow new RangeError('top level');\n",
    "python": "print('before')\nraise KeyError('top level')\n",
}


@BOTH
def test_script_mode_throw_is_script_then_uncaught(rt):
    run = run_shim(rt, SCRIPT_THROW[rt])
    frames = after_hello(run, rt)
    assert frames[0] == SCRIPT and len(frames) == 2
    if rt == "node":
        stack = assert_error(frames[1], "uncaught", "RangeError", "top level")
        assert stack == "RangeError: top level\n    at Object.<anonymous> (/tmp/.jailer-job/handler.js:2:7)"
    else:
        stack = assert_error(frames[1], "uncaught", "KeyError", "'top level'")
        assert 'File "/tmp/.jailer-job/handler.py", line 2, in <module>' in stack
    assert run.stdout == "before\n"
    assert run.exit_code == 1


INIT_FAILS = {
    "node": "exports.handler = () => 1;\nthrow new Error('config missing');\n",
    "python": "def handler(request, modules):\n    return 1\nraise RuntimeError('config missing')\n",
}


@BOTH
def test_top_level_throw_after_exporting_the_entry_is_an_error_result(rt):
    run = run_shim(rt, INIT_FAILS[rt])
    frames = after_hello(run, rt)
    assert frames[1:] == [IDLE]
    assert_error(frames[0], "result", "Error" if rt == "node" else "RuntimeError", "config missing")


def test_python_module_name_depends_on_the_entry():
    script = "if __name__ == '__main__':\n    print('main block ran')\n"
    run = run_shim("python", script)
    assert after_hello(run, "python") == [SCRIPT, IDLE]
    assert run.stdout == "main block ran\n"

    handler = (
        "import sys\n"
        "def handler(request, modules):\n"
        "    return [__name__, __file__, sys.modules[__name__].handler is handler, 'modules' in globals()]\n"
        "if __name__ == '__main__':\n"
        "    print('local test')\n"
    )
    run = run_shim("python", handler)
    assert after_hello(run, "python") == [ok(["__jailer_job__", "/tmp/.jailer-job/handler.py", True, False]), IDLE]
    assert run.stdout == ""


# ---------------------------------------------------------------------------------------------
# Node ES modules


ESM = "import { sep } from 'node:path';\nexport async function handler(request, modules) {\n  return { sep, request };\n}\n"


@pytest.mark.parametrize("filename", ["handler.mjs", "handler.js"])
def test_node_es_module(filename):
    run = run_shim("node", ESM, filename=filename, input=1)
    assert after_hello(run, "node") == [ok({"sep": "/", "request": 1}), IDLE]


def test_node_es_module_with_top_level_await_and_callback_style():
    code = (
        "const config = await Promise.resolve({ greeting: 'hi' });\n"
        "export const handler = (request, response, modules) => {\n"
        "  setTimeout(() => response.complete(`${config.greeting} ${request}`), 5);\n"
        "};\n"
    )
    run = run_shim("node", code, filename="handler.mjs", input="ann")
    assert after_hello(run, "node") == [ok("hi ann"), IDLE]


def test_node_es_module_syntax_error_names_the_line():
    code = "import fs from 'node:fs';\nexport const a = 1;\nconst b = ;\n"
    run = run_shim("node", code, filename="handler.mjs")
    frames = after_hello(run, "node")
    assert frames[1:] == [IDLE]
    stack = assert_error(frames[0], "result", "SyntaxError", "Unexpected token ';' (handler.mjs:3)")
    # /tmp/.jailer-job in a fresh jail; a unique sibling when several shims share one /tmp
    assert re.match(r"file:///tmp/\.jailer-job(-\w+)?/handler\.mjs:3\nconst b = ;\n\nSyntaxError: Unexpected token ';'$", stack)


def test_node_es_module_script_and_throw():
    run = run_shim("node", "console.log('esm script');\nexport {};\n", filename="job.mjs")
    assert after_hello(run, "node") == [SCRIPT, IDLE]
    assert run.stdout == "esm script\n"

    run = run_shim("node", "export const x = 1;\nthrow new TypeError('esm top');\n", filename="job.js")
    frames = after_hello(run, "node")
    assert frames[0] == SCRIPT and len(frames) == 2
    stack = assert_error(frames[1], "uncaught", "TypeError", "esm top")
    assert "file:///tmp/.jailer-job" in stack and "job.js:2:7" in stack
    assert run.exit_code == 1


def test_node_cjs_file_with_import_syntax_is_a_syntax_error():
    run = run_shim("node", "import fs from 'fs';\n", filename="handler.cjs")
    frames = after_hello(run, "node")
    assert frames[1:] == [IDLE]
    assert_error(frames[0], "result", "SyntaxError", "Cannot use import statement outside a module (handler.cjs:1)")


def test_node_require_and_dynamic_import_work_in_commonjs():
    code = (
        "const os = require('os');\n"
        "exports.handler = async () => [typeof os.cpus, (await import('node:path')).sep, __filename];\n"
    )
    run = run_shim("node", code)
    assert after_hello(run, "node") == [ok(["function", "/", "/tmp/.jailer-job/handler.js"]), IDLE]


# ---------------------------------------------------------------------------------------------
# Protocol details


@BOTH
def test_ping_pong_before_the_job(rt):
    run = run_shim(rt, SYNC_OK[rt], input={"x": 1}, pings=3)
    assert after_hello(run, rt) == [{"op": "pong"}] * 3 + [ok(2), IDLE]


@BOTH
def test_waits_for_the_job(rt):
    run = run_shim(rt, SYNC_OK[rt], send_job=False, timeout_s=0.8)
    assert run.timed_out and run.exit_code == -9
    assert run.ops == ["hello"]
    assert run.stdout == run.stderr == ""


@BOTH
def test_exits_70_when_the_host_hangs_up(rt):
    run = run_shim(rt, SYNC_OK[rt], hang_up_after_hello=True)
    assert run.ops == ["hello"]
    assert not run.timed_out
    assert run.exit_code == 70
    assert run.stdout == run.stderr == ""


@BOTH
def test_cannot_reach_the_broker(rt, tmp_path):
    import subprocess

    from shimhost import SHIM_ENV, shim_command

    proc = subprocess.Popen(
        shim_command(rt, str(tmp_path / "missing.sock")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SHIM_ENV,
    )
    try:
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 70
    assert out == b""
    assert err.startswith(b"jailer shim: cannot reach the broker socket: ")


@BOTH
def test_call_frame_over_the_limit_fails_in_the_handler(rt):
    code = {
        "node": "exports.handler = async (r, m) => {\n"
        "  try { await m.kv.set('k', 'x'.repeat(2000)); } catch (e) { return [e.name, e.message]; }\n"
        "};\n",
        "python": "def handler(request, modules):\n"
        "    try:\n"
        "        modules.kv.set('k', 'x' * 2000)\n"
        "    except modules.Error as e:\n"
        "        return [type(e).__name__, str(e)]\n",
    }[rt]
    run = run_shim(rt, code, extra_job_fields={"max_frame_bytes": 1024}, handlers={"kv": lambda a: None})
    frames = after_hello(run, rt)
    assert [f["op"] for f in frames] == ["result", "idle"]
    name, message = frames[0]["result"]
    assert name == "OutputTooLarge"
    assert message.startswith("modules.kv.set: the call is ")


def test_shims_import_nothing_heavy_at_start():
    # Start-up cost: a sync Python handler must not pull in json/re/socket/asyncio.
    code = "import sys\ndef handler(request, modules):\n    return sorted(m for m in sys.modules if m in ('json', 're', 'socket', 'asyncio', 'traceback', 'os'))\n"
    run = run_shim("python", code)
    assert after_hello(run, "python") == [ok([]), IDLE]
