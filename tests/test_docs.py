"""The docs point at what exists and their commands run as written.

- Links: every markdown link, and every repository path named in README.md and docs/*.md (in
  prose, code spans or code blocks: `bench/x.py`, `training/configs/locked.yaml`, an image, a
  bare `results.md`), names a file or folder this repository holds; `#anchors` name a heading of
  their file. Outputs (runs/) and the datasets are not the repository's: (2) covers them.
- Commands: every `convirt ...` in a shell block of README.md and docs/deploy.md parses with the
  real CLI parsers (tests/commands.py; nothing runs), and every runs/ path a README command names
  is one scripts/demo.sh writes (default config cpu) or one an earlier README command writes
  (its --out), so a newcomer who ran `make demo` can paste them.
- No absolute path of the machine the figures were made on.

Failures name the file and line to fix. Fast and offline: only text and argparse.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from commands import SHELL_OPERATORS, cli_error, shell_tokens

from convirt.paths import data_root

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
COMMAND_PAGES = [README, ROOT / "docs" / "deploy.md"]
DEMO_SCRIPT = ROOT / "scripts" / "demo.sh"
DEMO_CONFIG = "cpu"  # what `make demo` picks without CUDA
DATA_PREFIX = "../shared/datasets/"  # the README's spelling of the default CONVIRT_DATA_ROOT
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# top-level names that are outputs or local state, never the repository's
NOT_REPOSITORY = {"runs", "build", "out"}
MACHINE_PATHS = re.compile(r"(?<![\w.~-])/(?:work|home|Users)/")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PATH_TOKEN = re.compile(
    r"(?<![\w$~/.:@-])\.{0,2}/?[\w.-]+(?:/[\w.*-]+)+/?|(?<![\w/.-])[\w-]+\.md\b"
)


@dataclass(frozen=True)
class Line:
    page: Path
    number: int
    text: str
    language: str | None  # the code block's language, "" for an untagged block, None in prose

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.number}"


def lines_of(page: Path) -> list[Line]:
    found, language = [], None
    for number, text in enumerate(page.read_text().splitlines(), 1):
        fence = re.match(r"\s*(```|~~~)\s*([\w-]*)", text)
        if fence:
            language = (fence.group(2) or "").lower() if language is None else None
            continue
        found.append(Line(page, number, text, language))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in lines_of(page):
        match = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line.text) if line.language is None else None
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            if count:
                seen[f"{base}-{count}"] = 1
    return set(seen)


def repository_tops() -> set[str]:
    return {
        entry.name
        for entry in ROOT.iterdir()
        if not entry.name.startswith(".")
        and entry.name not in NOT_REPOSITORY
        and not entry.name.endswith(".egg-info")
    }


def ignored_outputs() -> set[str]:
    """Files .gitignore names one by one (`docker/convirt.env`): made by a step, never committed."""
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return {line.strip("/") for line in lines if "/" in line.strip("/") and "*" not in line}


def resolves(page: Path, reference: str) -> bool:
    """Whether `reference` (relative to the page's folder, the repository root or docs/)
    exists."""
    for base in (page.parent, ROOT, ROOT / "docs"):
        candidate = base / reference
        if "*" in reference:
            if list(base.glob(reference)):
                return True
        elif candidate.exists() or candidate.with_suffix(".py").exists():
            return True
    return False


def link_problems(line: Line) -> list[str]:
    problems = []
    if line.language is not None:
        return problems
    for target in LINK.findall(line.text):
        if re.match(r"[a-z][\w+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        page = (line.page.parent / path).resolve() if path else line.page
        if path and not page.exists():
            problems.append(f"{line.where()}: the link ({target}) names no file of the repository")
        elif anchor and page.suffix == ".md" and anchor not in anchors(page):
            problems.append(
                f"{line.where()}: the link ({target}) names no heading of "
                f"{page.relative_to(ROOT)} (anchors: {sorted(anchors(page))})"
            )
    return problems


def path_problems(line: Line, tops: set[str]) -> list[str]:
    problems = []
    text = LINK.sub("", line.text) if line.language is None else line.text
    for token in PATH_TOKEN.findall(text):
        reference = token.rstrip(".").removeprefix("./")
        first = reference.split("/")[0]
        is_page = "/" not in reference and reference.endswith(".md")
        if reference.startswith(("/", "../")) or not (first in tops or is_page):
            continue
        if line.language is not None and "." not in reference.rstrip("/").split("/")[-1]:
            continue  # in a command, `service/convirt-api` may be a name, not a path
        if reference in ignored_outputs():
            continue  # written by a step the docs show, e.g. `cp ... docker/convirt.env`
        if not resolves(line.page, reference):
            problems.append(f"{line.where()}: `{reference}` is not in the repository")
    return problems


def test_links_and_repository_paths_exist():
    tops = repository_tops()
    problems = []
    for page in PAGES:
        for line in lines_of(page):
            problems += link_problems(line) + path_problems(line, tops)
    assert not problems, "references to nothing:\n" + "\n".join(problems)


def test_no_machine_paths():
    found = [
        f"{line.where()}: an absolute path of a machine: {line.text.strip()}"
        for page in PAGES
        for line in lines_of(page)
        if MACHINE_PATHS.search(line.text)
    ]
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------------
# commands


@dataclass(frozen=True)
class Command:
    line: Line
    program: str  # "convirt", or the first word of another command
    argv: list[str]


def shell_commands(page: Path) -> list[Command]:
    """The commands of a page's shell blocks, continuation lines (and quotes over several
    lines) joined, with the first line's number; in console blocks only those after `$ `."""
    commands, pending, variables = [], None, {}
    for line in lines_of(page):
        if line.language not in SHELL_LANGUAGES:
            pending = None
            continue
        text = line.text
        if pending is None:
            if line.language == "console":
                if not text.startswith("$ "):
                    continue
                text = text[2:]
            pending = Line(line.page, line.number, "", line.language)
        joined = pending.text + "\n" + text.rstrip().removesuffix("\\")
        pending = Line(pending.page, pending.number, joined, pending.language)
        if text.rstrip().endswith("\\") or not closed(joined):
            continue
        loop = re.match(r"\s*for (\w+) in (\S+)", joined)
        if loop:  # `for i in 0 1 2 3; do ... --shard $i/4`: parsed with the first value
            variables[loop.group(1)] = loop.group(2)
        for name, value in variables.items():
            joined = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", value, joined)
        commands += split_commands(Line(pending.page, pending.number, joined, pending.language))
        pending = None
    return commands


def closed(text: str) -> bool:
    try:
        shell_tokens(text)
    except ValueError:  # a quote that goes on on the next line
        return False
    return True


def split_commands(line: Line) -> list[Command]:
    try:
        tokens = shell_tokens(line.text)
    except ValueError as err:
        raise AssertionError(f"{line.where()}: not a shell line ({err}): {line.text}") from err
    found, current = [], []
    for token in [*tokens, ";"]:
        if token in SHELL_OPERATORS:
            while current and re.match(r"[A-Za-z_]\w*=", current[0]):  # VAR=value command
                current = current[1:]
            words = current
            if words:
                found.append(command_of(line, words))
            current = []
        else:
            current.append(token)
    return found


def command_of(line: Line, words: list[str]) -> Command:
    for i, word in enumerate(words):
        previous = words[i - 1] if i else ""
        if word == "convirt" and previous != "--entrypoint":
            return Command(line, "convirt", words[i + 1 :])
        if word == "convirt.cli" and previous == "-m":  # torchrun ... -m convirt.cli train ...
            return Command(line, "convirt", words[i + 1 :])
    return Command(line, words[0], words[1:])


class Parsed(Exception):
    """Raised by a stand-in for the first thing a command does after its parser accepted it."""


def parse_error(argv: list[str]) -> str | None:
    """Why the real CLI would refuse `convirt ARGV` (None: it parses). tests/commands.py knows
    every parser but those of export and pretrain-text, which build theirs inside main()."""
    if argv[:1] == ["export"]:
        from convirt import quantize

        with mock.patch.object(quantize, "read_bundle_info", side_effect=Parsed):
            return run_until_parsed(quantize.main, argv[1:])
    if argv[:1] == ["pretrain-text"]:
        from training.pretrain_text_cli import parser

        return run_until_parsed(lambda rest: parser().parse_args(rest), argv[1:])
    return cli_error(argv)


def run_until_parsed(function, argv: list[str]) -> str | None:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            function(argv)
    except Parsed:
        return None
    except SystemExit:
        return (stderr.getvalue().strip().splitlines() or ["refused"])[-1]
    return None


def convirt_commands() -> list[Command]:
    return [c for page in COMMAND_PAGES for c in shell_commands(page) if c.program == "convirt"]


def test_the_docs_show_convirt_commands():
    """The extraction itself works: the README's recipes are found (else the next test passes
    on nothing)."""
    readme = [c.argv[:2] for c in convirt_commands() if c.line.page == README]
    for wanted in (["index", "build"], ["index", "sync"], ["serve"], ["train"]):
        assert any(argv[: len(wanted)] == wanted for argv in readme), f"no `convirt {wanted}`"


@pytest.mark.parametrize("page", COMMAND_PAGES, ids=lambda p: p.name)
def test_convirt_commands_parse(page):
    problems = []
    for command in convirt_commands():
        if command.line.page != page:
            continue
        error = parse_error(command.argv)
        if error:
            shown = shlex.join(["convirt", *command.argv])
            problems.append(f"{command.line.where()}: `{shown}` is refused: {error}")
    assert not problems, "\n".join(problems)


def demo_outputs(config: str = DEMO_CONFIG) -> dict[str, str]:
    """RUN, ARCHIVE and INDEX of scripts/demo.sh, as it names them with its defaults."""
    script = DEMO_SCRIPT.read_text()
    out = re.search(r'^OUT="\$\{CONVIRT_DEMO_DIR:-([^}]+)\}"', script, re.M)
    assert out, 'scripts/demo.sh: no OUT="${CONVIRT_DEMO_DIR:-...}" line'
    names = {}
    for name in ("RUN", "ARCHIVE", "INDEX"):
        found = re.search(rf'^{name}="([^"]+)"', script, re.M)
        assert found, f"scripts/demo.sh: no {name}=... line"
        names[name] = found.group(1).replace("$OUT", out.group(1)).replace("$CONFIG", config)
    return names


def test_demo_outputs_are_read_from_demo_sh():
    assert demo_outputs() == {
        "RUN": "runs/demo-cpu",
        "ARCHIVE": "runs/demo-archive",
        "INDEX": "runs/demo-index-cpu",
    }


def under(path: str, roots: set[str]) -> bool:
    path = path.rstrip("/")
    return any(path == root or path.startswith(root + "/") for root in roots)


def test_readme_commands_use_the_demos_paths():
    written = set(demo_outputs().values())
    problems = []
    for command in shell_commands(README):
        written |= {
            command.argv[i + 1].rstrip("/")
            for i, word in enumerate(command.argv[:-1])
            if word == "--out" and command.argv[i + 1].startswith("runs/")
        }
        for word in command.argv:
            for path in re.findall(r"(?<![\w/.-])runs/[\w./-]*", word):
                if not under(path, written):
                    problems.append(
                        f"{command.line.where()}: {path} is neither written by scripts/demo.sh "
                        f"({', '.join(sorted(demo_outputs().values()))}) nor by an earlier "
                        "README command"
                    )
    assert not problems, "\n".join(problems)


def test_readme_dataset_paths_exist():
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"no datasets at {root} (CONVIRT_DATA_ROOT)")
    problems = []
    for command in shell_commands(README):
        for word in command.argv:
            for path in re.findall(re.escape(DATA_PREFIX) + r"[\w./-]+", word):
                if not (root / path.removeprefix(DATA_PREFIX)).exists():
                    problems.append(f"{command.line.where()}: {path} is not in {root}")
    assert not problems, "\n".join(problems)
