"""Training throughput: the real loop (loader + augmentation + step) against the model alone.

Both are measured in the same process, interleaved in rounds, on the same config:
- loop:  pairs/s of DataLoader -> train_step over the real shared train split;
- model: pairs/s of train_step repeated on one batch already in memory (no data work at all).
ratio = loop / model; >= 0.8 means the data pipeline is not the bottleneck.

    python bench/train_throughput.py --config cpu --steps 12 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from itertools import count, islice
from pathlib import Path

import torch
from torch.utils.data import Sampler

from convirt.paths import default_manifests
from training.config import load_config, parse_assignments
from training.data import EpochSampler
from training.run import start_run
from training.train import train_step


class ChainedEpochs(Sampler):
    """The keys of epoch after epoch from one loader: a small data set (the GPU check carries
    560 pairs) still gives as many batches as asked, without restarting the workers."""

    def __init__(self, run, first_epoch: int):
        self.run, self.first_epoch = run, first_epoch

    def __iter__(self):
        for epoch in count(self.first_epoch):
            yield from EpochSampler(
                len(self.run.train_set), self.run.config.batch_size, epoch, self.run.config.seed
            )


def batches(run, first_epoch: int):
    return iter(run.train_loader(ChainedEpochs(run, first_epoch)))


def measure_loop(run, steps: int, epoch: int) -> float:
    loader = batches(run, epoch * 1000)
    train_step(run, next(loader))  # first batch pays for worker start-up: not counted
    started, pairs = time.perf_counter(), 0
    for batch in islice(loader, steps):
        pairs += train_step(run, batch)[1]
    return pairs / (time.perf_counter() - started)


def measure_model(run, batch, steps: int) -> float:
    train_step(run, batch)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(run, batch)
    return steps * len(batch["pixels"]) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any config field, as for convirt train (e.g. model.text_encoder=mpnet)",
    )  # fmt: skip
    parser.add_argument("--manifest", action="append", type=Path, dest="manifests")
    args = parser.parse_args()
    overrides = {"device": args.device, "num_workers": args.num_workers, "epochs": 1000}
    config = load_config(args.config, overrides | parse_assignments(args.set))
    with tempfile.TemporaryDirectory() as out:
        from convirt.cli_options import resolve_device
        from training import distributed

        run = start_run(
            config, args.manifests or default_manifests(), Path(out), distributed.DistInfo(),
            torch.device(resolve_device(config.device)), progress=False,
        )  # fmt: skip
        run.ddp_model.train()
        sampler = EpochSampler(len(run.train_set), config.batch_size, 999, config.seed)
        fixed_batch = next(iter(run.train_loader(sampler)))
        loop, model = [], []
        for round_index in range(args.rounds):
            model.append(measure_model(run, fixed_batch, args.steps))
            loop.append(measure_loop(run, args.steps, epoch=round_index))
    loop_rate, model_rate = sum(loop) / len(loop), sum(model) / len(model)
    print(
        json.dumps(
            {
                "config": args.config,
                "overrides": args.set,
                "text_encoder": config.model.text_encoder,
                "device": str(run.device),
                "gpu": torch.cuda.get_device_name() if run.device.type == "cuda" else None,
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                "batch_size": config.batch_size,
                "image_size": config.model.image_size,
                "num_workers": config.num_workers,
                "loop_pairs_per_s": round(loop_rate, 2),
                "model_pairs_per_s": round(model_rate, 2),
                "ratio": round(loop_rate / model_rate, 3),
                "rounds": {
                    "loop": [round(x, 2) for x in loop],
                    "model": [round(x, 2) for x in model],
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
