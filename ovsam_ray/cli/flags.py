"""CLI flags generated from config dataclasses: each flag's default and help text live once, on its field.

A field's ``metadata`` (a plain dict, so configs need not import the CLI) may hold:

- ``help``: the help text; ``--help`` adds the field's default;
- ``flag``: the flag's name where it is not ``--`` + the field's name with dashes;
- ``choices``, ``metavar``; ``parse``: the function from the flag's text to the value (default: from the
  field's type: ``int``, ``float``, ``str``, ``X | None``, ``tuple[X, ...]`` -> ``nargs="+"``,
  ``X | tuple[X, ...]`` -> ``N`` or ``A,B``;
  ``bool`` -> ``--flag``, with ``--no-flag`` too where the default is True or the field is ``bool | None``
  (None: decided later, e.g. by what a run holds));
- ``group``: the ``--help`` section the flag is listed under;
- ``cli: False``: the field has no flag (the help text says who sets it).

A field whose type is a dataclass (``LabelConfig.model``) gets the flags of that dataclass's fields;
:func:`config_from_args` builds the nested configs back. ``tests/cli/test_cli_flags.py`` walks every
parser of ``ovsam-ray`` and checks each flag's default against its field's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["add_flags", "config_from_args", "field_default", "flag_fields", "flag_name", "given_fields"]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_default(f: dataclasses.Field) -> Any:
    """The field's default (a default factory called), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nested(hint: Any) -> type | None:
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def flag_fields(
    cls: type, skip: tuple[str, ...] = (), group: str | None = None
) -> Iterator[tuple[type, dataclasses.Field, str | None]]:
    """(dataclass, field, group) for every field of ``cls`` that is a flag, nested dataclasses'
    fields included (in the nesting field's group unless they name their own), in order; fields
    marked ``cli: False`` and those named in ``skip`` are left out."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli", True) is False:
            continue
        inner = _nested(hints[f.name])
        if inner is not None:
            yield from flag_fields(inner, skip, f.metadata.get("group", group))
        else:
            yield cls, f, f.metadata.get("group", group)


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """``kind``, or None for the word ``none`` (a flag whose field may be None and defaults otherwise)."""

    def convert(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert


def _one_or_several(kind: type, size: int | None) -> Callable[[str], Any]:
    """``N`` -> N, ``A,B`` -> (A, B): a field typed ``X | tuple[X, X]`` (``--concurrency 1,8``);
    ``size``: the tuple's length (None: any)."""

    def convert(text: str) -> Any:
        parts = tuple(kind(x) for x in text.split(","))
        if len(parts) != 1 and size is not None and len(parts) != size:
            raise argparse.ArgumentTypeError(f"{text!r}: give one value or {size}, comma-separated")
        return parts[0] if len(parts) == 1 else parts

    convert.__name__ = kind.__name__
    return convert


def _kind(hint: Any) -> tuple[Callable[[str], Any] | None, bool, bool]:
    """(parse function, optional, many) of a type hint."""
    args = typing.get_args(hint)
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if (
            len(rest) == 2
            and rest[0] in (int, float)
            and typing.get_origin(rest[1]) is tuple
            and set(typing.get_args(rest[1])) <= {rest[0], Ellipsis}
        ):
            several = typing.get_args(rest[1])
            return _one_or_several(rest[0], None if Ellipsis in several else len(several)), optional, False
        if len(rest) != 1:
            return None, optional, False  # needs a ``parse`` of its own
        hint, args = rest[0], typing.get_args(rest[0])
    if typing.get_origin(hint) in (tuple, list) and args:
        item = args[0]
        return (item if item in (int, float, str) else None), optional, True
    if hint in (int, float, str, bool):
        return hint, optional, False
    return None, optional, False


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    title: str | None = None,
    suppress: bool = False,
    none_word: bool = False,
    negatable: bool = False,
) -> None:
    """One flag per field of ``cls`` (see the module doc).

    ``title``: the section of the flags without a ``group`` of their own; ``suppress``: a flag not
    given leaves no attribute (``argparse.SUPPRESS``), for a caller that fills the rest from
    elsewhere (a recipe); ``none_word``: ``none`` gives None where the field may be None;
    ``negatable``: every bool flag gets its ``--no-`` form too.
    """
    container = parser.add_argument_group(title) if title and isinstance(parser, argparse.ArgumentParser) else parser
    groups: dict[str, Any] = {}
    root = parser if isinstance(parser, argparse.ArgumentParser) else None
    for owner, f, group_name in flag_fields(cls, skip):
        if group_name and root is not None:
            if group_name not in groups:
                groups[group_name] = next(
                    (g for g in root._action_groups if g.title == group_name), None
                ) or root.add_argument_group(group_name)
            target = groups[group_name]
        else:
            target = container
        _add_flag(target, owner, f, suppress=suppress, none_word=none_word, negatable=negatable)


def _add_flag(
    target: Any, owner: type, f: dataclasses.Field, *, suppress: bool, none_word: bool, negatable: bool
) -> None:
    text = str(f.metadata.get("help", "")).replace("%", "%%")
    default = field_default(f)
    kwargs: dict[str, Any] = {"dest": f.name}
    if "choices" in f.metadata:
        kwargs["choices"] = tuple(f.metadata["choices"])
    if "metavar" in f.metadata:
        kwargs["metavar"] = f.metadata["metavar"]
    hint = _hints(owner)[f.name]
    kind, optional, many = _kind(hint)
    convert = f.metadata.get("parse") or kind
    if convert is None:
        raise TypeError(
            f"{owner.__name__}.{f.name}: no flag type for {hint!r}; give the field metadata a "
            "'parse' function or mark it 'cli': False"
        )
    if default is dataclasses.MISSING:
        kwargs.update(required=True, default=argparse.SUPPRESS if suppress else None)
        shown = ""
    elif suppress:
        kwargs["default"] = argparse.SUPPRESS
        shown = f"(default: {default!r})".replace("%", "%%")
    else:
        kwargs["default"] = default
        shown = "" if default is None or default is False else "(default: %(default)s)"
    kwargs["help"] = " ".join(t for t in (text, shown) if t) or None
    if convert is bool:
        action = argparse.BooleanOptionalAction if (negatable or default is True or optional) else "store_true"
        target.add_argument(flag_name(f), action=action, **kwargs)
        return
    if optional and none_word:
        convert = _optional(convert)
    if many:
        kwargs["nargs"] = "+"
    target.add_argument(flag_name(f), type=convert, **kwargs)


def given_fields(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values of ``cls``'s own flag fields present in ``args`` (nested dataclasses left out)."""
    hints = _hints(cls)
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.name not in skip
        and f.metadata.get("cli", True) is not False
        and _nested(hints[f.name]) is None
        and hasattr(args, f.name)
    }


def config_from_args(args: argparse.Namespace, cls: type, **given: Any) -> Any:
    """``cls`` from the flags :func:`add_flags` added (nested dataclasses built the same way);
    ``given``: fields set by the caller instead."""
    hints = _hints(cls)
    kwargs = given_fields(args, cls)
    for f in dataclasses.fields(cls):
        inner = _nested(hints[f.name])
        if inner is not None and f.metadata.get("cli", True) is not False and f.name not in given:
            kwargs[f.name] = config_from_args(args, inner)
    return cls(**{**kwargs, **given})
