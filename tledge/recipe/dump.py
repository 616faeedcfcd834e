"""A recipe written back as TOML: for `tledge check`, and the copy a run directory keeps."""

from __future__ import annotations

import json
import os
from pathlib import Path


def stored_recipe_text(recipe, folder) -> str:
    """The resolved recipe as a run directory keeps it: its file paths relative to `folder`
    (the run directory), so a run moved together with its data still finds it, and a copy
    made anywhere loads (later stages read the data from the prepared-data cache)."""
    relative = lambda path: os.path.relpath(path, Path(folder).resolve())  # noqa: E731
    return f"# resolved from {relative(recipe.path)}\n" + dump_toml(recipe.to_dict(relative)) \
        + "\n"


def dump_toml(data: dict, prefix: str = "") -> str:
    """Write plain data (the resolved recipe) back as TOML, for `tledge check`."""
    blocks = [_dump_table(data, prefix.rstrip("."), header=None)]
    return "\n\n".join(block for block in blocks if block)


def _dump_table(data: dict, name: str, header) -> str:
    """One table: its header, its plain keys, then its sub-tables and arrays of tables."""
    lines = [header] if header else []
    nested = []
    for key, value in data.items():
        if isinstance(value, dict):
            nested.append(_dump_table(value, f"{name}.{key}" if name else key,
                                      f"[{name}.{key}]" if name else f"[{key}]"))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            path = f"{name}.{key}" if name else key
            nested += [_dump_table(item, path, f"[[{path}]]") for item in value]
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n\n".join(part for part in ["\n".join(lines), *nested] if part)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # raw UTF-8: TOML rejects the surrogate-pair escapes json writes beyond U+FFFF
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)
