"""``esm-dual`` with a fault injected into the embedding store's writer, for the tests that kill or stall a run
from outside its process (the package itself carries no test hooks).

    python tests/cli/faulty_embed.py FAULT ESM-DUAL-ARGUMENTS...

FAULT is one of

- ``kill-before-commit:K``: SIGKILL the process inside the store's batch K+1, after its rows are written and
  before they are committed;
- ``sleep-after-write:S``: sleep S seconds after each batch is written (a run still busy when a test kills it).

The patch is installed when this file runs, also as ``__mp_main__``: the ``--devices`` workers (spawned
processes, which run this file again with the parent's ``sys.argv``) carry it too.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from esm_dual.common.embeddings import EmbeddingWriter


def install(fault: str) -> None:
    kind, _, value = fault.partition(":")
    real_append = EmbeddingWriter.append
    if kind == "kill-before-commit":
        k, appended = int(value), [0]

        def append(self, *args, **kwargs):
            appended[0] += 1
            if appended[0] == k + 1:  # the rows of this batch reach the file, its commit never happens
                self._commit = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
            return real_append(self, *args, **kwargs)
    elif kind == "sleep-after-write":

        def append(self, *args, **kwargs):
            real_append(self, *args, **kwargs)
            time.sleep(float(value))
    else:
        raise SystemExit(f"faulty_embed.py: unknown fault {fault!r}")
    EmbeddingWriter.append = append


install(sys.argv[1])

if __name__ == "__main__":
    from esm_dual.cli.main import main

    sys.exit(main(sys.argv[2:]))
