"""The service's thread pools, arranged so that only one thread runs parallel math.

Each thread that runs a parallel torch or faiss operation gets its own OpenMP team of workers.
Two teams on a few cores slow each other down: on the 2-core dev box, a text query encoded on
the model thread took 17 ms instead of 9 once the thread that loaded the weights (or a faiss
search thread) had its own team. So the model is loaded and run on one thread only, searches
run faiss single-threaded (one query is a tiny scan or an HNSW walk), and decoders run torch
single-threaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import faiss
import torch


def model_thread(torch_threads: int = 0) -> ThreadPoolExecutor:
    """The one thread that loads and runs the model (torch_threads 0: torch's default)."""
    threads = torch_threads or torch.get_num_threads()
    # torch's thread count is per thread: the new thread sets its own as it starts
    return ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="model",
        initializer=torch.set_num_threads,
        initargs=(threads,),
    )


def single_threaded_pool(name: str, set_threads: Callable[[int], object]) -> ThreadPoolExecutor:
    """One thread per CPU, each setting its library's OpenMP threads to 1 as it starts."""
    return ThreadPoolExecutor(
        max_workers=os.cpu_count() or 2,
        thread_name_prefix=name,
        initializer=set_threads,
        initargs=(1,),
    )


def decode_pool() -> ThreadPoolExecutor:
    """For decoding and preprocessing uploads, torch single-threaded."""
    return single_threaded_pool("decode", torch.set_num_threads)


def search_pool() -> ThreadPoolExecutor:
    """For index searches, faiss single-threaded."""
    return single_threaded_pool("search", faiss.omp_set_num_threads)
