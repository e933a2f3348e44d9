"""The command line before LightningCLI parses it: ``--algo ALIAS`` and ``--data ALIAS``
become the class paths LightningCLI understands, and an evaluation of a checkpoint gets
that run's data configuration by default."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from dgkit.checkpoint_io import read_checkpoint
from dgkit.errors import UnknownAliasError
from dgkit.plugins import registry

ALIAS_FLAGS = {  # flag -> (registry kind, LightningCLI key it rewrites to)
    "--algo": ("algorithm", "--model.algorithm"),
    "--data": ("dataset", "--data.dataset"),
    "--model.algorithm": ("algorithm", "--model.algorithm"),
    "--model.algorithm.base": ("algorithm", "--model.algorithm.base"),
    "--data.dataset": ("dataset", "--data.dataset"),
    "--model.averaging": ("averaging", "--model.averaging"),
    "--tta": ("tta", "--model.tta"),
    "--model.tta": ("tta", "--model.tta"),
}
NONE = {"none", "null"}  # --model.averaging none: no averaging; --tta none: no test-time method
OPTIONAL = ("averaging", "tta")  # kinds that may be none
_ALIAS_LIKE = re.compile(r"^[A-Za-z][\w\-]*$")


def rewrite_aliases(argv: Sequence[str]) -> list[str]:
    """Turn ``--algo ALIAS`` / ``--data ALIAS`` into LightningCLI class-path arguments."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, _, inline = arg.partition("=")
        if flag in ALIAS_FLAGS:
            kind, target = ALIAS_FLAGS[flag]
            has_value = bool(inline) or i + 1 < len(argv)
            value = inline if inline else (argv[i + 1] if i + 1 < len(argv) else "")
            consumed = 1 if inline else 2
            if has_value and kind in OPTIONAL and value.lower() in NONE:
                out.append(f"{target}=null")
                i += consumed
                continue
            if has_value and _is_alias(flag, value):
                out.append(f"{target}={registry(kind).get(value).target}")
                i += consumed
                continue
        out.append(arg)
        i += 1
    return out


def data_from_checkpoint(argv: list[str]) -> list[str]:
    """For validate/test/predict, default the data config to the one saved in the checkpoint.

    Lightning restores the model's hyperparameters from ``--ckpt_path``; without the data
    module's too, the default data set would be evaluated. Inserted right after the
    subcommand, so the user's own ``--data.*``/``--config`` still win.
    """
    if not argv or argv[0] not in ("validate", "test", "predict"):
        return argv
    ckpt = None
    for i, arg in enumerate(argv):
        if arg.startswith("--ckpt_path="):
            ckpt = arg.split("=", 1)[1]
        elif arg == "--ckpt_path" and i + 1 < len(argv):
            ckpt = argv[i + 1]
    if not ckpt or not Path(ckpt).is_file():
        return argv
    hparams = read_checkpoint(ckpt, mmap=True).get("datamodule_hyper_parameters") or {}
    data = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if "dataset" not in data:
        return argv
    return [argv[0], "--data=" + json.dumps(data, default=list), *argv[1:]]


def _is_alias(flag: str, value: str) -> bool:
    """``--data`` also takes LightningCLI config (a path or a dict); only bare words are aliases."""
    if flag in ("--algo", "--tta"):
        return True
    kind = ALIAS_FLAGS[flag][0]
    if value in registry(kind):  # even beside a folder of that name (./fmow is the path)
        return True
    if not _ALIAS_LIKE.match(value) or Path(value).exists():
        return False
    # A bare word that is no alias: --data.dataset also accepts class names (RotatedMNIST).
    if value[:1].isupper():
        return False
    known = [*registry(kind).entries, *(["none"] if kind in OPTIONAL else [])]
    raise UnknownAliasError(kind, value, known)
