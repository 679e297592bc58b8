"""Typed config fields: a help text, a type and a range per field, one checker for every source.

``option`` declares a dataclass field with its help and range; ``Setting.of`` reads back what
the field accepts (from its type hint: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
``X | None``); ``Setting.check`` checks and converts a value from YAML or from a command line,
with a message that names the setting, the value and what was expected; ``add_flag`` makes the
field's command-line flag. ``vqadapt.config`` builds its tree from these (no torch here).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from vqadapt.errors import VQAConfigError


# -- ranges -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bounds:
    """A numeric range, ends open or closed; NaN and infinities are always outside."""

    low: float
    high: float | None = None
    low_closed: bool = True
    high_closed: bool = False

    def describe(self) -> str:
        low = _number_text(self.low)
        if self.high is None:
            return f"{'>=' if self.low_closed else '>'} {low}"
        left, right = "[" if self.low_closed else "(", "]" if self.high_closed else ")"
        return f"in {left}{low}, {_number_text(self.high)}{right}"

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value`` (``must be ...``), or None."""
        if isinstance(value, float) and not math.isfinite(value):
            finite = "a finite number " if self.high is None else ""
            return f"must be {finite}{self.describe()}"
        above = value >= self.low if self.low_closed else value > self.low
        below = self.high is None or (value <= self.high if self.high_closed else value < self.high)
        return None if above and below else f"must be {self.describe()}"


def _number_text(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


POSITIVE = Bounds(0, low_closed=False)
NON_NEGATIVE = Bounds(0)
FRACTION = Bounds(0, 1)  # [0, 1): dropout, label smoothing, warmup
OPEN_FRACTION = Bounds(0, 1, low_closed=False)  # (0, 1): a share of the data
SEED_RANGE = Bounds(0, 2**32 - 1, high_closed=True)  # what every RNG (numpy's too) accepts
TIMEOUT_RANGE = Bounds(0, 365 * 86_400, low_closed=False, high_closed=True)  # timedelta-safe


def option(default: Any, help: str, bounds: Bounds | None = None, hint: str | None = None) -> Any:
    """A config field: its default, its help text (``--help``), its range and a hint shown
    with any error about it."""
    return field(default=default, metadata={"help": help, "bounds": bounds, "hint": hint})


# -- what a field accepts -----------------------------------------------------------------------
TRUE_WORDS = ("true", "yes", "y", "t", "1", "on")
FALSE_WORDS = ("false", "no", "n", "f", "0", "off")
_INVALID = object()


def show(value: Any) -> str:
    """A value as the user wrote it (YAML's words for None and booleans)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    return repr(value)


@dataclass(frozen=True)
class Setting:
    """What a field accepts: its base type, its choices, whether null is allowed, its range."""

    name: str
    base: type  # bool, int, float or str
    choices: tuple[str, ...] | None
    optional: bool
    bounds: Bounds | None
    hint: str | None

    @classmethod
    def of(cls, f: dataclasses.Field, hint: Any) -> Setting:
        """The setting of field ``f`` whose resolved type hint is ``hint``."""
        args, optional = get_args(hint), False
        if type(None) in args:  # X | None
            optional = True
            hint = next(arg for arg in args if arg is not type(None))
        choices = get_args(hint) if get_origin(hint) is Literal else None
        base = str if choices is not None else hint
        meta = f.metadata
        return cls(f.name, base, choices, optional, meta.get("bounds"), meta.get("hint"))

    def expected(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(self.choices)
        else:
            text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[
                self.base
            ]
        return text + (" or null" if self.optional else "")

    def check(self, value: Any, label: str | None = None, from_text: bool = False) -> Any:
        """``value`` checked and converted; a ``VQAConfigError`` otherwise.

        ``label`` names the setting in the message (``--epochs``, ``run/config.yaml: epochs``).
        ``from_text``: the value was typed on a command line, so ``yes``/``no`` are booleans.
        From YAML a boolean must be a YAML boolean (a quoted "yes" is refused), while a string
        that reads as a number counts as that number (PyYAML reads ``1e-3`` as a string).
        """
        label = label or self.name

        def refuse(what: str, got: Any = value, note: str = "") -> VQAConfigError:
            hint = f"; {self.hint}" if self.hint else ""
            return VQAConfigError(f"{label} must be {what} (got {show(got)}{note}){hint}")

        if value is None:
            if self.optional:
                return None
            raise refuse(self.expected())
        converted = self._convert(value, from_text)
        if converted is _INVALID:
            note = ""
            if isinstance(value, bool) and self.base is str:
                note = ": YAML reads an unquoted yes/no/on/off as a boolean, quote it"
            raise refuse(self.expected(), note=note)
        if self.choices is not None and converted not in self.choices:
            raise refuse(self.expected())
        if self.base is str and not converted.strip():
            raise refuse("a non-empty string")
        if self.bounds is not None:
            problem = self.bounds.problem(converted)
            if problem:
                raise refuse(problem.removeprefix("must be "), converted)
        return converted

    def _convert(self, value: Any, from_text: bool) -> Any:
        """``value`` as the field's base type, or ``_INVALID``."""
        if self.base is bool:
            if isinstance(value, bool):
                return value
            if from_text and isinstance(value, str):
                word = value.strip().lower()
                return True if word in TRUE_WORDS else False if word in FALSE_WORDS else _INVALID
            return _INVALID
        if self.base is str:
            return value if isinstance(value, str) else _INVALID
        if isinstance(value, bool):  # True is an int to Python, never a number to a user
            return _INVALID
        try:
            if self.base is int:
                if isinstance(value, str):
                    return int(value.strip())
                return value if isinstance(value, int) else _INVALID
            if isinstance(value, str):
                return float(value.strip())
            return float(value) if isinstance(value, int | float) else _INVALID
        except ValueError:
            return _INVALID
        except OverflowError:  # an int beyond any float
            return math.inf


def settings_of(classes: typing.Iterable[type]) -> dict[str, Setting]:
    """Every field of the dataclasses ``classes``, by name."""
    out = {}
    for klass in classes:
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            out[f.name] = Setting.of(f, hints[f.name])
    return out


def raise_problems(problems: list[str]) -> None:
    """One ``VQAConfigError`` for all the problems found (none: nothing happens)."""
    if len(problems) == 1:
        raise VQAConfigError(problems[0])
    if problems:
        raise VQAConfigError("invalid settings:\n  - " + "\n  - ".join(problems))


# -- command-line flags ---------------------------------------------------------------------------
class ErrorRaisingParser(argparse.ArgumentParser):
    """argparse whose errors are ``VQAConfigError`` (the CLI prints them; a caller can catch)."""

    def error(self, message: str) -> typing.NoReturn:
        raise VQAConfigError(message)


def add_flag(group: Any, f: dataclasses.Field, spec: Setting) -> None:
    """``--name`` with its help (``--no_name`` too for a setting that defaults to true), and
    the same with dashes (``--name-with-dashes``), hidden from the help. The value stays text:
    ``Setting.check(..., from_text=True)`` converts it."""
    help_text = f.metadata["help"].replace("%", "%%")
    if "default:" not in help_text.lower():
        default = f.default if isinstance(f.default, str) else show(f.default)
        help_text += f" (default: {default})"
    if spec.base is bool:
        kind: dict[str, Any] = {"nargs": "?", "const": "true", "metavar": "BOOL"}
    elif spec.choices:
        kind = {"metavar": "{" + ",".join(spec.choices) + "}"}
    else:
        kind = {"metavar": {int: "INT", float: "FLOAT", str: "TEXT"}[spec.base]}

    def add(flag: str, text: str, **how: Any) -> None:
        # Only the flags given reach the namespace: the others keep the file's value or the
        # default (argparse.SUPPRESS).
        group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=text, **how)
        dashed = flag.replace("_", "-")
        if dashed != flag:
            group.add_argument(
                dashed, dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **how
            )

    add(f"--{f.name}", help_text, **kind)
    if f.default is True:
        add(f"--no_{f.name}", f"Same as --{f.name} false.", action="store_const", const="false")
