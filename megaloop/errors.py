"""The project's error base class, and `run_cli`: one clear line instead of a traceback.

Every megaloop error class (ConfigError, CheckpointError, ExportError, the data errors, ...) inherits
MegaloopError besides its old base (most stay ValueErrors). Entry points run their `main(argv)` through

    sys.exit(run_cli(main))

which calls main(argv) and turns what a user can fix into one line on stderr and exit code 2:

    MegaloopError, OSError, ValueError  ->  "error: <one line>" (OSError: "<errno text>: <path> (<fix>)")
    KeyboardInterrupt                   ->  "interrupted", exit code 130
    anything else (a bug)               ->  the traceback, as Python prints it

`--debug` anywhere in argv (it is removed before main sees it) or MEGALOOP_DEBUG=1 also prints the
traceback before the line. Under a launcher (RANK set), only rank 0 prints the line; other ranks exit 2
silently, unless MEGALOOP_DEBUG=1, where every rank prints "error: [rank N] ..." and its traceback, or the
error names the rank that reports it (`report_on_this_rank`: a lost peer, when rank 0 is the one lost). A
failure on a non-zero rank alone is then visible with MEGALOOP_DEBUG=1 (the launcher reports the exit).

Writers that hit an OSError re-raise it as OutputError(err, folder, note), which keeps the errno (it is
still an OSError) and says which folder and what was left behind ("nothing was written", "the previous
checkpoint step_00000100 is intact").
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

__all__ = ["MegaloopError", "OutputError", "UsageError", "describe_os_error", "one_line", "os_error_in", "run_cli",
           "should_report"]


class MegaloopError(Exception):
    """Base of every error megaloop raises for a problem the user can fix; the message is one line that
    names the file or field and the fix."""


def _fix(code: Optional[int]) -> str:
    return {
        errno.ENOSPC: "free space there or choose another folder",
        errno.EDQUOT: "free space there (disk quota exceeded) or choose another folder",
        errno.EROFS: "the file system is read-only: choose a writable folder",
        errno.EACCES: "check the permissions, or choose a folder you can write",
        errno.EPERM: "check the permissions, or choose a folder you can write",
        errno.ENOENT: "check the path",
        errno.ENOTDIR: "a file stands where a folder is expected: check the path",
        errno.EISDIR: "a folder stands where a file is expected: check the path",
        errno.EEXIST: "remove it or choose another name",
    }.get(code, "")


def describe_os_error(e: OSError) -> str:
    """'no space left on device: /data/out (free space there or choose another folder)'. For a full disk
    the folder is named (the file being written is usually a temporary)."""
    if e.errno is None or not e.strerror:  # raised with a message only, e.g. FileNotFoundError("x: ...")
        return str(e.args[0]) if len(e.args) == 1 else str(e)
    text = e.strerror[:1].lower() + e.strerror[1:]
    path = e.filename
    if path is not None:
        path = os.fspath(path)
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and not os.path.isdir(path):
            path = os.path.dirname(os.path.abspath(path))
        text += f": {path}"
        if e.filename2 is not None:
            text += f" -> {os.fspath(e.filename2)}"
    fix = _fix(e.errno)
    return f"{text} ({fix})" if fix else text


class UsageError(MegaloopError, ValueError):
    """A command-line argument (or combination) that cannot work; the message names the flag."""


class OutputError(MegaloopError, OSError):
    """An OSError met while writing an output, with the folder and what was left behind. It keeps the
    errno (isinstance(e, OSError) holds), so callers that test for ENOSPC still can."""

    def __init__(self, err: OSError, path, note: str = ""):
        code = err.errno if isinstance(err, OSError) else None
        strerror = (err.strerror if isinstance(err, OSError) else None) or str(err)
        filename = err.filename if isinstance(err, OSError) and err.filename is not None and path is None else path
        super().__init__(code, strerror, None if filename is None else os.fspath(filename))
        self.note = note

    def __str__(self):
        return describe_os_error(self) + (f"; {self.note}" if self.note else "")

    def __reduce__(self):  # picklable across worker processes
        return (_rebuild_output_error, (self.errno, self.strerror, self.filename, self.note))


def _rebuild_output_error(code, strerror, filename, note):
    return OutputError(OSError(code, strerror), filename, note)


def os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError behind `e`: itself, or one in its __cause__ / __context__ chain (torch.save's zip writer
    turns a failed write into a RuntimeError raised while handling the OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def one_line(e: BaseException) -> str:
    """The exception's message on one line (a multi-line message's lines joined with '; ')."""
    if isinstance(e, OSError) and not isinstance(e, OutputError):
        text = describe_os_error(e)
    elif isinstance(e, KeyError) and len(e.args) == 1:
        text = str(e.args[0])  # KeyError's str() quotes its message
    else:
        text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    head, rest = lines[0], [line.lstrip("-* ").strip() for line in lines[1:]]
    if not rest:
        return head
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _debug_env() -> bool:
    return os.environ.get("MEGALOOP_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def should_report() -> bool:
    """Whether this process prints the error line: rank 0 (or no launcher), or any rank with MEGALOOP_DEBUG=1."""
    return _rank() == 0 or _debug_env()


def run_cli(main: Callable[[list], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Run main(argv) (argv: sys.argv[1:] by default, `--debug` removed) and return its exit code: its own
    (None -> 0), 2 after one line for a MegaloopError / OSError / ValueError, 130 on Ctrl-C. Other exceptions
    propagate with their traceback; SystemExit (argparse's usage errors, exit 2) passes through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or _debug_env()
    argv = [a for a in argv if a != "--debug"]
    try:
        code = main(argv)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        if should_report():
            print("interrupted", file=sys.stderr)
        return 130
    except (MegaloopError, OSError, ValueError) as e:
        rank = _rank()
        if debug and (rank == 0 or _debug_env()):
            traceback.print_exc()
        # (an error may decide itself which rank reports: a lost peer is named by the lowest rank still alive)
        if getattr(e, "report_on_this_rank", should_report()) or _debug_env():
            where = f"[rank {rank}] " if rank else ""
            hint = "" if isinstance(e, MegaloopError) or debug else " (--debug or MEGALOOP_DEBUG=1 shows the traceback)"
            print(f"error: {where}{one_line(e)}{hint}", file=sys.stderr, flush=True)
        return 2
    return 0 if code is None else int(code)
