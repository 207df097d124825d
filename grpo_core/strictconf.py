"""Strict typed data: frozen dataclasses built from plain data (YAML) and dotted
`key=value` overrides, one line per mistake naming the valid keys, and where
in which file a bad key is. Knows no config: grpo_core.config (the trainer's)
and jobs.profiles (a cluster profile's) are built with it."""
from __future__ import annotations

import dataclasses
import re
import typing
import unicodedata
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake; its message is one line."""


# The dotted key a message starts with ("unknown key 'a.b'", "a.b: expected", "a.b=3 must"),
# to point at its line in the YAML file it came from.
_MESSAGE_KEY = re.compile(r"^(?:unknown key ')?([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)+)")


# ---------------------------------------------------------------- building

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if typing.get_origin(tp) is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp))


INT_MAX = 2**31 - 1  # every int key reaches a C int somewhere (torch threads, numpy seeds, vLLM lengths)
_SHOWN_MAX = 80  # characters of a bad value echoed in a message


def shown(value: Any) -> str:
    """repr(value), cut: a 5000-digit number is named, not echoed."""
    text = repr(value)
    return text if len(text) <= _SHOWN_MAX else f"{text[:_SHOWN_MAX]}... ({len(text)} characters)"


def _check_value(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {sorted(_field_types(tp))}, got {value!r}")
        return build(tp, value, where + ".")
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):  # one item, commas and all (a setup line may hold commas)
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, _ellipsis) = typing.get_args(tp)
        return tuple(_check_value(inner, v, where) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {shown(value)}")
    return value


def build(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data, strictly."""
    data = dict(data or {})
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'; valid keys under '{prefix.rstrip('.') or '<top>'}': "
            + ", ".join(sorted(types))
        )
    kwargs = {name: _check_value(types[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _parse_scalar(tp: Any, text: str, key: str) -> Any:
    if tp is str:
        return text
    if typing.get_origin(tp) is tuple:
        return _parse_list(text, key)
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected bool (true/false), got {shown(text)}")
    try:
        return tp(text) if tp is not int else int(text, 10)
    except ValueError:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {shown(text)}") from None


def _parse_list(text: str, key: str) -> list[Any]:
    """A list override: `[...]` is a YAML/JSON list (quote items that hold commas:
    `["export A=x,y", "module load cuda"]`); any other text is one item, commas and all."""
    if not text.strip().startswith("["):
        return [text] if text.strip() else []
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: a value starting with '[' is a YAML list, and this one is not "
                          f"({str(exc).splitlines()[0]}); write [\"a, b\", \"c\"], or {key}+=LINE for one item") from None
    if not isinstance(value, list):
        raise ConfigError(f"{key}: a value starting with '[' is a YAML list like [\"a\", \"b\"]; got {text!r} "
                          f"(one item: {key}+=LINE)")
    return value


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with dotted `key=value` overrides applied.

    Values are parsed against the field type declared in `cls`, so the same
    text means the same thing on the command line and in YAML. A list key
    takes `key=[...]` (a YAML list), `key=ITEM` (a one-item list) or
    `key+=ITEM` (appended to the list so far).
    """
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        append = key.endswith("+")
        key = key[:-1] if append else key
        parts = key.strip().split(".")
        tp: Any = cls
        node = out
        for depth, part in enumerate(parts):
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"override {key!r}: '{'.'.join(parts[:depth])}' is not a section")
            types = _field_types(tp)
            if part not in types:
                where = ".".join(parts[:depth]) or "<top>"
                raise ConfigError(f"unknown key '{key}'; valid keys under '{where}': " + ", ".join(sorted(types)))
            tp = types[part]
            if depth == len(parts) - 1:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"override {key!r} names a section; use one of: " + ", ".join(sorted(_field_types(tp))))
                if append:  # one item, verbatim (a shell line may start with `[`)
                    if typing.get_origin(tp) is not tuple:
                        raise ConfigError(f"override {key}+=...: '+=' appends to a list key; {key} is {_type_name(tp)}")
                    before = node.get(part, [])
                    node[part] = [*([before] if isinstance(before, str) else before), text]
                else:
                    node[part] = _parse_scalar(tp, text, key)
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {key!r}: '{part}' is not a section")
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return ConfigError(f"{where}: not valid YAML: {problem}")


class _Loader(yaml.SafeLoader):
    """SafeLoader, except that YAML 1.1's base-60 numbers stay text: `time: 4:00:00` is a Slurm
    time (not the int 14400), the same value as `cluster.time=4:00:00` on the command line."""


_Loader.yaml_implicit_resolvers = {  # int and float resolvers that do not match text with a ':'
    first: [(tag, re.compile("^(?!.*:)" + rx.pattern.removeprefix("^"), rx.flags)
             if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") else rx) for tag, rx in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    except ValueError as exc:  # a number with more digits than Python converts (int's 4300-digit limit)
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0][:200]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def yaml_lines(path: str | Path) -> dict[str, int]:
    """Dotted key -> its 1-based line in the file ({} if unreadable)."""
    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}{key.value}"
                lines.setdefault(name, key.start_mark.line + 1)
                walk(value, name + ".")

    walk(root, "")
    return lines


def locate(message: str, files: Sequence[tuple[str | Path, str]], overridden: Sequence[str] = ()) -> str:
    """`message` prefixed with "file:line: " of the key it names, if a file sets that key
    (or with "override: " when the command line set it).

    `files`: (path, prefix its keys get), most specific first (a profile before what it extends).
    """
    match = _MESSAGE_KEY.match(message)
    if not match:
        return message
    key = match.group(1)
    if any(key == o or key.startswith(o + ".") or o.startswith(key + ".") for o in overridden):
        return f"override: {message}"
    for path, prefix in files:
        lines = yaml_lines(path)
        for candidate in (key, key.rsplit(".", 1)[0]):
            if prefix + candidate in lines or (not prefix and candidate in lines):
                return f"{path}:{lines[prefix + candidate]}: {message}"
    return message


def has_control_chars(text: str) -> bool:
    """Newlines, tabs, escapes, other control/format characters: never part of a value."""
    return any(unicodedata.category(ch)[0] == "C" for ch in text)


def check_text(data: Mapping[str, Any], prefix: str = "") -> None:
    """Reject control characters in every string value: a newline would end a line
    of the job script (a new command, a new #SBATCH directive)."""
    for key, value in flatten(data).items():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, str) and has_control_chars(item):
                raise ConfigError(f"{prefix}{key}={item!r}: control characters (newline, tab, ...) are not allowed")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for MLflow params and diffs."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
