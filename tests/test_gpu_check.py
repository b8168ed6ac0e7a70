"""bench/gpu_check.sh, prepared here for a GPU machine: its payload fits what may be sent there,
and every step runs, in miniature, on CPU (`--device cpu --dry-run`)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = ["cuda-tests", "throughput-minilm", "throughput-mpnet", "train", "index"]


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "payload"
    command = [sys.executable, "bench/gpu_payload.py", "--out", str(out), "--images", "40"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_payload_brings_what_the_gpu_machine_lacks_within_its_limit(payload):
    wheels = sorted(p.name for p in (payload / "wheels").glob("*.whl"))
    assert any(name.startswith("faiss_cpu-") for name in wheels)
    assert any(name.startswith("pydantic_core-") and "cp312" in name for name in wheels)
    assert sorted(p.name for p in (payload / "text").iterdir()) == ["minilm", "mpnet"]
    assert not list((payload / "text").rglob("*.safetensors"))  # weights are made there
    full_size = json.loads(
        subprocess.run(
            [sys.executable, "bench/gpu_payload.py", "--out", str(payload.parent / "full")],
            cwd=REPO, capture_output=True, text=True, check=True, timeout=600,
        ).stdout
    )["bytes"]  # fmt: skip
    assert full_size < 56 * 2**20  # 64 MiB in all, with the working tree


@pytest.mark.slow
def test_every_step_runs_on_cpu_in_a_dry_run(payload, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    command = ["bash", "bench/gpu_check.sh", "--device", "cpu", "--dry-run"]
    command += ["--payload", str(payload)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {s["step"]: s for s in map(json.loads, (tmp_path / "gpu_check.jsonl").open())}
    assert list(steps) == STEPS
    assert steps["cuda-tests"]["exit_status"] == 0  # skipped here: no CUDA
    assert steps["throughput-mpnet"]["text_encoder"].endswith("/mpnet")
    assert all(steps[f"throughput-{t}"]["ratio"] > 0 for t in ("minilm", "mpnet"))
    assert all(math.isfinite(loss) for loss in steps["train"]["train_loss"])
    assert steps["index"]["indexed"] == steps["index"]["images"] == 24
