"""Exceptions turned into the one line a user reads: what is wrong and how to fix it.

jsonargparse wraps an error raised while a class is built (a data set whose root is
missing) or a mistyped option of a class given by ``class_path`` (``--model.algorithm.rhoo``)
into its Union dump of every subtype tried; the user's problem is the innermost line.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable

from dgkit.errors import ConfigError, DGKitError
from dgkit.plugins import qualified_name, registry

_UNION = "Does not validate against any of the Union subtypes"
_CALLABLE_PREFIX = re.compile(r"Type [^:]*? expects a function or a callable class: ")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)":')
_NOT_ACCEPTED = re.compile(r"Option '([\w.]+)' is not accepted\. Got value: Namespace\(class_path='([\w.]+)'")


def user_error(exc: BaseException) -> DGKitError | None:
    """The DGKitError behind ``exc`` (itself, or a cause a library wrapped it in)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DGKitError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def options_of(class_path: str) -> list[str]:
    """The constructor options of a class given by its import path ([] if it is not found)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    return [p for p in inspect.signature(cls).parameters if p not in ("self", "task", "backbone")]


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def parse_message(message: str, subcommand: str,
                  sections: dict[str, Callable]) -> str:
    """jsonargparse's parse error as one line, with the closest known option for a typo."""
    keys = _PARSER_KEY.findall(message)
    unknown_nested = _NOT_ACCEPTED.search(message)
    if unknown_nested:  # --model.algorithm[.base].<typo>, or the same in a config file
        option, class_path = unknown_nested.groups()
        known = options_of(class_path)
        where = ".".join(keys) or "model.algorithm"
        cls = class_path.rpartition(".")[2]
        listing = ", ".join(known) if known else "none"
        return (f"{where}.{option}: {cls} has no option '{option}'.{_did_you_mean(option, known)} "
                f"Its options: {listing} (`dgkit {subcommand} --algo ALIAS --help` explains them).")
    if _UNION in message:
        # The first subtype's error is the one meant (the other is "None"), with its
        # continuation lines; the wrapping of each nesting level goes.
        errors = message.split("Errors:", 1)[-1]
        first = " ".join(re.split(r"\n    - ", errors.strip().lstrip("- "))[0].split())
        first = _PARSER_KEY.sub("", _CALLABLE_PREFIX.sub("", first))
        first = _CALLABLE_PREFIX.sub("", " ".join(first.split()))
        first = re.sub(r"\.? Got value: Namespace\(.*$", "", first)
        first = re.sub(r"Expected a <class '(\w+)'>\. Got value: (.*)", r"expected a \1, got '\2'", first)
        return f"{'.'.join(keys)}: {first}. `dgkit {subcommand} --help` lists every option."
    simple = re.match(r'Parser key "([\w.]+)":\s*Expected a <class \'(\w+)\'>\. Got value: (.*?)\.?$',
                      message.strip(), re.S)
    if simple:
        key, kind, value = simple.groups()
        return f"{key}: expected a {kind}, got '{value}'. `dgkit {subcommand} --help` lists every option."
    unknown = re.search(r"does not accept option '([\w.]+)'|unrecognized arguments: --([\w.]+)", message)
    key = unknown and (unknown.group(1) or unknown.group(2))
    hint = ""
    if key and "." in key and key.split(".")[0] in sections:
        section, name = key.split(".", 1)
        known = [p for p in inspect.signature(sections[section]).parameters if p != "self"]
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            hint = f" Did you mean '{section}.{close[0]}'?"
    message = " ".join(message.split())
    return f"{message}.{hint} `dgkit {subcommand} --help` lists every option."


def algorithm_help(alias: str, cls: type) -> str:
    """``--model.algorithm.*`` options of one algorithm with their defaults and docstrings."""
    from docstring_parser import parse

    docs = {p.arg_name: " ".join((p.description or "").split())
            for p in parse(cls.__init__.__doc__ or "").params}
    lines = [f"{alias} ({qualified_name(cls)}): "
             f"{' '.join((cls.__doc__ or '').split())}", "", f"Options of {alias}:"]
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.name not in ("task", "backbone") and p.kind is not p.VAR_KEYWORD]
    if not params:
        lines.append("  (none)")
    for p in params:
        default = "" if p.default is p.empty else f" (default: {p.default!r})"
        lines.append(f"  --model.algorithm.{p.name}{default}")
        if docs.get(p.name):
            lines.append(f"      {docs[p.name]}")
    return "\n".join(lines)


def built_by_parser(exc: BaseException) -> str | None:
    """What a class's constructor said when it refused a setting while jsonargparse built
    it (a logger given a store it refuses, say); jsonargparse keeps only the text, inside
    its dump of every type it tried. None when ``exc`` is not such a dump."""
    message = str(exc)
    if _UNION not in message or "Errors:" not in message:
        return None
    errors = re.findall(r"^  - (.*)$", message.split("Errors:", 1)[1], re.M)
    said = [e for e in errors if not e.startswith(("Expected a <class", "Not a valid subclass", "Type "))]
    return " ".join(said[0].split()) if said else None


def algorithm_mismatch(path: str, written_by: str, wanted: str, asked: str) -> DGKitError:
    """The error for a checkpoint of another algorithm (qualified class names, shown by
    alias); ``asked`` says who wants ``wanted``: "this run builds", "--algo asks for"."""
    aliases = {e.target: e.alias for e in registry("algorithm")}
    theirs, mine = aliases.get(written_by, written_by), aliases.get(wanted, wanted)
    return ConfigError("ckpt_path", f"{path} was written by {theirs}, but {asked} {mine}",
                       f"a checkpoint of {mine}; or no --algo (or --algo {theirs}) to use this one as "
                       f"{theirs}; or --model.init_from {path} to start {mine} from its representation")
