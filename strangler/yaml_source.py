"""YAML text to plain Python values, remembering where every key was written.

The rule checker needs to say `rules.yaml:14: routes[2].split: ...`, which
plain `yaml.safe_load` cannot tell it. So the text is composed into PyYAML's
node tree and walked here: each key path gets the 1-based line it was written
on, `${VAR}` references in string values are filled from an environment
mapping, and duplicate keys are reported instead of silently overwritten.

Scalars follow YAML 1.2 rather than PyYAML's YAML 1.1 defaults: only
`true`/`false` are booleans (so `noise: off` stays the word "off") and
`1:30` is text, not the sexagesimal number 90.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from strangler.errors import RuleProblem

__all__ = ["Document", "KeyPath", "format_key", "load_yaml"]

KeyPath = tuple[str | int, ...]

# Aliases can make a small text expand into a huge tree; stop well before that.
MAX_NODES = 100_000

_STR = "tag:yaml.org,2002:str"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_MERGE = "tag:yaml.org,2002:merge"
_VALUE = "tag:yaml.org,2002:value"

_VARIABLE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VARIABLE_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


class _Loader(yaml.SafeLoader):
    """SafeLoader that resolves booleans and integers the YAML 1.2 way."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regex) for tag, regex in resolvers if tag not in (_BOOL, _INT, _VALUE)
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+|0o[0-7_]+)$"),
    list("-+0123456789"),
)


@dataclass(frozen=True, slots=True)
class Document:
    """A parsed YAML document: its value, key lines and the problems found.

    `bad_paths` are the key paths already reported here (an unset variable, a
    duplicate key), so a checker can avoid a second message about them.
    """

    source: str
    value: Any
    lines: Mapping[KeyPath, int]
    problems: tuple[RuleProblem, ...] = ()
    bad_paths: frozenset[KeyPath] = frozenset()
    syntax_error: bool = False

    def line_of(self, path: KeyPath) -> int:
        """The line of `path`, or of its nearest written ancestor."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return 1


def format_key(path: KeyPath) -> str:
    """Spell a key path the way users read it: `routes[2].split[0].weight`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text


def load_yaml(
    text: str, source: str, environ: Mapping[str, str] | None = None
) -> Document:
    """Parse one YAML document from `text`; `source` names it in problems."""
    text, references = _hide_references(text)
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        problem = RuleProblem(source, _error_line(exc, text), "", _error_text(exc))
        return Document(source, None, {}, (problem,), syntax_error=True)
    finally:
        loader.dispose()

    if root is None:
        return Document(source, None, {})
    walker = _Walker(loader, source, environ if environ is not None else {})
    walker.references = references
    value = walker.build(root, ())
    return Document(
        source,
        value,
        walker.lines,
        tuple(walker.problems),
        frozenset(walker.bad_paths),
    )


_REFERENCE = re.compile(r"(?<!\$)\$\{[^}\n]*\}")
_TEMPLATE_NAMES = ("route", "upstream")
_PLACEHOLDER = re.compile(r"__strangler_ref_(\d+)__")


def _hide_references(text: str) -> tuple[str, list[str]]:
    """Swap each `${...}` for a plain placeholder before YAML sees the text.

    `{` opens a flow mapping in YAML, so `token: ${X}` inside `{...}` would
    not parse. Placeholders keep every line where it was; `_scalar` puts the
    reference back and expands it.
    """
    found: list[str] = []

    def hide(match: re.Match[str]) -> str:
        found.append(match.group(0))
        return f"__strangler_ref_{len(found) - 1}__"

    return _REFERENCE.sub(hide, text), found


def _error_line(exc: yaml.YAMLError, text: str) -> int:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return int(mark.line) + 1
    position = getattr(exc, "position", None)
    if isinstance(position, int):
        return text.count("\n", 0, position) + 1
    return 1


def _error_text(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    if problem is None:
        return f"invalid YAML: {exc}"
    context = getattr(exc, "context", None)
    return f"invalid YAML: {problem}" + (f" ({context})" if context else "")


@dataclass
class _Walker:
    """Turns a node tree into values, recording lines and problems on the way."""

    loader: _Loader
    source: str
    environ: Mapping[str, str]
    lines: dict[KeyPath, int] = field(default_factory=dict)
    problems: list[RuleProblem] = field(default_factory=list)
    bad_paths: set[KeyPath] = field(default_factory=set)
    references: list[str] = field(default_factory=list)
    _active: set[int] = field(default_factory=set)
    _visited: int = 0

    def report(self, node: Node, path: KeyPath, message: str) -> None:
        line = node.start_mark.line + 1
        self.problems.append(RuleProblem(self.source, line, format_key(path), message))
        self.bad_paths.add(path)

    def build(self, node: Node, path: KeyPath) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        self._visited += 1
        if self._visited > MAX_NODES:
            if self._visited == MAX_NODES + 1:
                self.report(node, path, f"more than {MAX_NODES} values after aliases")
            return None
        if id(node) in self._active:
            self.report(node, path, "an alias refers to a value that contains it")
            return None

        self._active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            if isinstance(node, SequenceNode):
                return [
                    self.build(item, (*path, i)) for i, item in enumerate(node.value)
                ]
            # The composer builds only these three kinds of node.
            return self._scalar(cast(ScalarNode, node), path)
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: MappingNode, path: KeyPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, key_node, value_node in self._merged_pairs(node, path):
            child = (*path, key)
            self.lines[child] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, child)
        return result

    def _merged_pairs(
        self, node: MappingNode, path: KeyPath
    ) -> list[tuple[str, Node, Node]]:
        """Explicit pairs after `<<` merged ones, so explicit keys win."""
        merged: dict[str, tuple[Node, Node]] = {}
        explicit: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merged.update(self._merge_sources(value_node, path))
                continue
            if not isinstance(key_node, ScalarNode):
                self.report(key_node, path, "a mapping key must be a plain name")
                continue
            key = str(key_node.value)
            if key in explicit:
                first = explicit[key][0].start_mark.line + 1
                self.report(
                    key_node, (*path, key), f"duplicate key (first on line {first})"
                )
                continue
            explicit[key] = (key_node, value_node)
        merged.update(explicit)
        return [(key, pair[0], pair[1]) for key, pair in merged.items()]

    def _merge_sources(self, node: Node, path: KeyPath) -> dict[str, tuple[Node, Node]]:
        """Pairs from a `<<: *a` or `<<: [*a, *b]` value; earlier sources win."""
        sources = node.value if isinstance(node, SequenceNode) else [node]
        pairs: dict[str, tuple[Node, Node]] = {}
        for source in reversed(sources):
            if not isinstance(source, MappingNode) or id(source) in self._active:
                self.report(node, path, "`<<` must merge one mapping or a list of them")
                continue
            self._active.add(id(source))
            try:
                for key, key_node, value_node in self._merged_pairs(source, path):
                    pairs[key] = (key_node, value_node)
            finally:
                self._active.discard(id(source))
        return pairs

    def _scalar(self, node: ScalarNode, path: KeyPath) -> Any:
        if "__strangler_ref_" in node.value:
            restored = _PLACEHOLDER.sub(
                lambda m: self.references[int(m.group(1))], node.value
            )
            tag = _STR if node.style is None else node.tag
            node = ScalarNode(tag, restored, node.start_mark, node.end_mark, node.style)
        if node.tag == _STR and "$" in node.value:
            text = self._expand(node, path)
            tag = node.tag
            if node.style is None:
                tag = self.loader.resolve(ScalarNode, text, (True, False))
            node = ScalarNode(tag, text, node.start_mark, node.end_mark, node.style)
        try:
            return self.loader.construct_object(node)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            self.report(node, path, f"cannot read this value: {problem}")
            return None

    def _expand(self, node: ScalarNode, path: KeyPath) -> str:
        """Fill `${VAR}` and `${VAR:-default}`; `$${` stands for a literal `${`."""

        def replace(found: re.Match[str]) -> str:
            whole = found.group(0)
            if whole == "$${":
                return "${"
            if (found.group(1) or "").startswith("request.header."):
                return whole
            body = _VARIABLE_BODY.fullmatch(found.group(1) or "")
            if body is None:
                self.report(
                    node,
                    path,
                    f"bad variable reference {whole!r}; write ${{NAME}} "
                    "or ${NAME:-default}",
                )
                return whole
            name, default = body.group(1), body.group(2)
            if name in _TEMPLATE_NAMES and default is None:
                # ${route} and ${upstream} are filled per request, not from
                # the environment.
                return whole
            value = self.environ.get(name)
            if value:
                return value
            if default is not None:
                return default
            if value is None:
                self.report(node, path, f"environment variable {name} is not set")
                return whole
            return value

        return _VARIABLE.sub(replace, str(node.value))
