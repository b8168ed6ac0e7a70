"""`convirt index` in a process of its own, its peak RSS read for each run: for
tests/test_pacs_hostile.py and tests/test_lying_codestreams.py.

    indexer = IndexerRuns([["build", ...], ["build", ...]], logs, timeout=120)  # started now
    ...                                         # other work meanwhile: it imports torch for seconds
    for status, peak_kib, stderr in indexer.results():  # the runs that ended within the timeout
        ...

The runs go one after the other in one process (one import of torch for all), each as
`convirt index ARGS` would, its peak RSS read from /proc (VmHWM, reset before it). Linux only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Runs `convirt index` once per JSON argument list in argv[1]; after each run prints
# "=== ended STATUS PEAK_KIB" (a run that raised: its traceback on stderr and status 1, as the
# command's would be), and "=== run N" on stderr before each run's output.
MEASURED = """
import json, sys, traceback
from pathlib import Path
from convirt.cli import main
for n, args in enumerate(json.loads(sys.argv[1])):
    print(f"=== run {n}", file=sys.stderr, flush=True)
    Path("/proc/self/clear_refs").write_text("5")
    try:
        code = main(["index", *args])
    except Exception:
        traceback.print_exc()
        code = 1
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    print("=== ended", code, peak, flush=True)
"""


class IndexerRuns:
    """`convirt index` once per argument list, one after the other in one process of its own,
    started at once; `timeout`: seconds from the start after which it is killed."""

    def __init__(self, runs: list[list[str]], logs: Path, timeout: float, **env: str):
        """`logs`: a folder for its stdout and stderr (files, not pipes: nobody reads them while
        it runs, and a full pipe would stall it)."""
        self.started, self.timeout = time.monotonic(), timeout
        self._ended: list[tuple[int, int, str]] | None = None
        self.stderr, self.killed = "", False
        self.out_path, self.err_path = logs / "indexer.out", logs / "indexer.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.process = subprocess.Popen(  # the child keeps its own descriptors
                [sys.executable, "-c", MEASURED, json.dumps(runs)],
                cwd=REPO,
                env={**os.environ, **env},
                stdout=out,
                stderr=err,
            )

    def results(self) -> list[tuple[int, int, str]]:
        """(exit status, peak RSS in KiB, stderr) of each run that ended within the timeout, in
        order; waits for the process (killed at the timeout)."""
        if self._ended is None:
            try:
                self.process.wait(max(1.0, self.started + self.timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.killed = True
            out, self.stderr = self._read()
            ended = [line.split()[2:] for line in out.splitlines() if line.startswith("=== ended ")]
            errs = self.stderr.split("=== run ")[1:]
            self._ended = [(int(code), int(kib), errs[n]) for n, (code, kib) in enumerate(ended)]
        return self._ended

    def why(self) -> str:
        """Why fewer runs ended than were asked for: killed at the timeout, or how the process
        exited and the end of its stderr."""
        if self.killed:
            return f"killed after {self.timeout:g} s"
        return f"exited {self.process.returncode}: {self.stderr[-1500:]}"

    def close(self) -> None:
        """Kill the process if it still runs (a test that never asked for the results)."""
        self._read()

    def _read(self) -> tuple[str, str]:
        """Its stdout and stderr, once it has ended (killed if it still runs)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        return self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace")
