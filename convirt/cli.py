"""The `convirt` command: one entry point, one subcommand per program.

Each subcommand lives with its program (training/, index/, service/) and is imported only when run,
so `convirt --help` is instant and the library itself never imports the programs.
"""

from __future__ import annotations

import importlib
import logging
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.cli:train_main", "train a ConVIRT model on image/report pairs"),
    "pretrain-text": (
        "training.pretrain_text_cli:main",
        "adapt the text encoder to report language (masked-LM) before training",
    ),
    "eval": ("training.cli:eval_main", "retrieval scores of a model bundle on a split"),
    "cache": ("convirt.cache_cli:main", "decode a manifest's images once into the image cache"),
    "index": ("index.cli:main", "build, update and inspect a FAISS index of an image archive"),
    "serve": ("service.cli:main", "serve text and image search over HTTP"),
    "export": ("convirt.quantize:main", "derive the int8 query encoder of a bundle for serving"),
    "keys": ("service.guard.keys_cli:main", "create, list and revoke the service's API keys"),
    "audit": (
        "service.guard.audit_cli:main",
        "list, export (CSV) and verify the service's audit log",
    ),
}


def usage() -> str:
    lines = ["usage: convirt COMMAND [options]", "", "commands:"]
    width = max(map(len, SUBCOMMANDS))
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in SUBCOMMANDS.items()]
    lines += ["", "Run `convirt COMMAND --help` for the options of each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"convirt: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module_name, function_name = SUBCOMMANDS[name][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"convirt: the {name!r} command is not part of this installation", file=sys.stderr)
        return 2
    return int(getattr(module, function_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
