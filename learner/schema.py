"""Typed config sections on pydantic: each field declared once, and the one-line error form.

A section is a frozen pydantic dataclass made by `section(name)`. Each field's type,
bounds, default and description (`Field(description=...)`) are declared in one place; the
config file's loader, `continuity config example` and the README's reference read them
from there. A validation error becomes one line naming the key, what was expected and
what was received (`describe`), built from the error's type and the field's declaration,
never from pydantic's wording. Being dataclasses, sections keep `dataclasses.replace`
(which validates again), `asdict` and equality. This module imports no JAX: a config is
checked before (and without) the learner.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, TypeVar, dataclass_transform

import annotated_types
import pydantic
from pydantic import AllowInfNan, BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic.fields import FieldInfo

_Section = TypeVar("_Section")

# Scalars are strict (a TOML string "32" is not an integer, 1 is not a boolean); arrays are
# TOML arrays. Every float is finite: a NaN or an infinity is never a setting.
# No count, size or shape needs more than int32 holds; past it JAX cannot even make the array, and
# the error it gives names no setting. Fields that size arrays declare it (`le=INT_MAX`); a bound
# in `Int` itself would replace a field's own `le` (pydantic keeps the last).
INT_MAX = 2**31 - 1
Int = Annotated[int, Strict()]
Count = Annotated[int, Strict(), annotated_types.Le(INT_MAX)]  # sizes an array: at most INT_MAX
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Ints = tuple[Int, ...]
PositiveInts = tuple[Annotated[int, Strict(), annotated_types.Gt(0), annotated_types.Le(INT_MAX)], ...]


def _empty_is_none(value):
    return None if isinstance(value, str) and value == "" else value


# An optional value: left out, or "" (how a file, and `Config.to_toml`, say none).
OptionalInt = Annotated[Int | None, BeforeValidator(_empty_is_none)]
OptionalFloat = Annotated[Float | None, BeforeValidator(_empty_is_none)]
OptionalStr = Annotated[Str | None, BeforeValidator(_empty_is_none)]


class Finite:
    """Field metadata: its bound reads "a finite number >= 0" (an unbounded-above duration or ratio)."""


class ConfigProblem(ValueError):
    """A check across fields that names the key at fault, relative to the object that raises it.

    `key` is a field of the section that raises it (or, from a whole config, a dotted path
    of fields such as "learner.model.kind"); None names the section itself.
    """

    def __init__(self, detail: str, key: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.key = key


SECTION_CONFIG = ConfigDict(extra="forbid", validate_default=False)


@dataclass_transform(frozen_default=True, field_specifiers=(Field, dataclasses.field))
def section(name: str) -> Callable[[type[_Section]], type[_Section]]:
    """A frozen, validating pydantic dataclass for the config file's [name] section.

    Built in code, a bad value raises `SectionError` (a ValueError) with the one-line form
    naming `name.key`; loaded from a file, the loader reports the whole config's errors
    with the file's coordinates.
    """

    def make(cls: type[_Section]) -> type[_Section]:
        built: Any = pydantic.dataclasses.dataclass(frozen=True, config=SECTION_CONFIG)(cls)
        init = built.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):  # noqa: N807 - the dataclass's own __init__
            try:
                init(self, *args, **kwargs)
            except ValidationError as error:
                key, detail = describe(error, built, kwargs, lambda loc: (name, *loc))
                raise SectionError(detail if len(key) == 1 else f"`{'.'.join(key)}` {detail}") from None

        built.__init__ = __init__
        built.__section__ = name
        return built

    return make


class SectionError(ValueError):
    """A section built in code with a bad value: the one-line form of `describe`."""


# ---- reading a field's declaration ---------------------------------------------------------------


def fields(cls: type) -> dict[str, FieldInfo]:
    """{name: FieldInfo} of a pydantic dataclass, in declaration order."""
    return dict(cls.__pydantic_fields__)  # type: ignore[attr-defined]


def description(cls: type, name: str) -> str:
    return fields(cls)[name].description or ""


def is_secret(info: FieldInfo) -> bool:
    return isinstance(info.json_schema_extra, dict) and bool(info.json_schema_extra.get("secret"))


def _unwrap(annotation) -> tuple[Any, list, bool]:
    """(the bare type, metadata, optional) of an annotation, through Annotated and `| None`."""
    metadata: list = []
    optional = False
    while True:
        if typing.get_origin(annotation) is Annotated:
            annotation, *extra = typing.get_args(annotation)
            metadata += extra
            continue
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation, metadata, optional


_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}


def expected(info: FieldInfo, *, bounds: bool = False) -> str:
    """What a field accepts, in words: "an integer", "an array of strings", "a table"... (`bounds`: with
    its elements' bounds, "an array of positive integers")."""
    bare, _, optional = _unwrap(info.annotation)
    origin = typing.get_origin(bare)
    if bare is bool:
        text = "a boolean (true or false)"
    elif bare in _NOUNS:
        text = _NOUNS[bare][0]
    elif origin is tuple:
        element, element_metadata, _ = _unwrap(typing.get_args(bare)[0])
        positive = bounds and any(isinstance(m, annotated_types.Gt) and m.gt == 0 for m in element_metadata)
        text = f"an array of {'positive ' if positive else ''}{_NOUNS.get(element, ('', 'values'))[1]}"
    elif origin is Literal:
        text = "one of " + ", ".join(repr(c) for c in typing.get_args(bare))
    else:
        text = "a table"
    if optional and bare in (int, float, str):
        text += ' ("" for none)'
    return text


def bounds(info: FieldInfo, value) -> str:
    """ "must be >= 1. Got 0."-style text from a field's declared bounds."""
    _, metadata, _ = _unwrap(info.annotation)
    metadata = [*metadata, *info.metadata]
    low = high = None
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            low = f"({item.gt}"
        elif isinstance(item, annotated_types.Ge):
            low = f"[{item.ge}"
        elif isinstance(item, annotated_types.Lt):
            high = f"{item.lt})"
        elif isinstance(item, annotated_types.Le):
            high = f"{item.le}]"
    if high == f"{INT_MAX}]" and isinstance(value, int) and value <= INT_MAX:
        high = None  # the cap every integer has (`Int`) is not what this value broke: leave it unsaid
    finite = any(isinstance(item, Finite) for item in metadata)
    if low and high:
        if low.startswith("[") and high.endswith("]") and all(isinstance(v, int) for v in (value,)):
            rule = f"in {low[1:]}..{high[:-1]}"
        else:
            rule = f"in {low}, {high}"
    elif low:
        rule = (">= " if low.startswith("[") else "> ") + low[1:]
        rule = f"a finite number {rule}" if finite else rule
    elif high:
        rule = ("<= " if high.endswith("]") else "< ") + high[:-1]
    else:
        rule = "valid"
    return f"must be {rule}. Got {value!r}."


def type_name(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time" if hasattr(value, "isoformat") else type(value).__name__


def received(value, secret: bool = False) -> str:
    """How an error shows what it got: the value and its type, or only the type for a secret."""
    if secret:
        return type_name(value)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({type_name(value)})"


def suggest(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- one error, one line -------------------------------------------------------------------------

_TYPE_ERRORS = frozenset(
    {
        "int_type",
        "int_parsing",
        "int_from_float",
        "float_type",
        "float_parsing",
        "bool_type",
        "bool_parsing",
        "string_type",
        "tuple_type",
        "list_type",
        "dict_type",
        "dataclass_type",
        "dataclass_exact_type",
        "none_required",
    }
)
_BOUND_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})
_UNKNOWN_KEY_ERRORS = frozenset({"unexpected_keyword_argument", "extra_forbidden"})


def describe(
    error: ValidationError,
    root: type,
    data,
    where: Callable[[tuple[str, ...]], tuple[str, ...]],
    *,
    allowed_keys: Callable[[tuple[str, ...]], Sequence[str]] | None = None,
) -> tuple[tuple[str, ...], str]:
    """The first error of a validation of `data` into `root`: (the file's key, a one-line detail).

    `where` maps a path of fields (("learner", "model", "kind")) to the file's key
    (("model", "kind")); the detail comes from the error's type, the field's declaration
    and the received value (a secret's type only). `allowed_keys(path)` lists what a
    did-you-mean may suggest for an unknown key at `path` (default: that table's fields).
    """
    errors = error.errors()
    # An unknown key first: a misspelt key also leaves the key it meant missing.
    first = next((e for e in errors if e["type"] in _UNKNOWN_KEY_ERRORS), errors[0])
    kind = first["type"]
    loc = tuple(str(part) for part in first["loc"] if not isinstance(part, int))
    indexed = any(isinstance(part, int) for part in first["loc"])  # an array's element is at fault
    cause = (first.get("ctx") or {}).get("error")
    if kind == "value_error" and isinstance(cause, ConfigProblem):
        path = loc + tuple(cause.key.split(".")) if cause.key else loc
        return where(path), f"{cause.detail}"
    if kind in _UNKNOWN_KEY_ERRORS:
        owner, _ = field_at(root, loc[:-1] + ("",))
        names = list(allowed_keys(loc[:-1]) if allowed_keys else (fields(owner) if owner else ()))
        detail = f"unknown key; expected one of: {', '.join(names)}{suggest(loc[-1], names)}"
        return where(loc), f"{detail}"
    owner, info = field_at(root, loc)
    value = value_at(data, loc)
    secret = info is not None and is_secret(info)
    if info is None:  # a whole section of the wrong type, or a check of a section as a whole
        detail = str(cause) if cause is not None else f"expected a table, got {received(value, True)}"
        return where(loc), f"{' '.join(detail.split())}"
    if kind == "missing":
        return where(loc), f"is required: {expected(info)}"
    if kind in _TYPE_ERRORS or kind == "finite_number":
        what = "a finite number" if kind == "finite_number" else expected(info)
        return where(loc), f"expected {what}, got {received(value, secret)}"
    if kind in _BOUND_ERRORS and not indexed:
        return where(loc), f"{bounds(info, value)}"
    if kind == "literal_error":
        return where(loc), f"must be {expected(info)}. Got {value!r}."
    if kind in ("too_short", "too_long") or (kind in _BOUND_ERRORS and indexed):
        return where(loc), f"expected {expected(info, bounds=True)}{_length(info)}, got {received(value, secret)}"
    if cause is not None:
        return where(loc), f"{' '.join(str(cause).split())}"
    return where(loc), f"expected {expected(info)}, got {received(value, secret)}"


def _length(info: FieldInfo) -> str:
    low = next((m.min_length for m in info.metadata if isinstance(m, annotated_types.MinLen)), 0)
    high = next((m.max_length for m in info.metadata if isinstance(m, annotated_types.MaxLen)), None)
    if high is not None:
        return f" of {low} to {high} items"
    return f" of at least {low} item{'s' if low != 1 else ''}" if low else ""


def key_text(key: tuple[str, ...]) -> str:
    """("stream", "security", "ssl_password") -> "[stream.security] ssl_password"; a section alone: "[stream]"."""
    if len(key) == 1:
        return f"[{key[0]}]"
    return f"[{'.'.join(key[:-1])}] {key[-1]}"


def field_at(root: type, loc: tuple[str, ...]) -> tuple[Any, FieldInfo | None]:
    """The dataclass holding the field at `loc`, and its FieldInfo (None past the schema)."""
    owner: Any = root
    info: FieldInfo | None = None
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if not isinstance(owner, type) or not dataclasses.is_dataclass(owner):
            return None, None
        info = fields(owner).get(part)
        if info is None:
            return owner, None
        bare, _, _ = _unwrap(info.annotation)
        owner = bare if dataclasses.is_dataclass(bare) else None
        if typing.get_origin(bare) is dict and parts:  # a table of named entries: skip the name
            value_type, _, _ = _unwrap(typing.get_args(bare)[1])
            owner = value_type if dataclasses.is_dataclass(value_type) else None
            parts.pop(0)
            if not parts:
                return owner, info
    return owner, info


def value_at(data, loc: tuple[str, ...]):
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            return data
        data = data[part]
    return data


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
