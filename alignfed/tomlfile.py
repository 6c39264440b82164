"""Reading and writing AlignFed's TOML files, and the one typed loader every config goes through.

Python reads TOML with `tomllib`; writing needs only tables of scalars and lists, done here.

Every config file (coordinator.toml, device.toml, firmware profiles, strategy options) is checked
by `check_table` against fields described by type annotations: a dataclass's fields or a
constructor's parameters (`fields_of`), so an option added to a strategy's constructor or config
dataclass is accepted with its type checked, without touching any loader. Errors name the file,
the field, the value found and what was expected, and unknown keys are refused:

    coordinator.toml: [strategy].k = 'three'; expected an integer
    coordinator.toml: unknown field [strategy].kk; expected one of k, method, server_lr, ...
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union

from alignfed import atomic
from alignfed.errors import ConfigError


def read(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise ConfigError(f"cannot write {type(value).__name__} value {value!r} to TOML")


def dumps(doc: Mapping[str, Any], prefix: str = "") -> str:
    """TOML text of scalars, lists and (nested) tables: a table inside [a] is written [a.b]."""
    top = [f"{k} = {_scalar(v)}" for k, v in doc.items() if not isinstance(v, Mapping)]
    tables = [dumps(table, f"{prefix}{name}.") for name, table in doc.items() if isinstance(table, Mapping)]
    head = [f"[{prefix[:-1]}]\n" + "\n".join(top)] if prefix else ["\n".join(top)]
    return "\n\n".join([*head, *(t.rstrip("\n") for t in tables)]) + "\n"


def write(path: Path, doc: Mapping[str, Any], mode: int = 0o600) -> Path:
    """Write atomically with restrictive permissions (configs hold keys and passwords)."""
    return atomic.write_text(Path(path), dumps(doc), mode)


# ---------------------------------------------------------------------------------------------
# the typed loader


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a field that must be given


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    """One key of a TOML table: its name, its type annotation and default (REQUIRED if none)."""

    name: str
    kind: Any
    default: Any = REQUIRED


def _accepts(kind: Any) -> bool:
    """Whether a TOML value can be of this annotation (numpy dtypes, callables, objects cannot)."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        return all(isinstance(v, (str, int, float, bool)) for v in typing.get_args(kind))
    if origin in (Union, types.UnionType):
        return any(_accepts(a) for a in typing.get_args(kind) if a is not type(None))
    if origin is list:
        return _accepts((typing.get_args(kind) or (Any,))[0])
    return kind in (int, float, str, bool, Path) or kind is Any or _is_dataclass(kind)


def _is_dataclass(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(kind) if a is not type(None) and _accepts(a))
    if origin is list:
        return f"a list of ({_describe((typing.get_args(kind) or (Any,))[0])})"
    if _is_dataclass(kind):
        return f"a table of {', '.join(f'{n} ({_describe(f.kind)})' for n, f in fields_of(kind).items())}"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path (string)"}
    return names.get(kind, "a value")


class _Mismatch(Exception):
    pass


def _convert(value: Any, kind: Any) -> Any:
    """`value` as `kind`, or _Mismatch. Integers are accepted where a number is expected, never booleans."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        for choice in typing.get_args(kind):
            if value == choice and type(value) is type(choice):
                return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for member in typing.get_args(kind):
            if member is not type(None) and _accepts(member):
                try:
                    return _convert(value, member)
                except _Mismatch:
                    continue
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        return [_convert(v, (typing.get_args(kind) or (Any,))[0]) for v in value]
    if kind is Any:
        return value
    if _is_dataclass(kind):  # a sub-table, e.g. [strategy.robust], becomes the dataclass itself
        spec = fields_of(kind)
        if not isinstance(value, dict) or set(value) - set(spec):
            raise _Mismatch
        if any(f.default is REQUIRED and n not in value for n, f in spec.items()):
            raise _Mismatch
        try:
            return kind(**{n: _convert(v, spec[n].kind) for n, v in value.items()})
        except (TypeError, ValueError):
            raise _Mismatch from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if isinstance(value, bool):
        raise _Mismatch
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    if kind is Path and isinstance(value, str):
        return Path(value)
    if kind in (int, str) and isinstance(value, kind):
        return value
    raise _Mismatch


def fields_of(target: type | Callable[..., Any], *, skip: Iterable[str] = ()) -> dict[str, Field]:
    """The TOML-settable fields of a dataclass, or of a class's constructor / a function's parameters.

    A constructor parameter typed as a dataclass (or `SomeConfig | None`) contributes that
    dataclass's fields, flattened, when the class builds itself from keyword options
    (`from_options(**options)`, as AlignFed does from AlignFedConfig's fields); otherwise it is a
    sub-table that becomes the dataclass. Parameters whose type no TOML value can have (callables,
    activation sources, numpy dtypes) are left out: the program supplies those.
    """
    skipped = set(skip)
    if dataclasses.is_dataclass(target) and isinstance(target, type):
        hints = typing.get_type_hints(target)
        out = {}
        for f in dataclasses.fields(target):
            default = f.default if f.default is not dataclasses.MISSING else REQUIRED
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            if f.name not in skipped and _accepts(hints[f.name]):
                out[f.name] = Field(f.name, hints[f.name], default)
        return out
    fn = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
    hints = typing.get_type_hints(fn)
    builder = getattr(target, "from_options", None)
    flatten = builder is not None and any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(builder).parameters.values()
    )
    out = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name == "self" or name in skipped or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        kind = hints.get(name, Any)
        nested = [a for a in (kind, *typing.get_args(kind)) if _is_dataclass(a)]
        if nested and flatten:
            out.update(fields_of(nested[0], skip=skipped))
        elif _accepts(kind):
            default = REQUIRED if param.default is inspect.Parameter.empty else param.default
            out[name] = Field(name, kind, default)
    return out


def check_table(
    raw: Mapping[str, Any], spec: Mapping[str, Field], *, source: str | Path, table: str = "", complete: bool = True
) -> dict[str, Any]:
    """The values of `raw` converted to their fields' types; refuses unknown keys, missing required
    fields (unless not `complete`) and values of the wrong type, naming file, field, value and what
    was expected."""
    where = f"[{table}]." if table else ""
    unknown = sorted(set(raw) - set(spec))
    if unknown:
        raise ConfigError(
            f"{source}: unknown field {where}{unknown[0]}; expected one of {', '.join(sorted(spec)) or 'nothing'}"
        )
    out: dict[str, Any] = {}
    for name, f in spec.items():
        if name not in raw:
            if f.default is REQUIRED and complete:
                raise ConfigError(f"{source}: missing field {where}{name} ({_describe(f.kind)})")
            continue
        try:
            out[name] = _convert(raw[name], f.kind)
        except _Mismatch:
            raise ConfigError(f"{source}: {where}{name} = {raw[name]!r}; expected {_describe(f.kind)}") from None
    return out


def subtable(raw: Mapping[str, Any], name: str, *, source: str | Path) -> dict[str, Any]:
    """Table `[name]` of a document ({} if absent); a value that is not a table is an error."""
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {name} = {value!r}; expected a table [{name}]")
    return value


def number_at_least(value: Any, lo: float, *, source: str | Path, name: str) -> Any:
    """A range check in the loader's words: `device.toml: max_outbox = 0; expected a value ≥ 1`."""
    if value < lo:
        raise ConfigError(f"{source}: {name} = {value!r}; expected a value ≥ {lo}")
    return value
