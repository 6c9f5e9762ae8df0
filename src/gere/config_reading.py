"""Reading configs: YAML read safely, dataclasses built from mappings by their types, ``key=value`` overrides.

A leaf (it imports only `gere.errors` and `gere.reading`), used by the run config (`gere.continual.run_config`,
``gere run``) and by ``gere-lf`` (`gere.integrations.llamafactory`): `parse_yaml` reads one YAML document with `yaml.safe_load`'s
rules (merge keys included) but refuses a key given twice and turns every failure (syntax, nesting too
deep, a number too long) into a `GeReError` naming the file; `from_dict` builds a dataclass from a mapping,
refusing unknown keys and values of the wrong type by their dotted name. Error messages show values through
`gere.errors.shown`, so a huge value (a YAML alias bomb) is never printed or walked whole.
"""

from __future__ import annotations

import dataclasses
import io
import json
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from gere.errors import GeReError, clip, shown
from gere.reading import read_text


def to_plain(obj: Any) -> Any:
    if hasattr(obj, "plain") and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return obj.plain()  # a section that writes itself (TrainingSettings: its TrainingArguments keys flat)
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


# ``value`` as type ``tp`` (a dataclass, list, dict, union or plain type), or an error naming ``where``.
def coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except GeReError as err:
                errors.append(str(err))
        raise GeReError(errors[0] if errors else f"{where}: invalid value {shown(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise GeReError(f"{where}: expected a mapping of {tp.__name__} settings, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise GeReError(f"{where}: expected a list, got {type(value).__name__} ({shown(value)})")
        (item,) = typing.get_args(tp) or (Any,)
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise GeReError(f"{where}: expected a mapping, got {type(value).__name__} ({shown(value)})")
        _, item = typing.get_args(tp) or (Any, Any)
        return {str(k): coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp in (dict, list):
        if isinstance(value, tp):
            return value
        raise GeReError(f"{where}: expected a {'mapping' if tp is dict else 'list'}, got {type(value).__name__}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-4 as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    hint = ""
    if tp is str and isinstance(value, bool):
        hint = "; YAML reads yes, no, on, off, true and false as booleans: quote the word (e.g. 'yes')"
    raise GeReError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} ({shown(value)}){hint}")


def from_dict(cls, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types by dotted name."""
    route = getattr(cls, "route_keys", None)
    if route is not None:  # a section that passes keys through to another library (TrainingSettings)
        data = route(data, where or cls.__name__)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(str(k) for k in set(data) - names)  # YAML keys may be numbers or null too
    if unknown:
        prefix = f"{where}." if where else ""
        listed = ", ".join(prefix + shown(k, 60).strip("'") for k in unknown[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise GeReError(f"unknown config key(s) {listed}{more}; allowed here: {', '.join(sorted(names))}")
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except GeReError as err:
        if not where:
            raise
        # A section's own check names its setting; say which section it is in.
        named = getattr(err, "setting", None) or str(err).split(" ", 1)[0]
        text = f"{where}.{err}" if named in names and str(err).startswith(named) else f"{where}: {err}"
        raise GeReError(text) from None


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently) and
    keys that are lists or mappings. Merge keys (``<<: *defaults``) work as in ``yaml.safe_load``: a key
    written in the mapping overrides the merged one."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, list | dict | set):
                raise GeReError(f"{node.start_mark.name}, line {line}: a key is a {type(key).__name__}; write "
                                "keys as plain names")  # fmt: skip
            if key in seen:
                raise GeReError(
                    f"{node.start_mark.name}: the key {shown(key, 60)} appears twice, on lines {seen[key]} and "
                    f"{line}; keep one (YAML would silently use the last)"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, name: str) -> Any:
    """The one YAML document in ``text`` (``name`` names it in messages), read safely: a syntax error, a
    repeated key, nesting too deep or a number too long is an error naming ``name``, never a traceback."""
    stream = io.StringIO(text)
    stream.name = name  # YAML's marks name the file
    loader = _StrictLoader(stream)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise GeReError(f"{name} is not valid YAML: {clip(err, 600)}") from None
    except RecursionError:
        raise GeReError(f"{name}: YAML nested too deeply to read; a run config needs a few levels") from None
    except ValueError as err:  # an integer of thousands of digits
        raise GeReError(f"{name}: {clip(err, 160)}; write a shorter number") from None
    finally:
        loader.dispose()


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``dotted`` = ``"a.b.c"``, creating sections as needed."""
    keys = dotted.split(".")
    if not all(k.strip() for k in keys):
        raise GeReError(f"--set {shown(dotted, 80)}: a key is empty; write it as section.key=value")
    node = data
    for depth, key in enumerate(keys[:-1], start=1):
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise GeReError(f"--set {shown(dotted, 80)}: {'.'.join(keys[:depth])} is not a section "
                            f"(it holds {shown(node, 60)})")  # fmt: skip
    node[keys[-1]] = value


def parse_override(item: str, flag: str, *, numbers: bool = False) -> tuple[str, Any]:
    """``(dotted key, value)`` of one ``key.path=value`` override; the value is read as YAML. ``flag`` names
    the option in messages. With ``numbers``, text that reads as a number (``2e-5``, which YAML 1.1 leaves
    as text) becomes a float: for settings handed on untyped; typed settings are converted by `coerce`."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise GeReError(f"{flag} {shown(item, 80)}: write it as key=value (section.key=value inside a section)")
    value = parse_yaml(raw, f"the value of {flag} {shown(key.strip(), 60)}")
    text = raw.strip()
    if isinstance(value, str) and value != text and not text.startswith(("'", '"', "|", ">")):
        # YAML dropped a comment (` #...`) or folded a line break: the setting would not be what was typed
        # (`output_dir=runs/a #2` would name runs/a, another run's folder).
        raise GeReError(f"{flag} {shown(item, 80)}: YAML reads the value as {shown(value, 60)}, not as typed "
                        f"({'a comment starts at #' if '#' in text else 'a line break becomes a space'}); quote it: "
                        f"{_quoted_fix(flag, key.strip(), text)}")  # fmt: skip
    if numbers and isinstance(value, str):
        try:
            return key.strip(), float(value)
        except ValueError:
            pass
    return key.strip(), value


def _quoted_fix(flag: str, key: str, text: str) -> str:
    """The override written with its value quoted, when short enough to show whole."""
    fix = f"{flag} {key}={literal(text)}"
    return fix if len(fix) <= 200 else f"{flag} {shown(key, 60)}=\"...\" (the value in double quotes, \\n for a line break)"


def literal(value: str) -> str:
    """``value`` written as a YAML double-quoted scalar, read back by `parse_override` exactly as it is (``#``,
    line breaks, quotes, backslashes, leading ``~`` or ``yes``): for paths and names handed on as overrides."""
    return json.dumps(value, ensure_ascii=False)


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping, refusing repeated keys (with both line numbers) and non-mappings.
    The file is read through the guarded reader (`gere.reading`): a regular file of bounded size, UTF-8."""
    path = Path(path)
    loaded = parse_yaml(read_text(path, what="run config", kind="config"), str(path))
    if loaded is None:  # an empty file (or only comments): no settings
        return {}
    if not isinstance(loaded, dict):
        raise GeReError(
            f"{path}: the top level must be a mapping of settings (lines such as `model: ...`), not a "
            f"{type(loaded).__name__} ({shown(loaded, 60)})"
        )
    return loaded
