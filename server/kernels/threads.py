"""One thread computes: torch's intra-op thread pool belongs to the engine thread.

With torch's OpenMP backend, every thread that runs a parallel op gets an OpenMP team of its own, and a team's
workers live as long as its thread. libgomp counts the workers of every team; once they outnumber the cores it
stops spin-waiting between parallel regions, so each region has to wake its workers through the kernel. Measured
on the 2-core CI machine (torch 2.13, OpenMP): a [16, 1536] `index_add_` takes 12 us on the process's only
team and 525 us once a second team exists; a [16, 576] x [576, 1536] linear 189 us and 321 us. A server whose
main thread loaded the model with two threads, and whose engine thread then decoded with two, paid that on every
op of every step (base decode 110 against 71 ms a step for 16 rows; benchmarks/README.md has the run).

So the engine thread alone runs torch with `threads` threads (`--torch-threads`, default torch's own: the
machine's cores), and every other thread of the server that may run torch ops (the CLI's main thread, which
loads the model; the adapter loaders and the residency worker; the event loop's executor) runs them on itself,
never creating a team.

Two details of torch's OpenMP backend decide how. `torch.set_num_threads` sets the calling thread's OpenMP and
MKL threads and a process-wide default. That default seeds a thread the first time it queries or uses its
threads, overriding anything set before; so each function here first lets that happen (`get_num_threads`),
then sets the thread's own count. And since the engine's call leaves the default at its count, a throwaway
thread puts it back to one: a thread nobody configured (a library's, a test's) then never starts a team.
"""

from __future__ import annotations

import concurrent.futures
import threading

import torch


def _set_threads(threads: int) -> None:
    torch.get_num_threads()  # the thread's first query seeds it from the default: let that happen first
    torch.set_num_threads(threads)


def compute_here(threads: int) -> None:
    """Make the calling thread (the engine's) the one that computes, with `threads` threads; the default for
    threads not yet seeded goes back to one."""
    _set_threads(threads)
    reset = threading.Thread(target=one_thread_here, name="deltaserve-threads-default")
    reset.start()
    reset.join()


def one_thread_here() -> None:
    """Make the calling thread run torch ops on itself alone (every server thread but the engine's)."""
    _set_threads(1)


def default_threads() -> int:
    """The calling thread's torch threads: what the engine computes with unless `--torch-threads` says."""
    return torch.get_num_threads()


def single_threaded_executor(prefix: str) -> concurrent.futures.ThreadPoolExecutor:
    """An executor for blocking work off the event loop (tokenizing, parsing adapter files) whose threads
    never create an OpenMP team."""
    return concurrent.futures.ThreadPoolExecutor(thread_name_prefix=prefix, initializer=one_thread_here)
