"""jailer runtime shim for Python: runs inside the jail as `python3 -I -S /opt/jailer/shim.py SOCKET_PATH`.

Speaks docs/broker-protocol.md over the one broker socket: hello, pong, then on `job` compiles the
tenant code, runs the entry function (sync, async or callback style) or the file as a script, and
reports `result` / `script` / `uncaught` / `idle`. fd 1 and 2 belong to the tenant: nothing here
writes to them (except one diagnostic line if the broker cannot be reached at all).

The tenant module is named `__jailer_job__` when its top level mentions the entry name (a handler
file: its `if __name__ == "__main__":` block stays a local test), else `__main__` (a script: its
main block runs, as under `python3 script.py`). Either way it is registered in sys.modules.

Exit codes: 0 after `idle`, 1 after `uncaught`, 64 without a socket argument, 70 when the broker
connection fails, closes or breaks the protocol; anything else comes from tenant code (sys.exit).

Start-up cost matters (one fresh process per job): only built-in modules are imported at start
(sys, posix, _socket, _json, _thread). asyncio is imported only for an async handler, traceback
only to format an error.
"""

import sys

DEFAULT_MAX_FRAME_BYTES = 1024 * 1024  # includes the trailing b"\n"
JOB_DIR = "/tmp/.jailer-job"  # where the tenant file "lives" (tracebacks, __file__)
ERROR_TYPE_MAX = 200
ERROR_MESSAGE_MAX = 16 * 1024
ERROR_STACK_MAX = 64 * 1024
EX_USAGE = 64
EX_SOFTWARE = 70
SHIM_FILE = __file__


# ---------------------------------------------------------------------------------------------
# JSON without `import json` (which pulls in `re`, ~7 ms): the C accelerator that json uses.


def _make_codec():
    try:
        import _json

        class _Ctx:
            pass

        def bad_constant(name):
            raise ValueError(f"invalid JSON constant {name}")

        ctx = _Ctx()
        ctx.strict = True
        ctx.object_hook = None
        ctx.object_pairs_hook = None
        ctx.parse_float = float
        ctx.parse_int = int
        ctx.parse_constant = bad_constant
        ctx.memo = {}
        scan = _json.make_scanner(ctx)

        def default(o):
            raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

        def encoder(escape):
            # A fresh encoder per call: its circular-reference markers are not cleaned up on errors.
            return _json.make_encoder({}, default, escape, None, ":", ",", False, False, False)

        def loads(text):
            i = 0
            while i < len(text) and text[i] in " \t\r":
                i += 1
            try:
                obj, end = scan(text, i)
            except StopIteration as e:
                raise ValueError(f"invalid JSON at offset {e.value}") from None
            if text[end:].strip():
                raise ValueError(f"extra data at offset {end}")
            return obj

        def dumps(obj):
            text = "".join(encoder(_json.encode_basestring)(obj, 0))
            try:
                return text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: escape them, as JSON.stringify does
                return "".join(encoder(_json.encode_basestring_ascii)(obj, 0)).encode("ascii")

        dumps(["probe", 1, 1.5, None, True, {"k": "v"}])
        loads('{"probe":[1,1.5,null,true,"v"]}')
        return loads, dumps
    except (ImportError, AttributeError, TypeError, ValueError):  # another Python: the slow path
        import json

        enc = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        enc_ascii = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))

        def dumps(obj):
            try:
                return enc.encode(obj).encode("utf-8")
            except UnicodeEncodeError:
                return enc_ascii.encode(obj).encode("ascii")

        return json.loads, dumps


_loads, _dumps = _make_codec()


# ---------------------------------------------------------------------------------------------
# Helpers


def _truncate(s, limit):
    return s[:limit] + "...[truncated]" if len(s) > limit else s


def _flush_std():
    # Everything the tenant printed must be in the pipes before the host hears about the result.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _hard_exit(code):
    _flush_std()
    import posix

    posix._exit(code)


def _strip_shim_frames(te, seen):
    # TracebackException tree: drop the shim's own frames from each stack.
    if te is None or id(te) in seen:
        return
    seen.add(id(te))
    from traceback import StackSummary

    te.stack = StackSummary.from_list([f for f in te.stack if f.filename != SHIM_FILE])
    _strip_shim_frames(te.__cause__, seen)
    _strip_shim_frames(te.__context__, seen)


def _err_info(e, type_name=None):
    """Any exception -> {type, message, stack}. Never raises."""
    try:
        t = type_name or type(e).__name__
    except Exception:
        t = "Error"
    try:
        msg = str(e)
    except Exception:
        msg = f"<unprintable {t}>"
    try:
        import traceback

        te = traceback.TracebackException(type(e), e, e.__traceback__, compact=True)
        _strip_shim_frames(te, set())
        stack = "".join(te.format())
    except Exception:
        stack = ""
    return {
        "type": _truncate(t, ERROR_TYPE_MAX),
        "message": _truncate(msg, ERROR_MESSAGE_MAX),
        "stack": _truncate(stack, ERROR_STACK_MAX),
    }


def _value_err_info(value):
    """What response.error() was given -> {type, message, stack}."""
    if isinstance(value, BaseException):
        return _err_info(value)
    if isinstance(value, dict):
        return {
            "type": _truncate(str(value.get("type") or value.get("name") or "Error"), ERROR_TYPE_MAX),
            "message": _truncate(str(value.get("message", "")), ERROR_MESSAGE_MAX),
            "stack": _truncate(str(value.get("stack") or ""), ERROR_STACK_MAX),
        }
    try:
        msg = str(value)
    except Exception:
        msg = "<unprintable error>"
    return {"type": "Error", "message": _truncate(msg, ERROR_MESSAGE_MAX), "stack": ""}


class ModuleError(Exception):
    """A capability call failed. Raised as a subclass named after the broker's error type
    (`CapabilityDenied`, `QuotaExceeded`, ...); also available as `modules.Error`."""

    type = "Error"


_error_classes = {}


def _error_class(name):
    cls = _error_classes.get(name)
    if cls is None:
        cls = type(name, (ModuleError,), {"type": name, "__module__": "jailer"})
        _error_classes[name] = cls
    return cls


class _SourceLoader:
    """The tenant module's __loader__: linecache asks it for the source of a file it cannot stat."""

    def __init__(self, source):
        self._source = source

    def get_source(self, name):
        return self._source


class _Namespace:
    """An attribute bag (modules, modules.kv, ...)."""

    def __init__(self, name, **attrs):
        self.__dict__.update(attrs)
        self.__dict__["_name"] = name

    def __setattr__(self, key, value):
        raise AttributeError(f"{self._name} is read-only")

    def __repr__(self):
        return f"<{self._name}: {', '.join(k for k in self.__dict__ if not k.startswith('_'))}>"


# ---------------------------------------------------------------------------------------------
# Connection and framing


class _Conn:
    def __init__(self, path):
        import _socket
        import _thread

        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = bytearray()
        self.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES
        self.write_lock = _thread.allocate_lock()
        self.call_lock = _thread.allocate_lock()  # one call in flight (tenant threads queue up)
        self.next_id = 0

    def send_line(self, line):
        try:
            with self.write_lock:
                self.sock.sendall(line)
        except OSError:
            _hard_exit(EX_SOFTWARE)  # the host went away

    def encode(self, frame):
        """The frame as one line, or None if it would exceed the frame limit."""
        line = _dumps(frame) + b"\n"
        return line if len(line) <= self.max_frame_bytes else None

    def send(self, frame):
        line = self.encode(frame)
        if line is None:
            raise ValueError("frame too large")
        self.send_line(line)

    def read_frame(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                if i + 1 > self.max_frame_bytes:
                    _hard_exit(EX_SOFTWARE)
                if not line.strip():
                    continue
                try:
                    frame = _loads(line.decode("utf-8"))
                except (ValueError, UnicodeDecodeError, RecursionError):
                    _hard_exit(EX_SOFTWARE)
                if isinstance(frame, dict):
                    return frame
                continue
            if len(self.buf) >= self.max_frame_bytes:
                _hard_exit(EX_SOFTWARE)
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                _hard_exit(EX_SOFTWARE)  # the host hung up
            self.buf += data

    def call(self, cap, method, args):
        """One capability call: blocks until its reply (the frames in between are pings)."""
        with self.call_lock:
            self.next_id += 1
            cid = self.next_id
            try:
                line = self.encode({"op": "call", "id": cid, "cap": cap, "method": method, "args": args})
            except (TypeError, ValueError, RecursionError) as e:
                raise TypeError(f"modules.{cap}.{method}: arguments are not JSON-serialisable: {e}") from None
            if line is None:
                raise _error_class("OutputTooLarge")(
                    f"modules.{cap}.{method}: the call is too large for a frame (limit {self.max_frame_bytes} bytes)"
                )
            self.send_line(line)
            while True:
                frame = self.read_frame()
                op = frame.get("op")
                if op == "reply" and frame.get("id") == cid:
                    break
                if op == "ping":
                    self.send_line(b'{"op":"pong"}\n')
                # anything else (a stray reply, a second job) is dropped
        if frame.get("ok") is True:
            return frame.get("value")
        err = frame.get("error")
        err = err if isinstance(err, dict) else {}
        raise _error_class(str(err.get("type") or "Error"))(str(err.get("message") or ""))


def _make_modules(conn):
    call = conn.call

    def log_method(level):
        def log(msg, **fields):
            return call("log", level, {"msg": str(msg), "fields": fields})

        log.__name__ = level
        return log

    def kv_get(key):
        return call("kv", "get", {"key": key})

    def kv_set(key, value, ttl=None):
        args = {"key": key, "value": value}
        if ttl is not None:
            args["ttl"] = ttl
        return call("kv", "set", args)

    def kv_delete(key):
        return call("kv", "delete", {"key": key})

    def kv_list(prefix=""):
        return call("kv", "list", {"prefix": "" if prefix is None else str(prefix)})

    def fetch(url, method="GET", headers=None, body=None):
        return call("http", "fetch", {"url": str(url), "method": str(method), "headers": headers or {}, "body": body})

    def secret_get(name):
        return call("secrets", "get", {"name": name})

    def generic_call(cap, method, /, **args):
        """An operator-registered capability: modules.call("geo", "lookup", ip="10.0.0.1")."""
        return call(str(cap), str(method), args)

    warn = log_method("warn")
    return _Namespace(
        "modules",
        log=_Namespace(
            "modules.log", debug=log_method("debug"), info=log_method("info"), warn=warn, warning=warn,
            error=log_method("error"),
        ),
        kv=_Namespace("modules.kv", get=kv_get, set=kv_set, delete=kv_delete, list=kv_list),
        http=_Namespace("modules.http", fetch=fetch),
        secrets=_Namespace("modules.secrets", get=secret_get),
        call=generic_call,
        Error=ModuleError,
    )


# ---------------------------------------------------------------------------------------------
# The job


class _Job:
    def __init__(self, conn, frame):
        import _thread

        self.conn = conn
        self.entry = frame.get("entry") if isinstance(frame.get("entry"), str) and frame.get("entry") else "handler"
        name = frame.get("filename") if isinstance(frame.get("filename"), str) else ""
        base = name.rsplit("/", 1)[-1]
        self.base = base if base not in ("", ".", "..") else "handler.py"
        self.filename = f"{JOB_DIR}/{self.base}"
        self.source = frame.get("code") if isinstance(frame.get("code"), str) else ""
        self.request = frame.get("input")
        mfb = frame.get("max_frame_bytes")
        if isinstance(mfb, int) and not isinstance(mfb, bool) and mfb > 0:
            conn.max_frame_bytes = mfb
        self.script = False
        self.result_sent = False
        self.exiting = False
        self.lock = _thread.allocate_lock()

    # -- frames --------------------------------------------------------------------------------

    def send_result_error(self, info):
        with self.lock:
            if self.result_sent:
                return
            self.result_sent = True
        _flush_std()
        self.conn.send({"op": "result", "status": "error", "error": info})

    def complete_ok(self, value):
        with self.lock:
            if self.result_sent:
                return
        try:
            data = _dumps(value)
        except Exception as e:
            return self.send_result_error(
                {"type": "TypeError", "message": f"handler result is not JSON-serialisable: {e}", "stack": ""}
            )
        line = b'{"op":"result","status":"ok","result":' + data + b"}\n"
        if len(line) > self.conn.max_frame_bytes:
            return self.send_result_error(
                {
                    "type": "OutputTooLarge",
                    "message": f"handler result is {len(line)} bytes as a result frame;"
                    f" the limit is {self.conn.max_frame_bytes} bytes",
                    "stack": "",
                }
            )
        with self.lock:
            if self.result_sent:
                return
            self.result_sent = True
        _flush_std()
        self.conn.send_line(line)

    def complete_error(self, exc):
        if not self.result_sent:
            self.send_result_error(_err_info(exc))

    def uncaught(self, exc):
        """An exception nobody caught: report it and end the runtime."""
        with self.lock:
            if self.exiting:
                return
            self.exiting = True
        _flush_std()
        line = self.conn.encode({"op": "uncaught", "error": _err_info(exc)})
        if line is not None:
            self.conn.send_line(line)
        _hard_exit(1)

    def send_script(self):
        self.script = True
        _flush_std()
        self.conn.send_line(b'{"op":"script"}\n')

    def finish(self):
        """The tenant's work is done: wait for its threads, run atexit, send `idle`, exit 0."""
        self.hook_threads()
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()  # what interpreter exit does: stop executors, join threads
        if not self.script and not self.result_sent:
            self.result_sent = True
            _flush_std()
            self.conn.send_line(b'{"op":"result","status":"incomplete"}\n')
        import atexit

        atexit._run_exitfuncs()
        with self.lock:
            if self.exiting:
                return
            self.exiting = True
        _flush_std()
        self.conn.send_line(b'{"op":"idle"}\n')
        _hard_exit(0)

    def hook_threads(self):
        threading = sys.modules.get("threading")
        if threading is not None and getattr(threading.excepthook, "__self__", None) is not self:
            threading.excepthook = self.thread_excepthook

    def thread_excepthook(self, args):
        if args.exc_type is SystemExit:
            return
        self.uncaught(args.exc_value)

    # -- running -------------------------------------------------------------------------------

    def entry_fn(self, ns):
        fn = ns.get(self.entry)
        return fn if callable(fn) else None

    def run(self):
        try:
            code = compile(self.source, self.filename, "exec", dont_inherit=True)
        except Exception as e:  # SyntaxError, IndentationError, ValueError (null bytes), ...
            self.send_result_error(_err_info(e, "SyntaxError"))
            return self.finish()
        name = "__jailer_job__" if self.entry in code.co_names else "__main__"
        module = type(sys)(name)
        ns = module.__dict__
        ns["__file__"] = self.filename
        ns["__builtins__"] = sys.modules["builtins"]
        sys.modules[name] = module
        ns["__loader__"] = _SourceLoader(self.source)  # tracebacks show the tenant's source lines
        sys.argv = [self.filename]
        try:
            sys.stdout.reconfigure(line_buffering=True)  # output before a hang is not lost
        except Exception:
            pass
        try:
            exec(code, ns)
        except SystemExit:
            if self.entry_fn(ns) is None:
                self.send_script()
            raise
        except BaseException as e:
            if self.entry_fn(ns) is not None:  # a handler module that failed to initialise
                self.complete_error(e)
                return self.finish()
            self.send_script()
            self.uncaught(e)
        self.hook_threads()
        fn = self.entry_fn(ns)
        if fn is None:
            self.send_script()
            return self.finish()
        self.invoke(fn)
        self.finish()

    def invoke(self, fn):
        modules = _make_modules(self.conn)
        if _required_positional(fn) >= 3:
            response = _Namespace(
                "response", complete=self.complete_ok, success=self.complete_ok, error=self.response_error
            )

            def failed(exc):
                if self.result_sent:
                    self.uncaught(exc)
                else:
                    self.complete_error(exc)

            try:
                r = fn(self.request, response, modules)
            except SystemExit:
                raise
            except BaseException as e:
                return failed(e)
            if _is_awaitable(r):
                self.run_async(r, lambda task: failed(task.exception()) if task.exception() else None)
            return
        try:
            r = fn(self.request, modules)
        except SystemExit:
            raise
        except BaseException as e:
            return self.complete_error(e)
        if _is_awaitable(r):
            self.run_async(r, lambda task: self.complete_error(task.exception()) if task.exception() else self.complete_ok(task.result()))
        else:
            self.complete_ok(r)

    def response_error(self, err=None):
        if err is None:
            err = "response.error() called without an error"
        if not self.result_sent:
            self.send_result_error(_value_err_info(err))

    def run_async(self, awaitable, on_done):
        """Runs the handler's coroutine on a fresh asyncio loop until the loop has nothing left."""
        import asyncio

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        def exception_handler(loop, context):
            exc = context.get("exception")
            if exc is not None:  # a task exception never retrieved, an exception in a callback
                self.uncaught(exc)
            # messages without an exception ("Task was destroyed but it is pending!") are dropped

        loop.set_exception_handler(exception_handler)

        async def main():
            return await awaitable

        task = loop.create_task(awaitable if asyncio.iscoroutine(awaitable) else main())

        def done(t):
            if t.cancelled():
                return self.complete_error(asyncio.CancelledError("the handler's task was cancelled"))
            on_done(t)

        task.add_done_callback(done)
        self.run_loop_until_idle(loop, asyncio)

    def run_loop_until_idle(self, loop, asyncio):
        # The loop is idle when it would block forever: nothing ready, no timer, no file descriptor
        # but its own wake-up pipe, no executor job in flight and no other thread that might call
        # back into it (those are polled).
        in_executor = [0]
        real_run_in_executor = loop.run_in_executor

        def run_in_executor(executor, func, *args):
            fut = real_run_in_executor(executor, func, *args)
            in_executor[0] += 1
            fut.add_done_callback(lambda f: in_executor.__setitem__(0, in_executor[0] - 1))
            return fut

        loop.run_in_executor = run_in_executor
        selector = loop._selector
        real_select = selector.select
        idle = [False]

        def select(timeout=None):
            if timeout is None and in_executor[0] == 0 and len(selector.get_map()) <= 1:
                if _other_threads_alive():
                    timeout = 0.05
                else:
                    idle[0] = True
                    loop.stop()
                    return []
            return real_select(timeout)

        selector.select = select
        while not idle[0]:
            try:
                loop.run_forever()  # returns on idle, or when tenant code stops the loop
            except Exception as e:  # tenant code closed the loop, or similar
                self.uncaught(e)
        # Finished tasks whose exception nobody retrieved (the task is still referenced somewhere,
        # so the garbage collector did not report it).
        for t in list(getattr(asyncio.tasks, "_all_tasks", ())):
            try:
                if t.get_loop() is loop and t.done() and not t.cancelled() and t._log_traceback:
                    t._log_traceback = False
                    self.uncaught(t.exception())
            except Exception:
                pass


def _other_threads_alive():
    threading = sys.modules.get("threading")
    if threading is None:
        return False
    main = threading.main_thread()
    for t in threading.enumerate():
        if t is main or t.daemon or t.name.startswith("asyncio_"):  # idle default-executor workers
            continue
        return True
    return False


def _is_awaitable(value):
    return hasattr(type(value), "__await__")


def _required_positional(fn):
    """Positional parameters without a default (JavaScript's Function.length), or 0 if unknown."""
    try:
        drop = 0
        f = fn
        if not hasattr(f, "__code__") and hasattr(f, "__func__"):  # bound method
            f, drop = f.__func__, 1
        if not hasattr(f, "__code__"):
            call = getattr(type(f), "__call__", None)
            if call is None or not hasattr(call, "__code__"):
                return 0
            f, drop = call, 1
        code = f.__code__
        return code.co_argcount - len(f.__defaults__ or ()) - drop
    except Exception:
        return 0


# ---------------------------------------------------------------------------------------------


def _main(argv):
    if len(argv) < 2:
        sys.stderr.write("usage: python3 -I -S shim.py SOCKET_PATH\n")
        return EX_USAGE
    import posix

    try:
        conn = _Conn(argv[1])
    except OSError as e:
        sys.stderr.write(f"jailer shim: cannot reach the broker socket: {e}\n")
        return EX_SOFTWARE
    version = sys.version.split()[0]
    conn.send({"op": "hello", "runtime": "python", "version": version, "pid": posix.getpid()})
    while True:
        frame = conn.read_frame()
        op = frame.get("op")
        if op == "ping":
            conn.send_line(b'{"op":"pong"}\n')
        elif op == "job":
            break
    _Job(conn, frame).run()  # exits the process


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
