"""Dataclass fields that are also command-line flags: each written once, checked in one place.

A field declared with `option(default, doc, ...)` carries its help text, its
check and how a flag's text becomes its value. From that, `add_arguments`
makes the flags (`--field-name`, type, default, choices and help from the
field), `from_args` the dataclass of parsed flags, and `check` runs every
field's check: the same one-line ValueError from Python and from the command
line. `training.TrainConfig` and `vit-keras train` are made this way.

Example:
>>> import argparse, dataclasses
>>> @dataclasses.dataclass(frozen=True)
... class Config:
...     epochs: int = option(10, "Passes over the data.", check=positive_int)
>>> parser = argparse.ArgumentParser(prog="x")
>>> add_arguments(parser, Config)
>>> from_args(Config, parser.parse_args(["--epochs", "3"]))
Config(epochs=3)
>>> check(Config(epochs=0))
Traceback (most recent call last):
...
ValueError: epochs must be a positive integer, got 0.
"""

import argparse
import dataclasses
import math
import numbers

from vit_keras import sizes
from vit_keras.sizes import is_int


def option(default, doc, *, flag=None, aliases=(), parse=None, choices=None, check=None):
    """A dataclass field that is also a flag.

    Args:
        default: The field's default (and the flag's).
        doc: str. What the field means: the flag's help and the field's doc.
        flag: str or None. The flag; None: `--` and the name with dashes.
            Defaults to None.
        aliases: tuple of str. More flags for the same field. Defaults to ().
        parse: callable or None. The flag's text -> the value (an
            `argparse.ArgumentTypeError` for text that is no value at all);
            None: from the field's type (int, float, str; a bool field is a
            switch). Defaults to None.
        choices: tuple or None. The values allowed (`one_of` checks them).
            Defaults to None.
        check: callable or None. `check(name, value)` raises a ValueError
            naming the field for a value that cannot be. None is allowed
            where it is the default. Defaults to None.
    """
    if choices is not None and check is None:
        check = one_of(choices)
    metadata = dict(doc=doc, flag=flag, aliases=tuple(aliases), parse=parse, choices=choices, check=check)
    return dataclasses.field(default=default, metadata=metadata)


def flags(field):
    """The flags of a field: `--batch-size` for `batch_size`, or its own, then its aliases."""
    return (field.metadata.get("flag") or f"--{field.name.replace('_', '-')}", *field.metadata.get("aliases", ()))


def doc(field, owner="the config"):
    """The help text of a field (fields declared without `option` are named, at least)."""
    return field.metadata.get("doc") or f"the {field.name} field of {owner}"


# ----------------------------------------------------------------------------- checks


def is_finite(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def satisfies(meaning, test):
    """A check: ValueError "NAME must be MEANING, got VALUE." unless `test(value)`."""
    def check(name, value):
        try:
            good = bool(test(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ValueError(f"{name} must be {meaning}, got {value!r}.")

    return check


def one_of(choices):
    """A check: ValueError "Unknown NAME VALUE; use one of CHOICES." unless the value is a choice."""
    def check(name, value):
        if not any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices):
            raise ValueError(f"Unknown {name} {value!r}; use one of {tuple(choices)}.")

    return check


positive_int = satisfies("a positive integer", lambda v: is_int(v) and v >= 1)
non_negative_int = satisfies("a non-negative integer", lambda v: is_int(v) and v >= 0)


def check(config):
    """Runs the check of every field of `config` (None passes where it is the default): one ValueError."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        test = field.metadata.get("check")
        if test is None or (value is None and field.default is None):
            continue
        test(field.name, value)


# ----------------------------------------------------------------------------- flags


def parse_int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def parse_float(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def parse_size(text):
    """A size flag: 384 or 384x512 (384,512); whether the numbers make a size is `sizes.is_size`'s to say."""
    try:
        return sizes.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_PARSERS = {int: parse_int, float: parse_float, str: str, "int": parse_int, "float": parse_float, "str": str}


def add_arguments(parser, cls):
    """Adds a flag per field of the dataclass `cls` to `parser` (`from_args` reads them back)."""
    for field in dataclasses.fields(cls):
        text = doc(field, cls.__name__)
        choices = field.metadata.get("choices")
        if field.default is not None and field.default is not False and "default" not in text:
            text = f"{text} (default: {field.default})"
        kwargs = dict(dest=field.name, default=field.default, help=text.replace("%", "%%"))
        if field.type in (bool, "bool"):
            kwargs["action"] = "store_true" if field.default is False else argparse.BooleanOptionalAction
        else:
            kwargs["type"] = field.metadata.get("parse") or _PARSERS.get(field.type, str)
            if choices is not None:  # listed in the help; checked by `check`, as from Python
                kwargs["metavar"] = "{" + ",".join(str(c) for c in choices) + "}"
        parser.add_argument(*flags(field), **kwargs)


def from_args(cls, args):
    """The `cls` of parsed flags (`add_arguments`); other attributes of `args` are left out."""
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def fields_doc(cls, indent="    "):
    """The "Fields:" section of a docstring: each field with its flag and doc."""
    lines = ["Fields (and their `vit-keras` flags):"]
    for field in dataclasses.fields(cls):
        lines.append(f"{indent}{field.name} ({flags(field)[0]}): {doc(field, cls.__name__)}")
    return "\n".join(lines)
