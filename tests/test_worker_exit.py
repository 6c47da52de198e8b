"""A worker that finished leaves with its own exit code, whatever its engine threads are doing.

The engine's threads (the generation watch, store clients) sit in torch's C++ calls with the GIL released.
When one of them returns while the interpreter finalizes, the thread is ended inside a C++ destructor and
the process aborts (SIGABRT): the master then took a worker that had finished for a lost one (seen in CI
under load). :func:`oobleck.worker_main.exit_now` ends the process without finalizing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch.distributed as dist

# a daemon thread keeps calling into the store (as the watch does while a forged value sits on its key),
# then the main thread ends the process the way the worker's entry point does
_CHILD = """
import sys, threading, time
from datetime import timedelta
import torch.distributed as dist
from oobleck.worker_main import exit_now
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False)
store.set("busy", b"x")
def loop():
    while True:
        store.wait(["busy"], timedelta(seconds=5))
        store.multi_get(["busy"])
threading.Thread(target=loop, daemon=True).start()
time.sleep(0.05)
print("done", flush=True)
exit_now(int(sys.argv[2]))
"""


@pytest.mark.parametrize("code", [0, 3])
def test_exit_now_keeps_the_exit_code_while_a_thread_is_inside_the_store(code: int) -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for _ in range(2):
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(server.port), str(code)], capture_output=True, text=True, timeout=60
        )
        assert (child.returncode, child.stdout) == (code, "done\n"), child.stderr[-2000:]
