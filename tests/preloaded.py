"""Processes forked from a server that has already imported torch, DeepSpeed and megaloop, for tests.

A fresh `python pretrain_looped.py` (or a `spawn`ed rank) spends ~5-7 CPU-seconds importing torch, DeepSpeed and
megaloop before it does anything; with ~150 such processes the imports were the largest cost of the suite on 2
cores. multiprocessing's `forkserver` imports them once per test session, in a clean single-threaded server (not
the pytest process, whose threads and state a plain `fork` would copy), and forks every process from it.

- `context()`: the multiprocessing context (tests/dist_utils.py starts its ranks with it);
- `run_python(args, cwd, env, timeout)`: `subprocess.run([sys.executable, *args], ...)` with captured output, in
  such a process; `start_script(...)` starts one without waiting (tests/test_train_support.py's ranks). The
  script runs as `python script argv...` / `python -c CODE` would: the caller's environment and working
  directory, `sys.argv`, `sys.path[0]`, `__name__ == "__main__"`, stdout and stderr redirected at file
  descriptors 1 and 2 (C++ output too), the exit code from `sys.exit` / an uncaught exception.

What differs from a fresh interpreter: modules imported by the server are not re-imported, so an environment
variable read at import time by torch / DeepSpeed / megaloop keeps the pytest process's value (DS_ACCELERATOR=cpu
for every test), and atexit handlers do not run (megaloop registers none).
"""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile

import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "deepspeed", "megaloop.training.cli", "megaloop.training.trainer",
           "torch.utils.tensorboard"]
_CONTEXT = None


def context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload([m for m in PRELOAD if _importable(m)])
    return _CONTEXT


def _importable(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def apply_env(env: dict) -> None:
    """The process's environment becomes exactly `env` (a forked process starts with the server's, frozen at
    the server's start)."""
    os.environ.clear()
    os.environ.update(env)


def run_script(script: str, argv, env: dict, cwd: str, out_path: str, err_path: str = None) -> None:
    """`python script argv...` (or `python -c CODE argv...` when script is "-c", argv[0] the code)."""
    apply_env(env)
    os.chdir(cwd)
    for fd_target, path in ((1, out_path), (2, err_path or out_path)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, fd_target)
        os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if script == "-c":
        code, sys.argv = argv[0], ["-c", *map(str, argv[1:])]
        sys.path.insert(0, "")
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        return
    sys.argv = [script, *map(str, argv)]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


def start_script(script: str, argv, env: dict, cwd: str, out_path: str, err_path: str = None):
    """A started (non-daemonic: the script may start processes of its own) process running `script`."""
    p = context().Process(target=run_script, args=(script, list(argv), dict(env), cwd, out_path, err_path),
                          daemon=False)
    p.start()
    return p


def run_python(args, cwd: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """subprocess.run([sys.executable, *args], cwd=..., env=..., capture_output=True, text=True, timeout=...)
    in a preloaded process: args is [script, ...] or ["-c", code, ...]."""
    args = [str(a) for a in args]
    script, rest = (args[0], args[1:]) if args[0] != "-c" else ("-c", args[1:])
    with tempfile.TemporaryDirectory(prefix="megaloop-run-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        p = start_script(script, rest, env, cwd, out, err)
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(10)
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
        with open(out, errors="replace") as fo, open(err, errors="replace") as fe:
            return subprocess.CompletedProcess([sys.executable, *args], p.exitcode, fo.read(), fe.read())


class ForkedPopen:
    """The part of subprocess.Popen that launchers use (pid, poll, wait, returncode, kill, terminate, send_signal),
    for `[python, script, *args]` run as start_script runs it; stdout: an open file (stderr goes with it) or None
    (the caller's stdout)."""

    def __init__(self, args, cwd=None, env=None, stdout=None, stderr=None, **_ignored):
        script, *rest = [str(a) for a in args[1:]]
        out = stdout.name if stdout is not None and hasattr(stdout, "name") else "/dev/stdout"
        if stdout is not None:
            stdout.flush()
        self.args = list(args)
        self._p = start_script(script, rest, dict(env if env is not None else os.environ),
                               str(cwd or os.getcwd()), out)
        self.pid = self._p.pid

    @property
    def returncode(self):
        return self._p.exitcode

    def poll(self):
        return self._p.exitcode

    def wait(self, timeout=None):
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._p.exitcode

    def send_signal(self, sig):
        if self._p.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self):
        self._p.terminate()

    def kill(self):
        self._p.kill()


def forked_run(args, cwd=None, env=None, timeout=None, capture_output=False, text=False, check=False, **_ignored):
    """subprocess.run for `[python, script, *args]` with capture_output=True and text=True, as run_python."""
    out = run_python([str(a) for a in args[1:]], cwd=str(cwd or os.getcwd()),
                     env=dict(env if env is not None else os.environ), timeout=timeout or 3600)
    if check and out.returncode:
        raise subprocess.CalledProcessError(out.returncode, args, out.stdout, out.stderr)
    return out


# A stand-in for the `subprocess` module inside code that starts Python scripts (megaloop.reproduce's runner).
forked_subprocess = type(sys)("forked_subprocess")
forked_subprocess.__dict__.update(Popen=ForkedPopen, run=forked_run, STDOUT=subprocess.STDOUT, PIPE=subprocess.PIPE,
                                  TimeoutExpired=subprocess.TimeoutExpired, CompletedProcess=subprocess.CompletedProcess,
                                  CalledProcessError=subprocess.CalledProcessError)
