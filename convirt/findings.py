"""What a report sentence asserts: each mention present, absent, uncertain or historical.

A radiology report denies more than it finds ("No pleural effusion or pneumothorax."), so a word
in a report is weak evidence until we know what the sentence says of it. This is ConText (Harkema
et al. 2009, after NegEx, Chapman et al. 2001) in plain rules:

    triggers   "no", "without", "cannot exclude", "history of", "is not seen", ... each with a
               status and a direction: forward ones govern the words after them, backward ones
               the words before them;
    scope      from the trigger to the sentence's end (forward) or start (backward), cut at a
               terminating word ("but", "however", ";"), at the next trigger, and after
               MAX_FORWARD / MAX_BACKWARD words;
    pseudo     phrases that hold a trigger word but are none ("no change in the effusion");
    findings   names and their synonyms ("pneumothorax": "PTX"), matched as whole words.

At one position the longest phrase wins ("cannot rule out" is one uncertain trigger, not "not"
then "rule out"). Where scopes of several statuses cover a word, absent wins over uncertain and
uncertain over historical. The rules live in findings.yaml beside this file; a deployment extends
them with its own copy (CONVIRT_FINDINGS_RULES, or `read_rules(path)`).

Why not medspaCy: it implements the same algorithm on top of spaCy, whose pipeline, models and
pinned dependencies would triple the service's install for what is a few hundred lines here;
tests/test_findings.py checks these rules on hand-judged real report sentences.

    mentions("Large right pleural effusion without pneumothorax.")
      -> [Mention("pleural effusion", "pleural effusion", 12, 28, "present"),
          Mention("pneumothorax", "pneumothorax", 37, 49, "absent")]
    split_by_status("No effusion, but a small pneumothorax.")
      -> {"present": "small pneumothorax", "absent": "effusion", ...}
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import yaml

STATUSES = ("present", "absent", "uncertain", "historical")
PRIORITY = ("absent", "uncertain", "historical")  # which status wins where scopes overlap
MAX_FORWARD = 10  # words a forward trigger governs at most ("no effusion, pneumothorax or ...")
MAX_BACKWARD = 8  # words a backward trigger governs at most
RULES_FILE = Path(__file__).with_name("findings.yaml")
RULES_ENV = "CONVIRT_FINDINGS_RULES"
TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'/][a-z0-9]+)*|[;,]", re.IGNORECASE)
# Words a search term is never made of: they carry no finding (negation words are triggers).
_STOP = """a an the of in on at to for from by with and or is are was were be been being there
this that these those it its as into onto within upon over under than then which who whom whose
seen noted identified demonstrated shown shows show showing image images study exam but however
xxxx no not"""
STOP_WORDS = frozenset(_STOP.split())


@dataclass(frozen=True)
class Token:
    start: int
    end: int
    word: str  # lower case


@dataclass(frozen=True)
class Scope:
    start: int  # character offsets in the sentence
    end: int
    status: str  # absent, uncertain or historical


@dataclass(frozen=True)
class Mention:
    finding: str  # the finding's name in the rules
    phrase: str  # the words that matched, lower case
    start: int
    end: int
    status: str


@dataclass(frozen=True)
class Rules:
    triggers: dict[tuple[str, ...], tuple[tuple[str, str], ...]]  # phrase -> ((status, way),)
    pseudo: frozenset[tuple[str, ...]]
    terminate: frozenset[tuple[str, ...]]
    findings: dict[tuple[str, ...], str]  # phrase -> finding name
    longest: int
    synonyms: dict[str, tuple[str, ...]]  # finding name -> every phrase that means it

    def phrases(self, finding: str) -> tuple[str, ...]:
        return self.synonyms.get(finding, (finding,))

    @classmethod
    def parse(cls, data: dict) -> Rules:
        triggers: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        for status, ways in (data.get("triggers") or {}).items():
            if status not in PRIORITY:
                raise ValueError(f"trigger status {status!r}: use one of {', '.join(PRIORITY)}")
            for way, phrases in (ways or {}).items():
                if way not in ("forward", "backward"):
                    raise ValueError(f"trigger direction {way!r}: use forward or backward")
                for phrase in phrases or []:
                    triggers.setdefault(words_of(phrase), []).append((status, way))
        findings = {
            words_of(phrase): name
            for name, phrases in (data.get("findings") or {}).items()
            for phrase in [name, *(phrases or [])]
        }
        pseudo = frozenset(words_of(p) for p in data.get("pseudo") or [])
        terminate = frozenset(words_of(p) for p in data.get("terminate") or [])
        every = [*triggers, *pseudo, *terminate, *findings]
        synonyms: dict[str, list[str]] = {}
        for phrase, name in findings.items():
            synonyms.setdefault(name, []).append(" ".join(phrase))
        return cls(
            {k: tuple(v) for k, v in triggers.items()},
            pseudo,
            terminate,
            findings,
            max((len(p) for p in every), default=1),
            {name: tuple(phrases) for name, phrases in synonyms.items()},
        )


def words_of(text: str) -> tuple[str, ...]:
    if not isinstance(text, str):  # YAML reads bare no/yes/on/off as booleans: quote them
        raise ValueError(f"finding rules: {text!r} is not a phrase; quote it in the YAML")
    return tuple(token.word for token in tokenize(text))


def tokenize(text: str) -> list[Token]:
    return [Token(m.start(), m.end(), m.group(0).lower()) for m in TOKEN_RE.finditer(text)]


def read_rules(path: str | Path | None = None) -> Rules:
    """The rules in `path`, else CONVIRT_FINDINGS_RULES, else findings.yaml beside this module."""
    chosen = Path(path or os.environ.get(RULES_ENV) or RULES_FILE)
    return _read_rules(str(chosen.resolve()))


@lru_cache(maxsize=8)
def _read_rules(path: str) -> Rules:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"finding rules {path} cannot be read: {err}") from err
    return Rules.parse(data or {})


@dataclass(frozen=True)
class Mark:
    first: int  # token positions [first, last)
    last: int
    kind: str  # trigger, pseudo, terminate
    ways: tuple[tuple[str, str], ...] = ()


def longest_phrases(
    words: list[str], longest: int, kind_of: Callable[[tuple[str, ...]], str | None]
) -> Iterator[tuple[int, int, tuple[str, ...], str]]:
    """(first, last, phrase, kind) of the phrases `kind_of` names, the longest one first at
    each word, left to right, never overlapping."""
    i = 0
    while i < len(words):
        for size in range(min(longest, len(words) - i), 0, -1):
            phrase = tuple(words[i : i + size])
            kind = kind_of(phrase)
            if kind is not None:
                yield i, i + size, phrase, kind
                i += size
                break
        else:
            i += 1


def _marks(tokens: list[Token], rules: Rules) -> list[Mark]:
    """Triggers, pseudo-triggers and terminating words, longest phrase first at each word."""

    def kind_of(phrase: tuple[str, ...]) -> str | None:
        if phrase in rules.pseudo:
            return "pseudo"
        if phrase in rules.triggers:
            return "trigger"
        return "terminate" if phrase in rules.terminate else None

    words = [t.word for t in tokens]
    return [
        Mark(first, last, kind, rules.triggers[phrase] if kind == "trigger" else ())
        for first, last, phrase, kind in longest_phrases(words, rules.longest, kind_of)
    ]


def scopes(sentence: str, rules: Rules | None = None) -> list[Scope]:
    """The stretches of `sentence` that a trigger governs, with the status it gives them."""
    rules = rules or read_rules()
    tokens = tokenize(sentence)
    return _scopes(tokens, _marks(tokens, rules))


def _scopes(tokens: list[Token], marks: list[Mark]) -> list[Scope]:
    found = []
    for n, mark in enumerate(marks):
        for status, way in mark.ways:
            if way == "forward":
                first = mark.last
                last = marks[n + 1].first if n + 1 < len(marks) else len(tokens)
                last = min(last, first + MAX_FORWARD)
            else:
                last = mark.first
                first = marks[n - 1].last if n > 0 else 0
                first = max(first, last - MAX_BACKWARD)
            if first < last:
                found.append(Scope(tokens[first].start, tokens[last - 1].end, status))
    return found


def status_at(found: Iterable[Scope], start: int, end: int) -> str:
    """What the sentence asserts of the words at [start, end): the status of a scope covering
    them (absent over uncertain over historical), present where none does."""
    statuses = {s.status for s in found if s.start < end and start < s.end}
    return next((status for status in PRIORITY if status in statuses), "present")


def mentions(sentence: str, rules: Rules | None = None) -> list[Mention]:
    """The findings a sentence names, each with what it says of it."""
    return read_sentence(sentence, rules).mentions


@dataclass(frozen=True)
class Reading:
    """All that one sentence asserts: its findings, and its words by status (split_by_status)."""

    mentions: list[Mention]
    parts: dict[str, str]


def read_sentence(sentence: str, rules: Rules | None = None) -> Reading:
    """mentions() and split_by_status() of one sentence, tokenised and scoped once."""
    rules = rules or read_rules()
    tokens = tokenize(sentence)
    marks = _marks(tokens, rules)
    found = _scopes(tokens, marks)
    words = [t.word for t in tokens]
    result = []
    for first, last, phrase, name in longest_phrases(words, rules.longest, rules.findings.get):
        start, end = tokens[first].start, tokens[last - 1].end
        result.append(Mention(name, " ".join(phrase), start, end, status_at(found, start, end)))
    skip = {i for mark in marks if mark.kind == "trigger" for i in range(mark.first, mark.last)}
    parts: dict[str, list[str]] = {status: [] for status in STATUSES}
    for i, token in enumerate(tokens):
        if i not in skip and token.word not in (",", ";"):
            parts[status_at(found, token.start, token.end)].append(token.word)
    return Reading(result, {status: " ".join(words) for status, words in parts.items()})


def term_status(sentence: str, term: str, rules: Rules | None = None) -> str | None:
    """What the sentence asserts of `term` (a word or phrase, matched as whole words without
    case), or None where it does not mention it. The first mention decides."""
    rules = rules or read_rules()
    tokens = tokenize(sentence)
    wanted = words_of(term)
    if not wanted:
        return None
    words = [t.word for t in tokens]
    for i in range(len(words) - len(wanted) + 1):
        if tuple(words[i : i + len(wanted)]) == wanted:
            found = scopes(sentence, rules)
            return status_at(found, tokens[i].start, tokens[i + len(wanted) - 1].end)
    return None


def split_by_status(sentence: str, rules: Rules | None = None) -> dict[str, str]:
    """The sentence's words by what it asserts of them, trigger words left out: `present` is
    what the sentence says is there, `absent` what it denies, and so on."""
    return read_sentence(sentence, rules).parts


@dataclass(frozen=True)
class QueryTerms:
    """A search sentence read as the reports are: what it asks to be there and not there."""

    present: tuple[str, ...]  # content words asked for (uncertain and historical ones count)
    absent: tuple[str, ...]  # content words asked to be denied ("no pneumothorax")
    # the findings it names (rules' names): asked to be there, or denied
    findings: tuple[str, ...] = ()
    denied_findings: tuple[str, ...] = ()
    side: str | None = None  # "left" or "right" when the query names one side only

    @property
    def negated(self) -> bool:
        """The query asks only for an absence ("no pneumothorax", "without effusion")."""
        return bool(self.absent or self.denied_findings) and not (self.present or self.findings)


SIDES = {"left": "left", "lt": "left", "right": "right", "rt": "right"}


def side_of(words: Iterable[str]) -> set[str]:
    """The sides a text names ("l sided" and "r sided" too)."""
    words = list(words)
    found = {SIDES[w] for w in words if w in SIDES}
    for first, second in pairwise(words):
        if second == "sided" and first in ("l", "r"):
            found.add("left" if first == "l" else "right")
        if first in ("bilateral", "both"):
            found.update(("left", "right"))
    return found


def query_terms(text: str, rules: Rules | None = None) -> QueryTerms:
    """The words and findings a query asks for, and those it asks to be denied. Words that make
    up a finding's name ("pleural effusion") are asked for as the finding, which its synonyms
    match too ("hydrothorax"), not word by word."""
    rules = rules or read_rules()
    reading = read_sentence(text, rules)
    covered = {w for m in reading.mentions for w in words_of(m.phrase)}
    asked = " ".join(reading.parts[s] for s in ("present", "uncertain", "historical")).split()
    denied = reading.parts["absent"].split()
    findings = dict.fromkeys(m.finding for m in reading.mentions if m.status != "absent")
    denied_findings = dict.fromkeys(m.finding for m in reading.mentions if m.status == "absent")
    sides = side_of(words_of(text))
    return QueryTerms(
        content_words(" ".join(w for w in asked if w not in covered)),
        content_words(" ".join(w for w in denied if w not in covered)),
        tuple(findings),
        tuple(denied_findings),
        sides.pop() if len(sides) == 1 else None,
    )


def stem(word: str) -> str:
    """A crude English stem, enough to match "effusions" to "effusion" and "fractured" to
    "fracture" when comparing a query's words with a sentence's (FTS5 stems its own)."""
    for suffix, keep in (
        ("ies", "y"),
        ("sses", "ss"),
        ("es", "e"),
        ("s", ""),
        ("ed", "e"),
        ("ing", "e"),
    ):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            return word[: -len(suffix)] + keep
    return word


def content_words(text: str) -> tuple[str, ...]:
    """The words of `text` a lexical match counts: no stop words, no bare numbers, no repeats."""
    seen: dict[str, None] = {}
    for token in tokenize(text):
        word = token.word
        if word not in STOP_WORDS and not word.isdigit() and len(word) > 1 and word not in ",;":
            seen.setdefault(word, None)
    return tuple(seen)
