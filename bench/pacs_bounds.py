"""What a hostile PACS costs the indexer: peak RSS of `convirt index build --dicomweb` against the
deliberately misbehaving server of tests/pacs_fake.py (issue 21, finding 6).

- body: one good instance and one whose WADO answer is a 1 GB multipart body without
  Content-Length (generated as it is sent);
- listing: QIDO pages that never end (fresh UIDs on every page), with the default settings; the
  build is stopped after --seconds if it has not stopped itself.
The indexer runs as the child of a small wrapper that reads its peak RSS with
getrusage(RUSAGE_CHILDREN). --code-root runs another checkout (e.g. the previous commit) on the
same server, for a before/after in one run.

    python bench/pacs_bounds.py                               # both, this checkout
    python bench/pacs_bounds.py --code-root /work/prev-main --seconds 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from common import untrained_bundle  # noqa: E402
from pacs_fake import FakePacs  # noqa: E402

# Runs the indexer as its child for at most argv[1] seconds; prints the child's peak RSS (KiB).
WRAPPER = (
    "import resource, subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import sys; from convirt.cli import main; "
    "sys.exit(main(sys.argv[1:]))', *sys.argv[2:]], stdout=subprocess.DEVNULL, "
    "stderr=subprocess.PIPE, text=True)\n"
    "try:\n"
    "    _, err = child.communicate(timeout=float(sys.argv[1]))\n"
    "    status = child.returncode\n"
    "except subprocess.TimeoutExpired:\n"
    "    child.kill(); _, err = child.communicate(); status = 'killed_at_time_limit'\n"
    "print(repr(status), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
    "repr(err.strip().splitlines()[-1:] if err else []))\n"
)


def measure(code_root: Path, model: Path, url: str, out: Path, seconds: float) -> dict:
    started = time.perf_counter()
    args = ["index", "build", "--model", str(model), "--dicomweb", url, "--out", str(out)]
    args += ["--no-progress", "--workers", "1"]
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(seconds), *args],
        cwd=code_root,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(code_root), "PATH": "/usr/bin:/bin"},
    )
    status, peak, last = done.stdout.strip().rsplit("\n", 1)[-1].split(" ", 2)
    return {
        "status": status,
        "peak_rss_mb": round(int(peak) / 1024),
        "seconds": round(time.perf_counter() - started, 1),
        "last_line": last[:300],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code-root", type=Path, default=REPO, help="checkout to run")
    parser.add_argument("--model", type=Path, help="bundle (default: an untrained default one)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time limit per build")
    parser.add_argument("--only", choices=("body", "listing"), help="one scenario")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacs-bounds-") as tmp:
        model = args.model or untrained_bundle(Path(tmp) / "bundle")
        for scenario in ("body", "listing"):
            if args.only and scenario != args.only:
                continue
            with FakePacs() as pacs:
                pacs.add()
                if scenario == "body":
                    pacs.add("huge")
                else:
                    pacs.qido = "endless"
                result = measure(
                    args.code_root, model, pacs.url, Path(tmp) / scenario, args.seconds
                )
                result["qido_requests"] = pacs.counts["qido"]
            print(json.dumps({"scenario": scenario, "code": str(args.code_root), **result}))


if __name__ == "__main__":
    main()
