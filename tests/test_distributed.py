"""Negatives gathered across ranks give the gradient of the single-process global batch."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from convirt.loss import convirt_loss
from training.distributed import DistInfo, gather_with_grad

WORLD = 2


def batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 6, generator=generator)


def heads():
    torch.manual_seed(1)
    return torch.nn.Linear(4, 5), torch.nn.Linear(6, 5)


def _rank_worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    images, texts = batch()
    share = slice(rank * 4, (rank + 1) * 4)
    image_head, text_head = heads()
    info = DistInfo(rank, rank, WORLD)
    v = gather_with_grad(image_head(images[share]), info)
    u = gather_with_grad(text_head(texts[share]), info)
    (convirt_loss(v, u) * WORLD).backward()
    grads = []
    for p in [*image_head.parameters(), *text_head.parameters()]:
        dist.all_reduce(p.grad)  # what DDP does: average over ranks
        grads.append(p.grad / WORLD)
    if rank == 0:
        torch.save(grads, out_path)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_loss_gradient_equals_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_rank_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    images, texts = batch()
    image_head, text_head = heads()
    convirt_loss(image_head(images), text_head(texts)).backward()
    expected = [p.grad for p in [*image_head.parameters(), *text_head.parameters()]]
    for got, want in zip(torch.load(out), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.slow
def test_training_runs_under_torchrun(medpix_subset, tmp_path):
    trace = tmp_path / "trace" / "reads"
    trace.parent.mkdir()
    done = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "-m", "convirt.cli", "train",
            "--config", "cpu", "--manifest", str(medpix_subset), "--out", str(tmp_path),
            "--max-steps", "2", "--batch-size", "4", "--image-size", "64", "--device", "cpu",
            "--num-workers", "0", "--threads", "1", "--no-progress",
        ],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "CONVIRT_TRACE_SAMPLES": str(trace)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # each rank read only its own share: two steps of 4 pairs each, no row read by both
    shares = [set(path.read_text().split()) for path in trace.parent.iterdir()]
    assert sorted(len(share) for share in shares) == [8, 8]
    assert not shares[0] & shares[1]
    assert done.stdout.count('"steps": 2') == 1  # rank 0 alone reports
    assert (tmp_path / "bundle" / "weights.safetensors").is_file()
    steps = (tmp_path / "steps.csv").read_text().splitlines()
    assert len(steps) == 3  # header + 2 steps, written once
