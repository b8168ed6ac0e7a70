"""What runs inside the heat-map worker process (service.model.explain_worker starts it).

Kept apart, and importing only the standard library at the top, because a spawned worker imports
this module before its initialiser runs: the initialiser lowers the process's priority first and
only then imports torch and loads the model, so even the worker's start (seconds of CPU) yields
to the server's threads.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

PARENT_CHECK_S = 2.0  # how often the worker checks that the server is still there

_embedder: Any = None  # convirt.inference.Embedder: this process's copy of the image tower


def start(bundle_dir: str, fingerprint: str, nice: int, device: str = "cpu") -> None:
    """The worker's initialiser: lower priority, one torch thread, the image tower loaded (on
    `device`, the server's)."""
    global _embedder
    os.nice(nice)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is the server's
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()

    import torch

    from convirt.bundle import load_bundle
    from convirt.inference import Embedder
    from convirt.quantize import release_text_tower

    torch.set_num_threads(1)
    bundle = load_bundle(Path(bundle_dir))
    if bundle.fingerprint != fingerprint:
        raise RuntimeError(
            f"the bundle in {bundle_dir} changed since the server loaded it "
            f"({bundle.fingerprint}, served {fingerprint}): restart the server"
        )
    release_text_tower(bundle)  # queries are embedded by the server; only images are needed
    _embedder = Embedder(bundle, device)


def occlusion(pixels: Any, query: Any, space: str, size: tuple[int, int]) -> Any:
    """convirt.explain.occlusion_map of `pixels` (a 3xSxS numpy array from the server's
    preprocessing) for `query`, placed on an image of `size`: a HeatMap."""
    import torch

    from convirt.explain import occlusion_map

    if _embedder is None:
        raise RuntimeError("the heat-map worker was not initialised")
    return occlusion_map(_embedder, torch.from_numpy(pixels), query, space, original_size=size)


def _exit_with(parent: int) -> None:
    """End the worker when the server is gone (killed with -9: nobody shuts the pool down)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)
