"""Job flags from one dataclass of defaults, nanoGPT style, without nanoGPT's ``exec``.

A job writes its defaults once, one per line, each with its unit or choices::

    @dataclass
    class Config:
        n_layer: int = opt(4, "transformer blocks")
        init: str = opt("scratch", "where the weights start", choices=("scratch", "gpt2"))

and ``parse(Config, argv)`` turns every field into a ``--kebab-case`` flag. argparse does the
checking, so an unknown flag or a value of the wrong type is an error (exit 2) rather than a
silent no-op, and ``--help`` lists every default.

A recipe is a named set of values (``recipes={"course": {"lr": 1e-5, ...}}``, chosen by the
config's ``recipe`` field): it replaces the defaults it names, and a flag given on the command
line still wins over it. ``--help`` lists each recipe's values.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

C = TypeVar("C")


def opt(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
) -> Any:
    """One default with its help text (unit, range or choices); becomes one flag."""
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "metavar": metavar}
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any) -> None:
    meta = f.metadata
    unset = f.default is None or f.default is False or f.default == ()
    shown = "" if unset else f" (default: {f.default})"
    text = (meta.get("help", "") + shown).replace("%", "%%")  # argparse formats help with %
    kwargs: dict[str, Any] = {"dest": f.name, "help": text}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        kwargs["action"] = "store_true"
    elif origin is tuple:  # tuple[str, ...]: one or more values
        kwargs.update(nargs="+", type=args[0], metavar=meta.get("metavar") or "PATH")
    else:
        if args:  # `X | None`: the flag takes an X
            hint = next(a for a in args if a is not type(None))
        kwargs["type"] = hint
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        elif meta.get("metavar") or hint in (int, float):
            kwargs["metavar"] = meta.get("metavar") or {int: "N", float: "X"}[hint]
    parser.add_argument(_flag(f.name), **kwargs)


Recipes = Mapping[str, Mapping[str, Any]]


def describe_recipes(recipes: Recipes) -> str:
    """One paragraph per recipe: the flags it sets, as they would be typed."""
    lines = []
    for name, values in recipes.items():
        lines.append(f"--recipe {name} sets (flags given with it still win):")
        line = " "
        for flag in (_typed(k, v) for k, v in values.items()):  # a flag and its value together
            if len(line) + len(flag) > 78:
                lines.append(line)
                line = " "
            line += " " + flag
        lines.append(line)
    return "\n".join(lines)


def _typed(name: str, value: Any) -> str:
    if value is True:
        return _flag(name)
    return f"{_flag(name)} {value}"


def build_parser(
    cls: type, prog: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """An argparse parser whose flags are ``cls``'s fields; unset flags stay absent."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # so we can tell which flags were given
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        _add(parser, f, hints[f.name])
    return parser


def parse(
    cls: type[C],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    check: Callable[[C, set[str]], str | None] | None = None,
    recipes: Recipes | None = None,
    epilog: str | None = None,
) -> tuple[C, set[str]]:
    """(config, names of the flags given on the command line).

    ``check(config, given)`` returns an error message for values that are well-typed but
    unusable (a head count that does not divide the width, a flag the chosen method ignores);
    that too exits 2 with argparse's usage line, before the job has touched anything. Knowing
    which flags were given lets ``--resume`` tell "you asked to change this" from "this is just
    the default", and a recipe give way to the flags typed beside it.
    """
    if recipes:
        epilog = "\n\n".join(filter(None, (epilog, describe_recipes(recipes))))
    parser = build_parser(cls, prog, description, epilog)
    given = vars(parser.parse_args(argv))
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    recipe = values.get("recipe")
    if recipe is not None:
        values = {**(recipes or {})[recipe], **values}  # what was typed wins over the recipe
    config = cls(**values)
    if check is not None and (problem := check(config, set(given))):
        parser.error(problem)
    return config, set(given)


def replace_from(config: C, saved: dict[str, Any], keep: set[str]) -> C:
    """``saved`` (a checkpoint's config) with ``keep``'s fields taken from ``config``."""
    names = {f.name for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    merged = {k: v for k, v in saved.items() if k in names}
    merged.update({k: getattr(config, k) for k in keep})
    merged = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}
    return dataclasses.replace(config, **merged)  # type: ignore[type-var]
