"""Launcher glue shared by the scripts."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def strip_local_rank(argv: list[str]) -> list[str]:
    """Remove the ``--local_rank=N`` (or ``--local_rank N``) the deepspeed launcher adds.

    Hydra would reject it; the rank is kept in ``LOCAL_RANK`` where the trainer reads it.
    """
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(a)
    return out


def free_port() -> int:
    """A TCP port free on this host now (for a launcher's ``--master_port``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_tools_first() -> None:
    """Put this interpreter's ``bin`` first on ``PATH``, as an activated venv does.

    DeepSpeed JIT-builds its CPU comm op with the first ``ninja`` on ``PATH``. The venv's
    ninja (1.13) and the system's (1.11) hash the same build command differently, so runs
    that alternated between them (an activated shell, then a plain ``.venv/bin/deepspeed``)
    rebuilt the op, about a minute each time.
    """
    tools = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([tools, *(p for p in path if p and p != tools)])
