"""Opening the model bundle and the index at startup, refusing any pair that does not match."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from convirt.bundle import Bundle, BundleError, load_bundle, read_bundle_info
from convirt.quantize import check_int8
from index.errors import IndexStoreError
from index.read.store import IndexStore, open_current
from service.settings import Settings, env_name

from .threads import model_thread


class StartupError(RuntimeError):
    """The service cannot start with these settings; the message says what to change."""


@dataclass
class Resources:
    bundle: Bundle
    store: IndexStore
    model_thread: ThreadPoolExecutor  # the thread that loaded the model, and must run it


def required_path(settings: Settings, field: str) -> Path:
    value = getattr(settings, field)
    if value is None:
        flag = "--" + field.replace("_", "-")
        raise StartupError(f"set {env_name(field)} (or {flag}): the service needs it")
    return Path(value)


def check_quantized(settings: Settings, model_dir: Path, fingerprint: str) -> None:
    """CONVIRT_QUANTIZE=int8: the int8 query encoder can be served with this bundle (derived
    from it, undamaged; a missing one is quantised when the engine starts). Raises
    QuantizedModelError (a BundleError) or StartupError."""
    if settings.device != "cpu":
        raise StartupError(
            f"{env_name('quantize')}=int8 is a CPU query path; with "
            f"{env_name('device')}={settings.device} set {env_name('quantize')}=none"
        )
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise StartupError(
            f"{env_name('quantize')}=int8 needs onnxruntime: pip install onnxruntime onnx"
        ) from err
    check_int8(model_dir, fingerprint)


def load_resources(settings: Settings) -> Resources:
    """The bundle and the current index version, checked to belong together before any weights load.

    The index records the fingerprint of the model that embedded it; a bundle with another
    fingerprint would put queries in a different space, so it is refused with both fingerprints.
    """
    model_dir = required_path(settings, "model")
    index_root = required_path(settings, "index_root")
    try:
        fingerprint = read_bundle_info(model_dir)["fingerprint"]
        if settings.quantize == "int8":
            check_quantized(settings, model_dir, fingerprint)
        store = open_current(index_root, expected_fingerprint=fingerprint)
    except (BundleError, IndexStoreError, OSError) as err:
        raise StartupError(str(err)) from err
    thread = model_thread(settings.torch_threads)
    try:
        bundle = thread.submit(load_bundle, model_dir, settings.device).result()
    except (BundleError, OSError) as err:
        thread.shutdown()
        store.close()
        raise StartupError(str(err)) from err
    return Resources(bundle, store, thread)
