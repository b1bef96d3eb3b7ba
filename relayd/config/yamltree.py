"""relay.yaml as a tree of nodes that keep their line and column, and the error that names them.

Takes: the bytes of a YAML file written by the operator (untrusted in size,
shape and encoding). Emits: `Node`s (`Scalar`, `Seq`, `Map`) each with its
1-based `Pos`, or a `ConfigError` whose `ConfigProblem`s print as
``relay.yaml:LINE:COL: sentence``. Fails: a file too big, not UTF-8 or not
YAML stops at once with one problem; a duplicate, merge or non-scalar key is
reported through the caller's `report` callback and left out of the tree.

The YAML is composed into nodes rather than loaded, so every key and value keeps
its line and column, and a duplicate key is an error instead of pyyaml's silent
"last one wins".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import yaml

# A relay.yaml for thousands of tenants stays far below this; a bigger file is a mistake.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Deeper nesting than this only comes from a self-referencing YAML alias.
_MAX_DEPTH = 40

# --------------------------------------------------------------------------- problems


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with the file, at a 1-based line and column (0: the whole file)."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        if self.line <= 0:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class ConfigError(Exception):
    """relay.yaml could not be used; `problems` lists every reason, in file order."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)

# --------------------------------------------------------------------------- YAML tree
# The composed YAML becomes a tiny tree of our own: each node and each mapping
# key keeps its 1-based position.


@dataclass(frozen=True, slots=True)
class Pos:
    line: int
    col: int


@dataclass(frozen=True, slots=True)
class Scalar:
    value: object  # str, int, float, bool, None, or another YAML scalar type
    pos: Pos
    raw: str = ""  # the text as written, before YAML resolved its type
    broken: bool = False  # could not be read; already reported, so not checked again


@dataclass(frozen=True, slots=True)
class Seq:
    items: tuple[Node, ...]
    pos: Pos


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    key_pos: Pos
    value: Node


@dataclass(frozen=True, slots=True)
class Map:
    entries: tuple[Entry, ...]
    pos: Pos

    def entry(self, key: str) -> Entry | None:
        for e in self.entries:
            if e.key == key:
                return e
        return None

    def value(self, key: str) -> Node | None:
        """The value under `key`; None when the key is absent or its value is null."""
        e = self.entry(key)
        if e is None or is_null(e.value):
            return None
        return e.value


Node = Union[Scalar, Seq, Map]


def is_null(node: Node) -> bool:
    return isinstance(node, Scalar) and node.value is None and not node.broken


def is_broken(node: Node) -> bool:
    return isinstance(node, Scalar) and node.broken


def _pos(mark: yaml.Mark | None) -> Pos:
    if mark is None:
        return Pos(1, 1)
    return Pos(mark.line + 1, mark.column + 1)


class TreeBuilder:
    """Turns composed pyyaml nodes into `Node`s, reporting duplicate and odd keys."""

    def __init__(self, report: Callable[[Pos, str], None]) -> None:
        self._report = report
        self._constructor = yaml.constructor.SafeConstructor()
        # An alias refers to the same composed node; converting it once keeps
        # "billion laughs" documents linear.
        self._done: dict[int, Node] = {}

    def build(self, node: yaml.Node, depth: int = 0) -> Node:
        here = _pos(node.start_mark)
        if depth > _MAX_DEPTH:
            self._report(here, f"nesting is deeper than {_MAX_DEPTH} levels (a self-referencing alias?)")
            return Scalar(None, here)
        known = self._done.get(id(node))
        if known is not None:
            return known
        built: Node
        if isinstance(node, yaml.MappingNode):
            built = Map(tuple(self._entries(node, depth)), here)
        elif isinstance(node, yaml.SequenceNode):
            built = Seq(tuple(self.build(n, depth + 1) for n in node.value), here)
        else:
            built = self._scalar(node, here)
        self._done[id(node)] = built
        return built

    def _scalar(self, node: yaml.Node, here: Pos) -> Scalar:
        try:
            return Scalar(self._constructor.construct_object(node, deep=True), here, str(node.value))
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            # An explicit tag that does not fit the text (!!int abc) or an unknown tag.
            # The text itself is not repeated: it could be a secret.
            problem = getattr(exc, "problem", None) or f"this value cannot be read as {node.tag}"
            self._report(here, str(problem))
            return Scalar(None, here, "", broken=True)

    def _entries(self, node: yaml.MappingNode, depth: int) -> Iterator[Entry]:
        seen: dict[str, Pos] = {}
        for key_node, value_node in node.value:
            key_pos = _pos(key_node.start_mark)
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._report(key_pos, "merge keys (<<) are not supported here; write the keys out")
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._report(key_pos, "a key must be a plain name, not a list or a mapping")
                continue
            key = str(key_node.value)
            if key in seen:
                first = seen[key]
                self._report(
                    key_pos,
                    f"duplicate key '{key}'; it is already set at line {first.line}, "
                    "and only one value can apply",
                )
                continue
            seen[key] = key_pos
            yield Entry(key, key_pos, self.build(value_node, depth + 1))



def read_text(path: Path, file: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([ConfigProblem(file, 0, 0, f"cannot read the file: {exc.strerror}")]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigProblem(file, 0, 0, f"the file is larger than "
                                                     f"{MAX_CONFIG_BYTES // 1024 // 1024} MiB")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([ConfigProblem(file, line, 1, "the file is not valid UTF-8")]) from None


def compose(text: str, file: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        pos = _pos(exc.problem_mark or exc.context_mark)
        what = exc.problem or "the YAML cannot be read"
        if exc.context:
            at = f" at line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
            if what.startswith("but "):  # "expected a single document ..., but found another"
                what = f"{exc.context}{at}, {what}"
            else:
                what = f"{what} ({exc.context}{at})"
        if "block" in what or "indentation" in what:
            what += "; check the indentation"
        raise ConfigError([ConfigProblem(file, pos.line, pos.col, f"YAML syntax error: {what}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(file, 0, 0, f"YAML syntax error: {exc}")]) from None
