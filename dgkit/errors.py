"""Errors that dgkit reports to the user as one clear line instead of a traceback."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable


class DGKitError(Exception):
    """Base of every error meant for the user: the CLI prints it without a traceback."""


class ConfigError(DGKitError, ValueError):
    """A setting has a value dgkit cannot use."""

    def __init__(self, parameter: str, problem: str, allowed: str | Iterable[object] | None = None):
        if allowed is not None and not isinstance(allowed, str):
            allowed = ", ".join(str(a) for a in allowed)
        self.parameter, self.problem, self.allowed = parameter, problem, allowed
        message = f"{parameter}: {problem}"
        if allowed is not None:
            message += f" (allowed: {allowed})"
        super().__init__(message)

    def under(self, section: str, nested: str) -> ConfigError:
        """The same error for a setting that lives one level down: an algorithm built as
        another's ``base`` names ``model.algorithm.base.rho``, not ``model.algorithm.rho``."""
        if self.parameter != section and not self.parameter.startswith(section + "."):
            return self
        return ConfigError(nested + self.parameter[len(section):], self.problem, self.allowed)


PLURALS = {"averaging": "averaging methods"}


class UnknownAliasError(DGKitError, KeyError):
    """An --algo/--data/metric alias that no plugin registered."""

    def __init__(self, kind: str, alias: str, known: Iterable[str]):
        known = sorted(known)
        self.kind, self.alias, self.known = kind, alias, known
        close = difflib.get_close_matches(alias.lower(), known, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(known) if known else "none registered"
        super().__init__(f"unknown {kind} {alias!r}.{hint} Known {PLURALS.get(kind, kind + 's')}: {listing}.")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class PluginError(DGKitError):
    """A plugin failed to import or raised inside one of its hooks."""


def check_choice(value: object, choices: object, parameter: str) -> None:
    """Raise a ConfigError naming ``parameter`` unless ``value`` is one of ``choices``: the
    ``Literal[...]`` type of the parameter itself (so the values are written once) or any
    iterable of values."""
    allowed = typing.get_args(choices) or tuple(choices)  # type: ignore[call-overload]
    if value not in allowed:
        raise ConfigError(parameter, f"{value!r}", ", ".join(str(a) for a in allowed))


def check(condition: bool, parameter: str, problem: str, allowed: str | None = None) -> None:
    """Raise a ConfigError naming ``parameter`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(parameter, problem, allowed)


class RunStopped(DGKitError):
    """Training stopped at a batch boundary on a signal, after writing the resume checkpoint.

    The process exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), as a shell
    reports a command killed by that signal, so schedulers and scripts do not read success.
    """

    def __init__(self, signum: int, message: str, during_training: bool = True):
        self.signum, self.during_training = signum, during_training
        self.exit_code = 128 + signum
        super().__init__(message)
