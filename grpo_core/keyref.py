"""The key reference that `--help` prints: every config key with its type,
default, allowed values and the comment written beside the field.

The comments are read from the dataclass's own source (ast for the fields,
tokenize for the comments), so the comment next to a field in config.py is
the one and only description of it: a field's trailing comment plus the
block of comment lines directly above it.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import textwrap
import tokenize
import typing
from typing import Any, Mapping


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} for dataclass `cls` ("" where it has none or the source is missing)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: the reference still lists types and defaults
        return {}
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        row = node.lineno - 1
        while row in comments and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        trailing = [comments[r] for r in range(node.lineno, (node.end_lineno or node.lineno) + 1) if r in comments]
        out[node.target.id] = " ".join(above + trailing)
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _shown(value: Any) -> str:
    """A value as it is written in an override."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return str(value)


@dataclasses.dataclass(frozen=True)
class Key:
    name: str  # dotted, with the prefix
    type: str
    default: str
    choices: tuple[str, ...]
    comment: str


def keys(cls: type, prefix: str = "", choices: Mapping[str, tuple[Any, ...]] | None = None) -> list[Key]:
    """Every leaf key of dataclass `cls`, depth first; `choices` is keyed without `prefix`."""
    choices = choices or {}
    out: list[Key] = []

    def walk(klass: type, path: str) -> None:
        klass_hints = typing.get_type_hints(klass)
        klass_comments = field_comments(klass)
        for f in dataclasses.fields(klass):
            tp = klass_hints[f.name]
            name = f"{path}{f.name}"
            if dataclasses.is_dataclass(tp):
                walk(tp, name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append(Key(prefix + name, _type_name(tp), _shown(default),
                           tuple(_shown(c) for c in choices.get(name, ())), klass_comments.get(f.name, "")))

    walk(cls, "")
    return out


def format_keys(cls: type, prefix: str = "", choices: Mapping[str, tuple[Any, ...]] | None = None,
                width: int = 100) -> str:
    """The reference as text: `key = default  (type; one of: ...)` and the comment below it."""
    lines: list[str] = []
    section = None
    for key in keys(cls, prefix, choices):
        head = key.name.rsplit(".", 1)[0] if "." in key.name[len(prefix):] else prefix.rstrip(".")
        if head != section:
            lines.append(f"\n[{head}]" if head else "")
            section = head
        kind = key.type + (f"; one of: {', '.join(key.choices)}" if key.choices else "")
        lines.append(f"  {key.name} = {key.default}  ({kind})")
        if key.comment:
            lines += textwrap.wrap(key.comment, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines).lstrip("\n")
