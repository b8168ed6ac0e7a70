"""What the deployment files run, read without running it (shared by test_docker, test_deploy).

- Dockerfiles: instructions, the final stage, ENTRYPOINT/CMD and ENV of an image;
- shell: the `convirt` commands of a script or a container's process;
- `convirt` argv: why the real argparse parsers (no abbreviations) would refuse one;
- the service: the CONVIRT_* variables it reads, and what its routes answer before loading.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
from functools import cache
from pathlib import Path

from convirt.cli import SUBCOMMANDS
from convirt.paths import CACHE_DIR_ENV, DATA_ROOT_ENV

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {
    "service": ROOT / "docker" / "service.Dockerfile",
    "trainer": ROOT / "docker" / "trainer.Dockerfile",
}
# Tokens that end a command in a shell line.
SHELL_OPERATORS = {";", "&&", "||", "|", "&", ">", ">>", "<", "2>", "(", ")"}


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not exec form: {arguments}"
    return value


def image_entrypoint_and_cmd(path: Path) -> tuple[list[str], list[str]]:
    stage = final_stage(path)
    entrypoint = [exec_form(a) for k, a in stage if k == "ENTRYPOINT"]
    cmd = [exec_form(a) for k, a in stage if k == "CMD"]
    return (entrypoint[-1] if entrypoint else []), (cmd[-1] if cmd else [])


def env_instructions(path: Path, stage_only: bool = False) -> dict[str, str]:
    """Variables set by ENV (KEY=VALUE form), in the final stage or in any stage."""
    found: dict[str, str] = {}
    for keyword, arguments in final_stage(path) if stage_only else dockerfile_instructions(path):
        if keyword == "ENV":
            for item in shlex.split(arguments):
                key, sep, value = item.partition("=")
                assert sep, f"{path.name}: use ENV KEY=VALUE, not {arguments!r}"
                found[key] = value
    return found


# ---------------------------------------------------------------------------------------------
# `convirt` command lines


def cli_parsers() -> dict:
    """The real argparse parser of every `convirt` subcommand."""
    from convirt.cache_cli import parser as cache_parser
    from index.cli import make_parser
    from service.cli import build_parser
    from service.guard.audit_cli import build_parser as audit_parser
    from service.guard.keys_cli import build_parser as keys_parser
    from training.cli import eval_parser, train_parser

    return {
        "train": train_parser,
        "eval": eval_parser,
        "cache": cache_parser,
        "index": make_parser,
        "serve": build_parser,
        "keys": keys_parser,
        "audit": audit_parser,
    }


def cli_error(argv: list[str]) -> str | None:
    """Why `convirt ARGV` would be refused by the CLI, or None when it parses."""
    if not argv or argv[0] not in SUBCOMMANDS:
        return f"unknown subcommand {argv[0] if argv else '(none)'!r}; known: {sorted(SUBCOMMANDS)}"
    parsers = cli_parsers()
    if argv[0] not in parsers:
        return f"convirt {argv[0]}: no parser for it in cli_parsers() (tests/commands.py): add it"
    parser = exact_flags(parsers[argv[0]]())
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv[1:])
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1]
    if argv[0] == "train":
        from training.config import available_configs

        if args.config not in available_configs():
            return f"--config {args.config}: not one of {available_configs()}"
    return None


def exact_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser, subcommands included, without prefix matching: `--resum` is a typo here."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                exact_flags(subparser)
    return parser


def shell_tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def script_invocations(script: str) -> list[list[str]]:
    """The arguments of every `convirt` command in a shell script."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        tokens = shell_tokens(line)
        found += [until_operator(tokens[i + 1 :]) for i, t in enumerate(tokens) if t == "convirt"]
    return found


def until_operator(tokens: list[str]) -> list[str]:
    """The arguments of one command: the tokens before the first shell operator."""
    for i, token in enumerate(tokens):
        if token in SHELL_OPERATORS:
            return tokens[:i]
    return tokens


def process_invocations(argv: list[str]) -> list[list[str]]:
    """The `convirt` commands a container process runs: convirt itself, or a shell script."""
    if argv and argv[0] == "convirt":
        return [argv[1:]]
    if argv and Path(argv[0]).name in ("sh", "bash"):
        flags = [i for i, a in enumerate(argv) if a.startswith("-") and "c" in a]
        assert flags, f"a shell without -c: {argv}"
        return script_invocations(argv[flags[0] + 1])
    return []


def as_list(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


# ---------------------------------------------------------------------------------------------
# the service


def container_variables() -> set[str]:
    """The CONVIRT_* variables a container's `convirt` reads: every setting, DATA_ROOT_ENV and
    CACHE_DIR_ENV."""
    from service.settings import Settings, env_name

    return {env_name(field) for field in Settings.model_fields} | {DATA_ROOT_ENV, CACHE_DIR_ENV}


@cache
def _client():
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    # no lifespan: nothing loaded, /readyz says 503; a Host the default allow-list serves
    return TestClient(create_app(Settings()), base_url="http://localhost")


def status_before_loading(path: str) -> int:
    """What GET PATH answers while the model and index are not loaded yet (404: no such route)."""
    return _client().get(path).status_code
