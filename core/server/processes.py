"""What every process `paged serve` starts has in common: where the core listens, and how a child behaves.

The supervisor (cli/serve.py, server/launcher.py) spawns one engine core process and N API server
processes. Children die with their parent (a parent-death signal, so a SIGKILLed supervisor leaves no
orphans), sit in their own process group (Ctrl-C reaches the supervisor, which stops them in order) and
prefix their log lines with their role, as vLLM's do.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class CoreAddresses:
    """ZeroMQ endpoints of one engine core: the one input every client pushes to, one output per client.

    ipc:// paths in a private folder on one machine; a core on another node would take tcp:// ones.
    """

    input: str
    output_prefix: str
    folder: str | None = None

    @classmethod
    def local(cls) -> CoreAddresses:
        folder = tempfile.mkdtemp(prefix="paged-ipc-")
        return cls(f"ipc://{folder}/input", f"ipc://{folder}/output", folder)

    def output(self, client_index: int) -> str:
        return f"{self.output_prefix}-{client_index}"

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def become_child(role: str, log_level: str, parent_pid: int) -> None:
    """First thing in a spawned process: die with the parent, leave the terminal's signals to it, log as `role`."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    os.setpgid(0, 0)
    logging.basicConfig(level=log_level.upper(),
                        format=f"({role} pid={os.getpid()}) %(levelname)s %(name)s: %(message)s", force=True)
