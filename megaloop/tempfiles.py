"""Temporary names for outputs written then renamed into place, and removal of the ones a killed run left.

A writer (the indexed-dataset writer, the tokenizer sidecar, an export's staging folder) writes under
`<final name><temp_suffix()><something>`, and renames into place when complete. A process killed before
that (SIGKILL, a node lost) leaves the temporary behind; the next writer of the same final name calls
`remove_stale`, which deletes the temporaries whose writer is gone: made on this host by a pid that no
longer runs. A temporary from another host (a shared file system) or a live process is left alone.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
from typing import List

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
# <final><.tmp- | .old->[host-]pid-<rest>; names from before the host was recorded have no host
_PATTERN = re.compile(r"\.(?:tmp|old)-(?:(?P<host>[A-Za-z0-9_.]+)-)?(?P<pid>\d+)(?:-[A-Za-z0-9_]*)?$")


def temp_suffix(kind: str = "tmp") -> str:
    """'.tmp-<host>-<pid>': what a temporary's name carries after the final name (a '-<anything>' may follow)."""
    return f".{kind}-{_HOST}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(name: str, final_name: str) -> bool:
    """Whether `name` is a temporary of `final_name` whose writer, on this host, has exited."""
    if not name.startswith(final_name):
        return False
    m = _PATTERN.fullmatch(name[len(final_name):])
    if m is None:
        return False
    host = m.group("host")
    if host is not None and host != _HOST:
        return False
    pid = int(m.group("pid"))
    return pid != os.getpid() and not pid_alive(pid)


def remove_stale(folder, final_name: str) -> List[str]:
    """Delete the stale temporaries of `final_name` in `folder` (files or folders); returns their names."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        if not is_stale(name, final_name):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
        except OSError:
            pass  # (another process removed it, or we may not: leave it)
    return removed
