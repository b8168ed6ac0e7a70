"""Memory a decode of each lying file takes (issue 21, item 3): RSS before, peak (VmHWM, reset
before each file) and after one load_image of each, each file in a fresh process.

    .venv/bin/python bench/lying_decode.py
    # the previous code, for comparison (its convirt first on the path):
    cd /work/prev-main && PYTHONPATH=/work/prev-main /work/main/.venv/bin/python \
        /work/main/bench/lying_decode.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"

ONE_FILE = """
import sys, time
sys.path.insert(0, {tests!r})
from lying_files import lying_files
from convirt.imageio import load_image

def mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) // 1024

data = lying_files()[{name!r}]
open("/proc/self/clear_refs", "w").write("5")
before, started = mb("VmRSS"), time.perf_counter()
try:
    load_image(data)
    outcome = "decoded"
except Exception as err:
    outcome = type(err).__name__
print(before, mb("VmHWM"), mb("VmRSS"), round(time.perf_counter() - started, 2), outcome)
"""


def main() -> None:
    sys.path.insert(0, str(TESTS))
    from lying_files import lying_files

    print(f"{'file':34} {'bytes':>9} {'before':>7} {'peak':>7} {'after':>7} {'s':>5}  outcome")
    for name, data in lying_files().items():
        script = ONE_FILE.format(tests=str(TESTS), name=name)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name:34} {len(data):>9,} exited {done.returncode}: {done.stderr[-200:]}")
            continue
        before, peak, after, seconds, outcome = done.stdout.split()
        print(
            f"{name:34} {len(data):>9,} {before:>5}MB {peak:>5}MB {after:>5}MB {seconds:>5}  "
            f"{outcome}"
        )


if __name__ == "__main__":
    main()
