r"""rank_pattern / alpha_pattern keys, matched with PEFT's meaning and in bounded time.

PEFT matches a key with ``re.match(rf"(.*\.)?({key})$", name)``; see the comment below for how a
hostile key is kept from hanging every command. ``matcher(key)`` is the one entry point.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from adapterops.errors import AdapterFormatError

# ----------------------------------------------------------------------------------------------------
# Pattern keys, matched exactly and in bounded time.
#
# PEFT matches a rank_pattern / alpha_pattern key with re.match(rf"(.*\.)?({key})$", name), and re
# backtracks: a key such as ([\w.]+)+! takes exponential time on a long module name, so a config
# file alone could hang every command. A key that cannot make re backtrack (no alternation, no
# repeat beyond PEFT's own prefix: every ordinary key) is matched by re itself. Any other key is
# matched on re's own parse of the pattern by a set-of-positions evaluation: each node maps the set
# of positions a match may have reached (an int used as a bit set) to the set it may reach next, so
# the meaning of every character class, flag and anchor is re's (each class is tested with re) and
# only the search differs, polynomial instead of exponential, and bounded by a step budget.
# Constructs whose result depends on re's search order or that no bounded search can decide
# (backreferences, conditionals, atomic groups, possessive repeats) are refused there.
#
# Not google-re2: RE2 reads some patterns differently from re ($ before a final newline, \w \d \s
# and \b beyond ASCII, {,n}, [[:alpha:]]), and it has no wheels for some platforms (musl).


def shown(value: Any) -> str:
    """``repr(value)``, cut to 60 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


MAX_PATTERN = 1024  # characters in a pattern key, and in a module name matched against patterns
_BUDGET = 20_000  # evaluation steps for one key against one name (~10 ms); ordinary keys take < 500

_parser: Any = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")
_ops: Any = importlib.import_module("re._constants" if sys.version_info >= (3, 11) else "sre_constants")
_REPEATS = {_ops.MAX_REPEAT, _ops.MIN_REPEAT, getattr(_ops, "POSSESSIVE_REPEAT", _ops.MAX_REPEAT)}
_REFUSED = {_ops.GROUPREF: "a backreference", _ops.GROUPREF_EXISTS: "a conditional group"}
if sys.version_info >= (3, 11):  # atomic groups and possessive repeats arrived in 3.11
    _REFUSED.update({_ops.ATOMIC_GROUP: "an atomic group", _ops.POSSESSIVE_REPEAT: "a possessive repeat"})
_CATEGORIES = {
    _ops.CATEGORY_DIGIT: r"\d",
    _ops.CATEGORY_NOT_DIGIT: r"\D",
    _ops.CATEGORY_SPACE: r"\s",
    _ops.CATEGORY_NOT_SPACE: r"\S",
    _ops.CATEGORY_WORD: r"\w",
    _ops.CATEGORY_NOT_WORD: r"\W",
}
_CHAR_FLAGS = re.IGNORECASE | re.DOTALL | re.ASCII  # what a single character's test depends on
_MAX_DEPTH = 100


@functools.lru_cache(maxsize=16384)  # one per key; configs written per module can have thousands
def matcher(key: str) -> Callable[[str], bool]:
    """A function telling whether PEFT's ``re.match(rf"(.*\\.)?({key})$", name)`` matches ``name``.

    Raises ``AdapterFormatError`` (without a file name: callers add it) for a key that is no valid
    pattern, is too long or too deeply nested, or uses a construct refused above.
    """
    what = f"pattern key {shown(key)}"
    if len(key) > MAX_PATTERN:
        raise AdapterFormatError(f"{what} is {len(key):,} characters, more than the {MAX_PATTERN:,} allowed")
    text = rf"(.*\.)?({key})$"
    try:
        compiled = re.compile(text)
        tree = _parser.parse(text, 0)
    except re.error as exc:  # positions count from the start of the key, not of PEFT's wrapping
        at = "" if exc.pos is None else f" at character {min(max(exc.pos - 8, 0), len(key))} of the key"
        raise AdapterFormatError(f"{what} is not a valid regular expression ({exc.msg}{at})") from None
    except RecursionError:
        raise AdapterFormatError(f"{what} nests groups too deeply") from None
    ops = [op for op, _ in _walk(tree, what)]
    if _ops.BRANCH not in ops and _ops.GROUPREF_EXISTS not in ops and sum(op in _REPEATS for op in ops) == 2:
        # only the prefix's (.*\.)? chooses: re tries at most 2 * len(name) ways, each in linear time
        return lambda name: compiled.match(name) is not None
    for op in ops:
        if op in _REFUSED:
            raise AdapterFormatError(
                f"{what} uses {_REFUSED[op]} together with repeats or alternatives, which adapterops cannot "
                "match in bounded time; write it without, or list the module names"
            )
    node = _build(tree, tree.state.flags)

    def match(name: str) -> bool:
        return node.ends(1, _Subject(name, what)) != 0

    return match


def _walk(tree: Any, what: str) -> Iterator[tuple[Any, Any]]:
    """Every (op, argument) of a parsed pattern, nested ones included; refuses deep nesting."""
    stack = [(tree, 0)]
    while stack:
        items, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise AdapterFormatError(f"{what} nests groups more than {_MAX_DEPTH} deep")
        for op, av in items:
            yield op, av
            stack.extend((child, depth + 1) for child in _children(op, av))


def _children(op: Any, av: Any) -> list[Any]:
    if op is _ops.BRANCH:
        return list(av[1])
    if op is _ops.SUBPATTERN or op in _REPEATS or op in (_ops.ASSERT, _ops.ASSERT_NOT):
        return [av[-1]]
    if op is _ops.GROUPREF_EXISTS:
        return [p for p in av[1:] if p is not None]
    if op is getattr(_ops, "ATOMIC_GROUP", None):
        return [av]
    return []


def _build(items: Any, flags: int) -> _Node:
    nodes = [_build_one(op, av, flags) for op, av in items]
    return nodes[0] if len(nodes) == 1 else _Seq(nodes)


def _build_one(op: Any, av: Any, flags: int) -> _Node:
    if op in (_ops.LITERAL, _ops.NOT_LITERAL, _ops.ANY, _ops.IN):
        return _Char(_char_test(_char_source(op, av), flags & _CHAR_FLAGS))
    if op is _ops.BRANCH:
        return _Alt([_build(branch, flags) for branch in av[1]])
    if op is _ops.SUBPATTERN:
        _, add, remove, sub = av
        if add & (re.ASCII | re.UNICODE):  # re._compiler._combine_flags: one type flag replaces the other
            flags &= ~(re.ASCII | re.UNICODE)
        return _build(sub, (flags | add) & ~remove)
    if op in (_ops.MAX_REPEAT, _ops.MIN_REPEAT):  # lazy or greedy: the same set of possible ends
        lo, hi, sub = av
        return _Repeat(lo, None if hi == _ops.MAXREPEAT else hi, _build(sub, flags))
    if op is _ops.AT:
        return _At(av, flags)
    if op in (_ops.ASSERT, _ops.ASSERT_NOT):
        direction, sub = av
        width = sub.getwidth()[0] if direction < 0 else 0  # re requires lookbehinds of fixed width
        return _Look(_build(sub, flags), op is _ops.ASSERT_NOT, direction < 0, width)
    raise AdapterFormatError(
        f"pattern uses the construct {op}, which adapterops cannot match in bounded time"
    )


def _char_source(op: Any, av: Any) -> str:
    """One character's test as a pattern of its own (``re`` decides it, flags and all)."""
    if op is _ops.LITERAL:
        return re.escape(chr(av))
    if op is _ops.NOT_LITERAL:
        return f"[^{re.escape(chr(av))}]"
    if op is _ops.ANY:
        return "."
    parts = []
    for item, value in av:
        if item is _ops.NEGATE:
            parts.append("^")
        elif item is _ops.LITERAL:
            parts.append(re.escape(chr(value)))
        elif item is _ops.RANGE:
            parts.append(f"{re.escape(chr(value[0]))}-{re.escape(chr(value[1]))}")
        elif item is _ops.CATEGORY and value in _CATEGORIES:
            parts.append(_CATEGORIES[value])
        else:
            raise AdapterFormatError(f"uses the set item {item}, which adapterops cannot match")
    return f"[{''.join(parts)}]"


@functools.lru_cache(maxsize=4096)
def _char_test(source: str, flags: int) -> re.Pattern[str]:
    return re.compile(source, flags)


class _Subject:
    """A module name being matched: its per-test position masks, and the step budget."""

    def __init__(self, text: str, what: str) -> None:
        self.text, self.what, self.steps = text, what, 0
        self.masks: dict[object, int] = {}

    def tick(self, steps: int = 1) -> None:
        self.steps += steps
        if self.steps > _BUDGET:
            raise AdapterFormatError(
                f"{self.what} needs more than {_BUDGET:,} steps to match module {shown(self.text)}; "
                "simplify it, or list the module names"
            )

    def mask(self, test: re.Pattern[str]) -> int:
        """Bit p set where character p passes ``test``."""
        if test not in self.masks:
            self.tick(len(self.text) // 64 + 1)
            seen: dict[str, bool] = {}
            bits = "".join(
                "1" if seen.setdefault(ch, test.fullmatch(ch) is not None) else "0"
                for ch in reversed(self.text)
            )
            self.masks[test] = int(bits or "0", 2)
        return self.masks[test]


class _Node:
    def ends(self, starts: int, subject: _Subject) -> int:
        """The positions a match of this node may end at, from any of the positions in ``starts``."""
        raise NotImplementedError


class _Char(_Node):
    def __init__(self, test: re.Pattern[str]) -> None:
        self.test = test

    def ends(self, starts: int, subject: _Subject) -> int:
        subject.tick()
        return (starts & subject.mask(self.test)) << 1


class _Seq(_Node):
    def __init__(self, nodes: list[_Node]) -> None:
        self.nodes = nodes

    def ends(self, starts: int, subject: _Subject) -> int:
        subject.tick()
        for node in self.nodes:
            if not starts:
                break
            starts = node.ends(starts, subject)
        return starts


class _Alt(_Node):
    def __init__(self, nodes: list[_Node]) -> None:
        self.nodes = nodes

    def ends(self, starts: int, subject: _Subject) -> int:
        subject.tick()
        found = 0
        for node in self.nodes:
            found |= node.ends(starts, subject)
        return found


class _Repeat(_Node):
    def __init__(self, lo: int, hi: int | None, body: _Node) -> None:
        self.lo, self.hi, self.body = lo, hi, body

    def ends(self, starts: int, subject: _Subject) -> int:
        subject.tick()
        current = starts
        for _ in range(self.lo):
            after = self.body.ends(current, subject)
            if after == current:  # a fixed point: further passes change nothing
                break
            current = after
            if not current:
                return 0
        if self.hi is None and isinstance(self.body, _Char):
            # one class, any number of times: from each start, through the run of passing characters
            # after it, all at once (adding the mask carries each start bit to the end of its run)
            passing = subject.mask(self.body.test)
            return current | (((current & passing) + passing) ^ passing)
        # positions are expanded once, when first reached: reached again later, they have fewer
        # passes left, so they can add nothing (ends() is a union over single starts)
        found, frontier, count = current, current, self.lo
        while frontier and (self.hi is None or count < self.hi):
            after = self.body.ends(frontier, subject)
            frontier = after & ~found
            found |= after
            count += 1
        return found


class _At(_Node):
    def __init__(self, code: Any, flags: int) -> None:
        self.code, self.flags = code, flags
        self.word = _char_test(r"\w", flags & re.ASCII)

    def ends(self, starts: int, subject: _Subject) -> int:
        subject.tick()
        if self not in subject.masks:
            subject.tick(len(subject.text) // 64 + 1)
            subject.masks[self] = sum(
                1 << p for p in range(len(subject.text) + 1) if self._holds(subject.text, p)
            )
        return starts & subject.masks[self]

    def _holds(self, s: str, p: int) -> bool:
        """re's anchor semantics (``_sre``'s ``SRE(at)``), position ``p`` of ``s``."""
        n, multiline, ops = len(s), self.flags & re.MULTILINE, _ops
        if self.code is ops.AT_BEGINNING:
            return p == 0 or (bool(multiline) and s[p - 1] == "\n")
        if self.code is ops.AT_BEGINNING_STRING:
            return p == 0
        if self.code is ops.AT_END:
            if multiline:
                return p == n or s[p] == "\n"
            return p == n or (p == n - 1 and s[p] == "\n")
        if self.code is ops.AT_END_STRING:
            return p == n
        if self.code in (ops.AT_BOUNDARY, ops.AT_NON_BOUNDARY):
            if n == 0:  # neither \b nor \B matches in an empty string
                return False
            before = p > 0 and self.word.fullmatch(s[p - 1]) is not None
            after = p < n and self.word.fullmatch(s[p]) is not None
            return (before != after) == (self.code is ops.AT_BOUNDARY)
        raise AdapterFormatError(f"uses the anchor {self.code}, which adapterops cannot match")


class _Look(_Node):
    def __init__(self, body: _Node, negate: bool, behind: bool, width: int) -> None:
        self.body, self.negate, self.behind, self.width = body, negate, behind, width

    def ends(self, starts: int, subject: _Subject) -> int:
        subject.tick()
        if self not in subject.masks:
            holds = 0
            for p in range(len(subject.text) + 1):
                if self.behind:
                    ok = p >= self.width and (self.body.ends(1 << (p - self.width), subject) >> p) & 1 == 1
                else:
                    ok = self.body.ends(1 << p, subject) != 0
                if ok != self.negate:
                    holds |= 1 << p
            subject.masks[self] = holds
        return starts & subject.masks[self]
