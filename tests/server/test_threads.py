"""The engine thread is the server's only thread that computes with several torch threads (kernels/threads.py).

Checked in a fresh interpreter, because the thread settings are per process: the functions must hold against
torch's lazy per-thread seeding, which overrides what a thread set before its first query. And on a live server:
the engine thread and the event loop's executor each report their own count."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import torch
from deltaserve.server.config import ServerConfig
from deltaserve.testing.helpers import ServerThread

SCRIPT = textwrap.dedent(
    """
    import threading, torch
    from deltaserve.server.kernels.threads import compute_here, one_thread_here

    def report(name, before=None):
        if before:
            before()
        torch.ones(1 << 20).sum()  # a parallel op: the thread's lazy seeding has happened by now
        print(name, torch.get_num_threads(), flush=True)

    def in_thread(name, before=None):
        worker = threading.Thread(target=report, args=(name, before))
        worker.start()
        worker.join()

    torch.set_num_threads(3)  # the process default an unconfigured thread would be seeded from
    one_thread_here()
    report("main")
    engine = threading.Thread(target=lambda: (compute_here(2), report("engine"), in_thread("later")))
    engine.start()
    engine.join()
    in_thread("helper", one_thread_here)
    """
)


def test_only_the_engine_thread_computes_with_several_threads_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    counts = dict(line.split() for line in out.stdout.splitlines())
    # "later" is a thread nobody configured, started after the engine set its own count: it must not
    # inherit the engine's 2 (nor the process's earlier 3), or it would start a second OpenMP team.
    assert counts == {"main": "1", "engine": "2", "later": "1", "helper": "1"}


def test_a_live_server_computes_on_the_engine_thread_and_nowhere_else(tiny_dir):
    config = ServerConfig.of(model=tiny_dir, max_batch_size=2, max_seq_len=64, torch_threads=2)
    with ServerThread(config) as thread:
        server = thread.server
        assert server.engine.call(torch.get_num_threads, timeout=60) == 2
        executor = asyncio.run_coroutine_threadsafe(asyncio.to_thread(torch.get_num_threads), thread._loop)
        assert executor.result(timeout=60) == 1
