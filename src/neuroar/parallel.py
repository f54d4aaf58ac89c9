"""Independent pieces of work (a subject to synthesise, a scan to preprocess) spread over processes."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch


def in_processes(function: Callable[..., Any], arguments: Sequence[tuple], workers: int = 0) -> Iterator[Any]:
    """`function(*args)` for each tuple of `arguments`, yielded in their order, in `workers`
    processes (0: one per CPU core; one process runs them here). Workers are forked on Linux (they start at once,
    inherit what the caller built, and need no `if __name__ == "__main__"` guard in user scripts) and run one torch
    thread each: the workers already fill the cores, and a forked child must not enter an OpenMP pool its parent
    may have started."""
    workers = min(workers or os.cpu_count() or 1, len(arguments))
    if workers <= 1:
        yield from (function(*args) for args in arguments)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from pool.map(function, *zip(*arguments))
