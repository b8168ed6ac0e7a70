"""`convirt index`: build, update and inspect a FAISS index of an image archive.

One module per command group, each adding its subcommands to the parser and running them:

    write.py     build, add, remove, reindex, merge, compact (index.write)
    dicomweb.py  sync, and the --dicomweb flags of build and add (index.sources.dicomweb)
    verify.py    info, verify (index.write.checks)
    sources.py   --images / --manifest / --dicomweb: the source a build or add reads
    options.py   the options several commands share (--root, --model, the job's, --keep)

A new source: its flags and its branch of sources.load_source (and, for a protocol with a sync,
a module like dicomweb.py); nothing else here changes.
"""

from __future__ import annotations

import argparse
import sys

from convirt.bundle import BundleError
from convirt.imagecache import CacheError
from convirt.paths import MissingWeightsError

from ..errors import DiskFullError, IndexStoreError
from . import dicomweb, verify, write

DESCRIPTION = """\
Build, update and inspect a FAISS index of an image archive (PNG, JPEG, DICOM).

Every write (build, add, remove, reindex, merge, sync) creates a new version under ROOT/versions/
and then switches ROOT/CURRENT to it atomically: readers see the old version until the new one is
complete. A killed build or add, run again with the same arguments, resumes: images already
embedded (known by content hash) are not embedded again. A write that runs out of disk space
stops with exit status 2, naming the disk and the space needed and free; nothing is published.

A PACS is a source too: build and add take --dicomweb URL (QIDO-RS lists, WADO-RS fetches), and
`sync --dicomweb URL` adds what is new on it and removes what was deleted, in one version.
"""


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.run(args) or 0)
    except DiskFullError as err:
        print(f"convirt index {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (IndexStoreError, BundleError, MissingWeightsError, PermissionError, CacheError) as err:
        print(f"convirt index {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"convirt index {args.command}: interrupted; the current version is unchanged and "
            "running the same command again resumes",
            file=sys.stderr,
        )
        return 130


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convirt index",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    write.add_build(commands)
    write.add_add(commands)
    write.add_remove(commands)
    write.add_reindex(commands)
    write.add_merge(commands)
    write.add_compact(commands)
    dicomweb.add_sync(commands)
    verify.add_info(commands)
    verify.add_verify(commands)
    return parser
