"""How the tests start a tool of bin/: as users do, `python -m bin.<name>` or through the `bin/<name>` launcher."""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# XLA:CPU's cheap code generation for the suite and the tools it starts: the suite is bound by compiling many small
# programs. The cheap LLVM pipeline, and the loop emitters instead of the MLIR fusion emitters (which cost most
# of a small program's compile); the HLO passes (what a program computes) are the same (BUILD.md "Tests").
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


def run_tool(name: str, *args: str, launcher: bool = False, env: dict | None = None,
             timeout: float = 300, cwd: Path = ROOT, fork: bool = True) -> subprocess.CompletedProcess:
    """Run bin/<name> with this interpreter on CPU (no fake devices unless the tool makes its own).

    launcher=False: `python -m bin.<name>` from the repo root, by default in a process forked from a server that
    has jax and the packages imported (`forked_tool`), with fork=False in a new interpreter; True: the
    `bin/<name>` launcher script (from cwd), a new interpreter.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE, "PYTHON": sys.executable, **(env or {})}
    if fork and not launcher and _jax_settings(env) == _jax_settings(_server_env()):
        return forked_tool(name, list(args), env=env, timeout=timeout, cwd=cwd)
    cmd = [str(ROOT / "bin" / name)] if launcher else [sys.executable, "-m", f"bin.{name}"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


# What every tool imports first. A new interpreter spends seconds importing these before it reads its first
# flag, and the suite starts tools many times (BUILD.md "Tests"); the tool server imports them once per xdist
# worker. Importing them runs no computation (no JAX backend exists until a tool makes one, in its own forked
# process), so a forked tool reads its environment, flags and files exactly as `python -m bin.<name>` would.
PRELOAD = ("numpy", "jax", "jax.numpy", "optax", "orbax.checkpoint", "absl.app", "absl.flags", "model", "grpo",
           "data", "grpo.report")
_server: subprocess.Popen | None = None
_unread = b""  # what the server wrote past its last line read


def forked_tool(name: str, argv: list[str], *, env: dict, timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m bin.<name> *argv` forked from this process's tool server (`_serve`): (exit status, stdout,
    stderr) as a subprocess's. The child takes `env` as its whole environment before anything reads it, runs the
    module as __main__ from `cwd` (first on its module path, as `python -m` puts it) with stdin /dev/null and
    fds 1 and 2 written to files, and exits with the status a `python -m` process would have (atexit handlers
    run, e.g. orbax's pending writes)."""
    server = _tool_server()
    with tempfile.TemporaryDirectory(prefix="aha-tool-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        request = {"name": name, "argv": argv, "env": env, "cwd": str(cwd), "out": str(out), "err": str(err)}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        pid = _reply(server, timeout)["pid"]
        try:
            code = _reply(server, timeout)["status"]
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            _reply(server, 60)
            raise subprocess.TimeoutExpired([f"bin.{name}", *argv], timeout) from None
        return subprocess.CompletedProcess([f"bin.{name}", *argv], code, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


def _tool_server() -> subprocess.Popen:
    """This process's tool server, started at the first call (again if it died): `_serve` in a new interpreter
    with the tools' CPU environment, reading requests on its stdin until this process goes."""
    global _server, _unread
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, "-c", "import binaries; binaries._serve()"], cwd=ROOT,
                                   env=_server_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        _unread = b""
    return _server


def _server_env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE,
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)])}


def _jax_settings(env: dict) -> dict:
    """The environment variables jax reads when it is imported (the server's are fixed then): a tool asked to run
    with other ones starts as a new interpreter."""
    return {k: v for k, v in env.items() if k.startswith("JAX_")}


def _reply(server: subprocess.Popen, timeout: float) -> dict:
    """The server's next line as a dict, or TimeoutExpired after `timeout` seconds without one. Read straight
    from the pipe: a buffered readline could take both of a fast tool's lines, and select would then wait on an
    empty pipe for the second."""
    global _unread
    deadline = time.monotonic() + timeout
    while b"\n" not in _unread:
        if not select.select([server.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise subprocess.TimeoutExpired("tool server", timeout)
        chunk = os.read(server.stdout.fileno(), 1 << 16)
        if not chunk:
            raise RuntimeError(f"the tool server exited with status {server.wait()}")
        _unread += chunk
    line, _, _unread = _unread.partition(b"\n")
    return json.loads(line)


def _serve() -> None:
    """The tool server: PRELOAD imported once, then per request line one forked child running the tool;
    answers {"pid": ...} when it starts and {"status": ...} (exit status, -N for signal N) when it ends."""
    for module in PRELOAD:
        importlib.import_module(module)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            _tool_main(**json.loads(line))
        print(json.dumps({"pid": pid}), flush=True)
        print(json.dumps({"status": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)


def _tool_main(name: str, argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked child: `python -m bin.<name>`, then os._exit with its status."""
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
        f = os.open(path, mode | (os.O_CREAT | os.O_TRUNC if fd else 0), 0o600)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path.insert(0, cwd)
    sys.argv = [f"bin.{name}", *argv]
    code = 0
    try:
        runpy.run_module(f"bin.{name}", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # as the interpreter reads it: None is 0, a number its status, anything else printed, 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - uncaught: the traceback and status 1, as the interpreter does
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# The resilience tests (kill/resume, damage, multi-host) pin the loop they were written for: TinyZero's puzzles,
# full fine-tuning, every group in the loss. bin/train's defaults moved on (the ladder, LoRA rank 16, the
# zero-std filter); test_train_cli.py runs those defaults end to end.
CLASSIC_LOOP = ("--curriculum=off", "--lora_rank=0", "--noskip_zero_std_groups")


def train_in_process(args: list[str], capsys) -> subprocess.CompletedProcess:
    """bin/train's main on this command line in the test process (`bin.train.run(argv)` under absl's flagsaver):
    (exit status, stdout, stderr) as a subprocess's, for checks that are not about the process boundary. The
    process has the suite's 8 fake CPU devices (tests/conftest.py), where `run_tool` gives bin/train one."""
    from absl.testing import flagsaver

    from bin import train as train_bin

    with flagsaver.flagsaver():
        try:
            train_bin.run(["bin/train", *args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)
