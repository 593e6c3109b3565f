"""A stage's command line generated from its config dataclass, so no field is declared twice.

    @dataclass
    class ScoreConfig(SliceConfig):
        top_k: int = from_settings("top_k", help="proponents kept per query")
        index: str = option("int8", help="...", choices=[...])

    def add_arguments(parser):
        add_config_arguments(parser, ScoreConfig)

    def main(args):
        run(config_from_args(ScoreConfig, args))

Every field becomes `--field-name` (underscores as dashes), typed by its annotation, with its default
taken from a fresh instance (so `from_settings` defaults come from infra.config when the parser is
built). Field metadata may add `help`, `choices`, `flags` (the spellings, when not `--field-name`)
`nargs` (default `*` for a list), `action` (`append`: a list flag given once per value), `positional` (an optional argument without
a flag) and `cli: False`
(a field only code sets). A `bool` is a switch; a
`list[int]` takes several whole numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def option(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, **cli):
    """A config field with a constant default (or a `factory` for a list) and its command-line metadata."""
    return dataclasses.field(default=default, default_factory=factory, metadata=cli)


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one (not for an empty or absent value)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    defaults, hints = config_class(), typing.get_type_hints(config_class)
    for spec in dataclasses.fields(config_class):
        meta = spec.metadata
        if not meta.get("cli", True):
            continue
        if meta.get("positional"):  # e.g. the query of `sql`: given without a flag, optional
            parser.add_argument(spec.name, nargs="?", default=getattr(defaults, spec.name), help=meta.get("help"))
            continue
        flags = meta.get("flags") or ["--" + spec.name.replace("_", "-")]
        default = getattr(defaults, spec.name)
        # a flag without help still shows its default (argparse prints no line for a flag without help)
        shown = None if default is None or default is False or default == "" else "(default: %(default)s)"
        options = {"dest": spec.name, "default": default, "help": meta.get("help") or shown}
        if "choices" in meta:
            options["choices"] = meta["choices"]
        kind, element = _kind(hints[spec.name])
        if "action" in meta:  # e.g. "append": a flag given once per value
            options.update(action=meta["action"], type=element)
        elif kind is bool:
            options["action"] = "store_true"
        elif kind in (list, tuple):
            options.update(nargs=meta.get("nargs", "*"), type=element)
        else:
            options["type"] = kind
        parser.add_argument(*flags, **options)


def config_from_args(config_class: type, args: argparse.Namespace):
    """The config made of the parsed arguments that name its fields (others, like a subcommand's, are ignored)."""
    names = {spec.name for spec in dataclasses.fields(config_class)}
    return config_class(**{name: value for name, value in vars(args).items() if name in names})


def _kind(hint) -> tuple[type, type]:
    """(the argument's kind, the type of its elements): `int | None` is an int, `list[int]` a list of int."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return origin, (args[0] if args else str)
    if typing.get_origin(hint) is typing.Literal:
        return str, str
    return origin, origin
