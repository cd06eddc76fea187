'use strict';
// jailer runtime shim for Node.js. Runs inside the jail as `node /opt/jailer/shim.js SOCKET_PATH`.
//
// Speaks docs/broker-protocol.md over the one broker socket: hello, pong, then on `job` loads the
// tenant code (CommonJS, or an ES module), runs the entry function or the file as a script, and
// reports `result` / `script` / `uncaught` / `idle`. fd 1 and 2 belong to the tenant: nothing here
// writes to them (except one diagnostic line if the broker cannot be reached at all).
//
// Exit codes: 0 after `idle` (a script exits with its own process.exitCode), 1 after `uncaught`,
// 64 without a socket argument, 70 when the broker connection fails, closes or breaks the protocol;
// anything else comes from tenant code calling process.exit().
//
// Start-up cost matters (one fresh process per job): only cheap core modules are loaded, and 'vm'
// (~0.2 ms) once the job is known: its compileFunction tells a syntax error (or ES module syntax)
// apart from an exception thrown by the top level before any tenant code runs.

const net = require('net');
const fs = require('fs');
const path = require('path');
const url = require('url');
const Module = require('module');

const DEFAULT_MAX_FRAME_BYTES = 1024 * 1024; // includes the trailing '\n'
const JOB_DIR = '/tmp/.jailer-job'; // where the tenant file "lives" (ES modules are written there)
const ERROR_TYPE_MAX = 200;
const ERROR_MESSAGE_MAX = 16 * 1024;
const ERROR_STACK_MAX = 64 * 1024;
const EX_USAGE = 64;
const EX_SOFTWARE = 70;
// CommonJS parse errors that mean "this is an ES module" (the ones Node's own detection uses).
const ESM_SYNTAX = /^(Cannot use import statement outside a module|Unexpected token 'export'|Cannot use 'import\.meta' outside a module|await is only valid in async functions and the top level bodies of modules)/;

// Captured before tenant code runs: tenant code (or a library it loads) may patch the globals.
const stringify = JSON.stringify;
const parse = JSON.parse;
const byteLength = Buffer.byteLength;
const ErrorCtor = Error;
const SyntaxErrorCtor = SyntaxError;
const exit = process.exit.bind(process);
const hasOwn = Function.prototype.call.bind(Object.prototype.hasOwnProperty);

let maxFrameBytes = DEFAULT_MAX_FRAME_BYTES;
// phase: waiting (no job yet) -> evaluating (module top level runs) -> handler | script
const state = {
  phase: 'waiting',
  resultSent: false,
  exiting: false,
  entry: 'handler',
  exportsOf: null, // () => the CommonJS exports while evaluating, for the 'exit' hook
  jobDir: null, // a directory this process created for an ES module, removed at exit
};

// ---------------------------------------------------------------------------------------------
// Connection and framing

const socketPath = process.argv[2];
if (!socketPath) {
  process.stderr.write('usage: node shim.js SOCKET_PATH\n');
  exit(EX_USAGE);
}

const sock = net.createConnection(socketPath);
let connected = false;
sock.on('connect', () => { connected = true; });
sock.on('error', (err) => {
  if (!connected) process.stderr.write(`jailer shim: cannot reach the broker socket: ${err.message}\n`);
  exit(EX_SOFTWARE);
});
sock.on('close', () => { if (!state.exiting) exit(EX_SOFTWARE); });

function writeLine(line) {
  sock.write(line);
}

// Serialises and sends one frame; returns false (sends nothing) if it would exceed the frame limit.
function send(obj) {
  const line = stringify(obj) + '\n';
  if (byteLength(line) > maxFrameBytes) return false;
  writeLine(line);
  return true;
}

// Writes the last frames and exits once they have left the process.
function sendThenExit(lines, code) {
  state.exiting = true;
  sock.ref();
  for (let i = 0; i < lines.length - 1; i++) writeLine(lines[i]);
  sock.write(lines[lines.length - 1], () => exit(code));
  if (sock.writableLength === 0) exit(code); // written synchronously (the usual case)
}

let pending = null; // bytes of an incomplete frame
sock.on('data', (chunk) => {
  let buf = pending === null ? chunk : Buffer.concat([pending, chunk]);
  let start = 0;
  let nl;
  while ((nl = buf.indexOf(10, start)) !== -1) {
    if (nl + 1 - start > maxFrameBytes) return protocolError();
    const text = buf.toString('utf8', start, nl);
    start = nl + 1;
    if (text.trim() === '') continue;
    let frame;
    try {
      frame = parse(text);
    } catch (e) {
      return protocolError();
    }
    if (frame !== null && typeof frame === 'object') onFrame(frame);
  }
  pending = start < buf.length ? buf.subarray(start) : null;
  if (pending !== null && pending.length >= maxFrameBytes) protocolError();
});

function protocolError() {
  // The host broke the protocol (unparsable or oversized frame): nothing sensible is left to do.
  state.exiting = true;
  exit(EX_SOFTWARE);
}

function onFrame(frame) {
  switch (frame.op) {
    case 'ping':
      if (state.phase === 'waiting' && !state.warmedUp) warmUp();
      writeLine('{"op":"pong"}\n');
      break;
    case 'job':
      if (state.phase === 'waiting') startJob(frame);
      break;
    case 'reply':
      onReply(frame);
      break;
    default: // unknown ops are ignored (forward compatibility)
  }
}

send({ op: 'hello', runtime: 'node', version: process.version, pid: process.pid });

// ---------------------------------------------------------------------------------------------
// Errors

function truncate(s, max) {
  return s.length > max ? s.slice(0, max) + '...[truncated]' : s;
}

const FRAME = /^\s+at /;
const INTERNAL_FRAME = /^\s+at (?:.*\()?(?:node:|<anonymous>\)?$)/;

// Drops the shim's own frames from a stack trace, and the runtime plumbing below the tenant's
// frames (event emitters, timers, the module loader): they only show how the shim got there.
function cleanStack(stack) {
  const lines = stack.split('\n').filter((l) => !l.includes(__filename));
  if (lines.some((l) => FRAME.test(l) && !INTERNAL_FRAME.test(l))) {
    while (lines.length > 0 && INTERNAL_FRAME.test(lines[lines.length - 1])) lines.pop();
  }
  return lines.join('\n');
}

function describe(value) {
  try {
    const s = stringify(value);
    if (typeof s === 'string') return s;
  } catch (e) { /* fall through */ }
  try {
    return String(value);
  } catch (e) {
    return '<unprintable value>';
  }
}

// Any thrown value -> {type, message, stack}. Never throws (tenant objects may have hostile getters).
function errInfo(e) {
  let type = 'Error';
  let message = '';
  let stack = '';
  try {
    if (e !== null && (typeof e === 'object' || typeof e === 'function')) {
      const name = e.name;
      const msg = e.message;
      const st = e.stack;
      let ctor = '';
      try { ctor = (e.constructor && e.constructor.name) || ''; } catch (x) { /* ignore */ }
      // `class MyError extends Error {}` keeps name 'Error': report the class instead.
      if (typeof name === 'string' && name && (name !== 'Error' || !ctor)) type = name;
      else if (ctor && ctor !== 'Object') type = ctor;
      message = msg === undefined ? describe(e) : String(msg);
      stack = typeof st === 'string' ? cleanStack(st) : '';
    } else {
      message = String(e);
    }
  } catch (x) {
    message = message || '<unprintable error>';
  }
  return {
    type: truncate(String(type), ERROR_TYPE_MAX),
    message: truncate(message, ERROR_MESSAGE_MAX),
    stack: truncate(stack, ERROR_STACK_MAX),
  };
}

// The location of a parse error, from V8's decorated stack ("file:LINE\nsource\n   ^^^\n\nSyntaxError: ...").
function syntaxInfo(e, displayName) {
  const info = errInfo(e);
  const head = info.stack.split('\n    at ')[0];
  const m = /^(.*):(\d+)\n/.exec(head);
  info.type = 'SyntaxError';
  if (m) {
    info.message = `${info.message} (${displayName}:${m[2]})`;
    info.stack = head.replace(/\n+$/, '');
  }
  return info;
}

// ---------------------------------------------------------------------------------------------
// Result, uncaught, idle

function sendResultError(info) {
  if (state.resultSent) return;
  state.resultSent = true;
  send({ op: 'result', status: 'error', error: info });
}

function completeOk(value) {
  if (state.resultSent) return;
  let json;
  try {
    json = stringify(value === undefined ? null : value);
  } catch (e) {
    return sendResultError({ type: 'TypeError', message: `handler result is not JSON-serialisable: ${errInfo(e).message}`, stack: '' });
  }
  if (json === undefined) {
    return sendResultError({ type: 'TypeError', message: `handler result is not JSON-serialisable: a ${typeof value}`, stack: '' });
  }
  const line = '{"op":"result","status":"ok","result":' + json + '}\n';
  const size = byteLength(line);
  if (size > maxFrameBytes) {
    return sendResultError({
      type: 'OutputTooLarge',
      message: `handler result is ${size} bytes as a result frame; the limit is ${maxFrameBytes} bytes`,
      stack: '',
    });
  }
  state.resultSent = true;
  writeLine(line);
}

function completeError(err) {
  if (state.resultSent) return;
  sendResultError(errInfo(err));
}

// An exception nobody caught: report it and end the runtime (like Node itself would).
function uncaught(err) {
  if (state.exiting) return;
  sendThenExit([stringify({ op: 'uncaught', error: errInfo(err) }) + '\n'], 1);
}

process.on('uncaughtException', (err) => uncaught(err));
process.on('unhandledRejection', (reason) => uncaught(reason));

// The event loop is empty: nothing tenant code started is left (calls in flight keep the socket
// referenced, so they keep the loop alive).
process.on('beforeExit', () => {
  if (state.exiting || state.phase === 'waiting') return;
  const lines = [];
  if (state.phase !== 'script' && !state.resultSent) {
    state.resultSent = true;
    lines.push('{"op":"result","status":"incomplete"}\n');
  }
  lines.push('{"op":"idle"}\n');
  // A script exits with the code it set (process.exitCode); a handler's job ends with 0.
  sendThenExit(lines, state.phase === 'script' ? process.exitCode : 0);
});

// Tenant code called process.exit(): its top level had not finished, so unless it had already
// exported the entry function this was a script.
process.on('exit', () => {
  if (state.phase === 'evaluating' && !state.exiting) {
    state.exiting = true;
    if (!entryOf(state.exportsOf ? state.exportsOf() : null)) {
      try { writeLine('{"op":"script"}\n'); } catch (e) { /* the host maps the exit code anyway */ }
    }
  }
  if (state.jobDir) {
    try { fs.rmSync(state.jobDir, { recursive: true, force: true }); } catch (e) { /* best effort */ }
  }
});

// ---------------------------------------------------------------------------------------------
// Capability calls (modules)

let nextCallId = 1;
const calls = new Map();

function call(cap, method, args) {
  const err = new ErrorCtor(); // captured here so a failure points at the tenant's call site
  return new Promise((resolve, reject) => {
    const id = nextCallId++;
    let line;
    try {
      line = stringify({ op: 'call', id, cap, method, args }) + '\n';
    } catch (e) {
      err.name = 'TypeError';
      err.message = `modules.${cap}.${method}: arguments are not JSON-serialisable: ${errInfo(e).message}`;
      return reject(err);
    }
    const size = byteLength(line);
    if (size > maxFrameBytes) {
      err.name = 'OutputTooLarge';
      err.message = `modules.${cap}.${method}: the call is ${size} bytes as a frame; the limit is ${maxFrameBytes} bytes`;
      return reject(err);
    }
    if (calls.size === 0) sock.ref(); // a call in flight keeps the runtime alive
    calls.set(id, { resolve, reject, err });
    writeLine(line);
  });
}

function onReply(frame) {
  const c = calls.get(frame.id);
  if (c === undefined) return;
  calls.delete(frame.id);
  if (calls.size === 0 && state.phase !== 'waiting') sock.unref();
  if (frame.ok === true) {
    c.resolve(frame.value === undefined ? null : frame.value);
  } else {
    const e = frame.error !== null && typeof frame.error === 'object' ? frame.error : {};
    c.err.name = String(e.type || 'Error');
    c.err.message = String(e.message === undefined || e.message === null ? '' : e.message);
    c.reject(c.err);
  }
}

function orNull(v) {
  return v === undefined ? null : v;
}

function makeModules() {
  const log = (level) => (msg, fields) => call('log', level, {
    msg: String(msg),
    fields: fields === undefined || fields === null ? {} : fields,
  });
  return Object.freeze({
    log: Object.freeze({ debug: log('debug'), info: log('info'), warn: log('warn'), error: log('error') }),
    kv: Object.freeze({
      get: (key) => call('kv', 'get', { key: orNull(key) }),
      set: (key, value, opts) => {
        const args = { key: orNull(key), value: orNull(value) };
        if (opts && opts.ttl !== undefined && opts.ttl !== null) args.ttl = opts.ttl;
        return call('kv', 'set', args);
      },
      delete: (key) => call('kv', 'delete', { key: orNull(key) }),
      list: (prefix) => call('kv', 'list', { prefix: prefix === undefined || prefix === null ? '' : String(prefix) }),
    }),
    http: Object.freeze({
      fetch: (target, opts) => {
        const o = opts || {};
        return call('http', 'fetch', {
          url: String(target),
          method: o.method ? String(o.method) : 'GET',
          headers: o.headers || {},
          body: orNull(o.body),
        });
      },
    }),
    secrets: Object.freeze({ get: (name) => call('secrets', 'get', { name: orNull(name) }) }),
    // Operator-registered capabilities: modules.call('geo', 'lookup', {ip}).
    call: (cap, method, args) => call(String(cap), String(method), args === undefined || args === null ? {} : args),
  });
}

// ---------------------------------------------------------------------------------------------
// The job

function safeBase(name, fallback) {
  const base = typeof name === 'string' ? path.basename(name) : '';
  return base && base !== '.' && base !== '..' ? base : fallback;
}

// The exported entry function, or null (never a method every object inherits).
function entryOf(exportsObj) {
  try {
    if (exportsObj === null || exportsObj === undefined) return null;
    const fn = exportsObj[state.entry];
    if (typeof fn !== 'function') return null;
    if (!hasOwn(exportsObj, state.entry) &&
        (fn === Object.prototype[state.entry] || fn === Function.prototype[state.entry])) return null;
    return fn;
  } catch (e) {
    return null;
  }
}

function startJob(job) {
  state.phase = 'evaluating';
  sock.unref(); // from here on only tenant work (and calls in flight) keep the runtime alive
  if (Number.isInteger(job.max_frame_bytes) && job.max_frame_bytes > 0) maxFrameBytes = job.max_frame_bytes;
  if (typeof job.entry === 'string' && job.entry) state.entry = job.entry;
  const base = safeBase(job.filename, 'handler.js');
  const code = typeof job.code === 'string' ? job.code : '';
  const input = job.input === undefined ? null : job.input;
  const ext = path.extname(base);
  if (ext === '.mjs') return runEsm(code, base, input);
  const filename = path.join(JOB_DIR, base);
  // Parse first, as CommonJS, so a syntax error is told apart from an error thrown by the top level.
  let compileError = null;
  try {
    require('vm').compileFunction(code, ['exports', 'require', 'module', '__filename', '__dirname'], { filename });
  } catch (e) {
    compileError = e;
  }
  if (compileError !== null) {
    if (ext !== '.cjs' && compileError instanceof SyntaxErrorCtor && ESM_SYNTAX.test(compileError.message)) {
      return runEsm(code, base, input);
    }
    state.phase = 'handler';
    return sendResultError(syntaxInfo(compileError, base));
  }
  runCjs(code, filename, input);
}

// A pooled jail is pinged once before it waits: run the job path on a throwaway module then, so
// the real job does not pay V8's lazy compilation of it (~1-2 ms). Nothing of it stays reachable:
// the module is not cached, no frame is sent, and tenant code has not been loaded yet.
function warmUp() {
  state.warmedUp = true;
  try {
    const code = 'exports.handler = async (r, m) => ({ ok: r.x });';
    const filename = path.join(JOB_DIR, 'warmup.js');
    require('vm').compileFunction(code, ['exports', 'require', 'module', '__filename', '__dirname'], { filename });
    const m = new Module(filename, null);
    m.filename = filename;
    m.paths = Module._nodeModulePaths(path.dirname(filename));
    m._compile(code, filename);
    const fn = entryOf(m.exports);
    Promise.resolve(fn.call(m.exports, { x: 1 }, makeModules())).then((v) => stringify(v), () => {});
  } catch (e) { /* only a warm-up */ }
}

function runCjs(code, filename, input) {
  const m = new Module(filename, null);
  m.filename = filename;
  m.paths = Module._nodeModulePaths(path.dirname(filename));
  process.argv = [process.argv[0], filename];
  state.exportsOf = () => m.exports;
  try {
    m._compile(code, filename);
  } catch (e) {
    state.exportsOf = null;
    return topLevelThrew(e, entryOf(m.exports));
  }
  state.exportsOf = null;
  m.loaded = true;
  afterEvaluation(m.exports, input);
}

// A top-level exception: a handler module that failed to initialise (if it had already exported
// the entry function), otherwise a script that threw.
function topLevelThrew(err, entryFn) {
  if (entryFn) {
    state.phase = 'handler';
    return completeError(err);
  }
  state.phase = 'script';
  writeLine('{"op":"script"}\n');
  uncaught(err);
}

function afterEvaluation(exportsObj, input) {
  const fn = entryOf(exportsObj);
  if (fn === null) {
    state.phase = 'script';
    writeLine('{"op":"script"}\n');
    return;
  }
  state.phase = 'handler';
  invoke(fn, exportsObj, input);
}

function invoke(fn, thisArg, input) {
  const modules = makeModules();
  if (fn.length >= 3) {
    // Callback style: finished by response.complete(body) / response.error(err).
    const response = Object.freeze({
      complete: (body) => completeOk(body),
      success: (body) => completeOk(body),
      error: (err) => completeError(err === undefined ? 'response.error() called without an error' : err),
    });
    const failed = (e) => (state.resultSent ? uncaught(e) : completeError(e));
    let r;
    try {
      r = fn.call(thisArg, input, response, modules);
    } catch (e) {
      return failed(e);
    }
    if (r !== null && (typeof r === 'object' || typeof r === 'function')) Promise.resolve(r).then(undefined, failed);
    return;
  }
  let r;
  try {
    r = fn.call(thisArg, input, modules);
  } catch (e) {
    return completeError(e);
  }
  if (r !== null && (typeof r === 'object' || typeof r === 'function')) {
    Promise.resolve(r).then(completeOk, completeError);
  } else {
    completeOk(r);
  }
}

// ---------------------------------------------------------------------------------------------
// ES modules: written to a fresh directory and imported.

function makeJobDir() {
  try {
    fs.mkdirSync(JOB_DIR, { mode: 0o700 });
    return JOB_DIR;
  } catch (e) {
    if (e.code !== 'EEXIST') throw e;
    return fs.mkdtempSync(JOB_DIR + '-'); // not a fresh jail (tests, several shims on one host)
  }
}

function runEsm(code, base, input) {
  let file;
  try {
    const dir = makeJobDir();
    state.jobDir = dir;
    // .js keeps its name (stack traces) and becomes a module through package.json.
    if (base.endsWith('.js')) fs.writeFileSync(path.join(dir, 'package.json'), '{"type":"module"}');
    file = path.join(dir, base.endsWith('.js') || base.endsWith('.mjs') ? base : base + '.mjs');
    fs.writeFileSync(file, code);
  } catch (e) {
    state.phase = 'handler';
    return sendResultError({ type: 'InternalError', message: `cannot write the ES module under /tmp: ${errInfo(e).message}`, stack: '' });
  }
  const fileUrl = url.pathToFileURL(file).href;
  process.argv = [process.argv[0], file];
  import(fileUrl).then(
    (ns) => afterEvaluation(ns, input),
    (e) => {
      if (e instanceof SyntaxErrorCtor && !stackMentions(e, fileUrl)) {
        // Parsing or linking failed: nothing ran.
        state.phase = 'handler';
        return sendResultError(esmSyntaxInfo(e, code, base, file));
      }
      topLevelThrew(e, null); // the namespace of a failed module is unreachable
    },
  );
}

function stackMentions(e, fileUrl) {
  try {
    return String(e.stack).split('\n').some((l) => l.startsWith('    at ') && l.includes(fileUrl + ':'));
  } catch (x) {
    return false;
  }
}

function esmSyntaxInfo(e, code, base, file) {
  const info = syntaxInfo(e, base);
  if (/^.*:\d+\n/.test(String(e.stack))) return info; // decorated: link errors ("does not provide an export")
  // V8 does not expose where a module failed to parse. Best effort: parse the source again as the
  // body of a strict async function with its import/export declarations blanked out (same lines).
  info.stack = info.stack.split('\n    at ')[0];
  const line = locateModuleSyntaxError(code, file);
  if (line !== null) {
    const src = code.split('\n')[line - 1];
    info.message = `${info.message} (${base}:${line})`;
    info.stack = `${url.pathToFileURL(file).href}:${line}\n${src === undefined ? '' : src}\n\n${info.stack}`;
  }
  return info;
}

function locateModuleSyntaxError(code, file) {
  const blank = (s) => s.replace(/[^\n]/g, ' ');
  const src = code
    .replace(/\bimport\s*(?:[\w$*{}\s,]+?\s*from\s*)?(['"])[^'"\n]*\1/g, blank)
    .replace(/\bimport\.meta\b/g, 'Object     ')
    .replace(/\bexport\s*(?:\*\s*(?:as\s+[\w$]+\s*)?from\s*(['"])[^'"\n]*\1|\{[^}]*\}(?:\s*from\s*(['"])[^'"\n]*\2)?)/g, blank)
    .replace(/\bexport\s+default\b/g, (m) => 'void' + blank(m.slice(4)))
    .replace(/\bexport(?=\s+(?:async\s+function|function|class|const|let|var)\b)/g, blank);
  try {
    const vm = require('vm');
    new vm.Script(`(async function () {'use strict';${src}\n})`, { filename: url.pathToFileURL(file).href });
  } catch (e) {
    const m = /^.*:(\d+)\n/.exec(String(e && e.stack));
    if (m) return Number(m[1]);
  }
  return null;
}
