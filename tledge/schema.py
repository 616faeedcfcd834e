"""Turn a TOML table into frozen dataclasses, collecting every problem on the way.

A recipe section is a frozen dataclass whose fields carry an `option(...)`: the default, the
allowed values and a one-line help. `parse(cls, table, keypath)` checks types, choices and
ranges, names unknown keys with the closest valid one, and returns the object together with
the list of problems found, so a user sees every mistake at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

REQUIRED = object()


def option(default=REQUIRED, *, choices=None, minimum=None, maximum=None, path=False,
           help=""):  # noqa: A002 - mirrors click's name
    """A recipe field: its default, its constraints and a one-line help."""
    metadata = {"choices": choices, "minimum": minimum, "maximum": maximum, "path": path,
                "help": help, "required": default is REQUIRED}
    if default is REQUIRED:
        return dataclasses.field(default=None, metadata=metadata)
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    if dataclasses.is_dataclass(default) or isinstance(default, types.MappingProxyType):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _describe(annotation) -> str:
    origin = typing.get_origin(annotation)
    if annotation in _TYPE_NAMES:
        return _TYPE_NAMES[annotation]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation)
                           if arg is not type(None))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a table"
    if annotation is Any:
        return "a value"
    if dataclasses.is_dataclass(annotation):
        return "a table"
    return str(annotation)


def _show(value) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


class Parser:
    """Walks one TOML document; `problems` collects `key.path: message` lines."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.problems: list[str] = []

    def problem(self, keypath: str, message: str) -> None:
        self.problems.append(f"{keypath}: {message}" if keypath else message)

    def parse(self, cls, table: Any, keypath: str = ""):
        """Build `cls` from `table`; invalid fields keep their default and add a problem."""
        if not isinstance(table, dict):
            self.problem(keypath, f"expected a table, found {_show(table)}")
            table = {}
        hints = typing.get_type_hints(cls)
        fields = {field.name: field for field in dataclasses.fields(cls) if field.metadata}
        for key in table:
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else \
                    f"; valid keys are {', '.join(sorted(fields))}"
                self.problem(_join(keypath, key), f"unknown key{hint}")
        values = {}
        for name, field in fields.items():
            subpath = _join(keypath, name)
            if name in table:
                values[name] = self.convert(hints[name], table[name], subpath, field.metadata)
            elif field.metadata.get("required"):
                self.problem(subpath, f"is required ({field.metadata.get('help') or _describe(hints[name])})")
            elif dataclasses.is_dataclass(hints[name]):
                values[name] = self.parse(hints[name], {}, subpath)
        return cls(**values)

    def convert(self, annotation, value, keypath, metadata):
        """Check one value against its annotation and constraints; return the typed value."""
        origin = typing.get_origin(annotation)
        invalid = object()
        result = invalid
        if dataclasses.is_dataclass(annotation):
            return self.parse(annotation, value, keypath)
        if origin in (typing.Union, types.UnionType):
            members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            for member in members:
                if _matches(member, value):
                    result = self.convert(member, value, keypath, metadata)
                    break
        elif origin is tuple:
            args = typing.get_args(annotation)
            if isinstance(value, list):
                item_type = args[0]
                if dataclasses.is_dataclass(item_type):  # an array of tables
                    return tuple(self.parse(item_type, item, f"{keypath}[{index}]")
                                 for index, item in enumerate(value))
                if len(args) == 2 and args[1] is Ellipsis or len(value) == len(args):
                    if all(_matches(item_type, item) for item in value):
                        items = [item_type(item) if item_type is float else item
                                 for item in value]
                        for index, item in enumerate(items):
                            self._constrain(item, f"{keypath}[{index}]", metadata)
                        return tuple(items)
        elif origin is dict:
            key_type, value_type = typing.get_args(annotation)
            if isinstance(value, dict):
                choices = metadata.get("choices")
                choices = choices() if callable(choices) else choices
                out = {}
                for key, item in value.items():
                    if choices and key not in choices:
                        close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
                        hint = f"did you mean '{close[0]}'?" if close else \
                            f"expected one of {', '.join(choices)}"
                        self.problem(_join(keypath, key), f"unknown name; {hint}")
                        continue
                    out[key] = self.convert(value_type, item, _join(keypath, key), {})
                return types.MappingProxyType(out)
        elif _matches(annotation, value):
            result = float(value) if annotation is float else value
        if result is invalid:
            self.problem(keypath, f"expected {_describe(annotation)}, found {_show(value)}")
            return None
        if isinstance(result, (str, int, float)) and not isinstance(result, bool):
            if not self._constrain(result, keypath, metadata):
                return None
        if metadata.get("path") and isinstance(result, str) and result not in ("", "none"):
            # path="keyword_or_path" (weights): a bare word such as 'imagenet' is not a path
            if metadata["path"] != "keyword_or_path" or _looks_like_path(result):
                result = str((self.base_dir / result).resolve())
        return result

    def _constrain(self, value, keypath, metadata) -> bool:
        choices = metadata.get("choices")
        choices = choices() if callable(choices) else choices
        if choices and isinstance(value, str) and value not in choices:
            close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            self.problem(keypath, f"expected one of {', '.join(map(repr, choices))}, "
                                  f"found {value!r}{hint}")
            return False
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            minimum, maximum = metadata.get("minimum"), metadata.get("maximum")
            if minimum is not None and not value >= minimum:  # `not >=` also rejects nan
                self.problem(keypath, f"expected at least {minimum}, found {value}")
                return False
            if maximum is not None and not value <= maximum:
                self.problem(keypath, f"expected at most {maximum}, found {value}")
                return False
        return True


def _matches(annotation, value) -> bool:
    if annotation is Any:  # checked by the rule that reads it ([tune.space])
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return isinstance(value, list)
    if origin is dict or dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    return False


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or "." in Path(value).name


def _join(keypath: str, key: str) -> str:
    return f"{keypath}.{key}" if keypath else key


def to_dict(obj, paths=None) -> dict:
    """A resolved recipe object as plain TOML-ready data (tuples become lists).

    `paths`, when given, rewrites every resolved (absolute) path a path option holds: to make
    it relative to where a copy is stored, or to leave it out of a hash.
    """
    if dataclasses.is_dataclass(obj):
        out = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if value is None:
                continue
            if paths and field.metadata.get("path") and isinstance(value, str) \
                    and Path(value).is_absolute():
                out[field.name] = paths(value)
            else:
                out[field.name] = to_dict(value, paths)
        return out
    if isinstance(obj, (tuple, list)):
        return [to_dict(item, paths) for item in obj]
    if isinstance(obj, (dict, types.MappingProxyType)):
        return {key: to_dict(value, paths) for key, value in obj.items()}
    return obj
