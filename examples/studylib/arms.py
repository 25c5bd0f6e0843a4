"""The study's arms: a name and a string of model flags each, parsed by train.py's model builder."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence

from adst_examples import peers
from adst_examples.studylib.config import UsageError
from adst_examples.training.models import add_model_arguments, check_model_args

__all__ = ["ARMS", "BASELINE", "arm_registry", "is_adst", "parse_model_flags", "select_arms"]

#: The ADST arms and the baseline: name → model flags (those of train.py's model/criterion builder).
ARMS: dict[str, str] = {
    "baseline": "--no-adst",
    "legacy": "--preset legacy",
    "paper": "--preset paper",
    "adst": "--preset adst",
}
BASELINE = "baseline"


def arm_registry() -> dict[str, str]:
    """:data:`ARMS` plus the peer arms (:data:`adst_examples.peers.ARMS`)."""
    return {**ARMS, **peers.ARMS}


def is_adst(flags: str) -> bool:
    """Whether an arm trains the ADST head (peers and the baseline carry ``--no-adst``)."""
    return "--no-adst" not in shlex.split(flags)


def _model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="study.py (model flags)", allow_abbrev=False, add_help=False)
    add_model_arguments(p)
    return p


def parse_model_flags(flags: Sequence[str], what: str) -> argparse.Namespace:
    """Model/criterion flags → the namespace of train.py's model builder; a bad flag raises :class:`UsageError`."""
    try:
        args, unknown = _model_parser().parse_known_args(list(flags))
    except SystemExit as exc:  # argparse already printed the reason
        raise UsageError(f"{what}: bad model flags {' '.join(flags)!r}") from exc
    if unknown:
        raise UsageError(f"{what}: unknown flags {unknown} (neither study.py's nor the model builder's)")
    try:
        check_model_args(args)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None
    return args


def select_arms(names: str, definitions: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``--arms`` (comma list) and ``--arm NAME=FLAGS`` → the arms to run (baseline first) and the registry."""
    registry = arm_registry()
    defined = []
    for spec in definitions:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--arm: expected NAME=FLAGS, got {spec!r}")
        registry[name.strip()] = flags
        defined.append(name.strip())
    arms = [a.strip() for a in names.split(",") if a.strip()] + defined
    arms = [BASELINE] + [a for a in dict.fromkeys(arms) if a != BASELINE]
    unknown = [a for a in arms if a not in registry]
    if unknown:
        raise UsageError(f"--arms: unknown arm(s) {unknown}; known: {', '.join(registry)} (or define one with --arm)")
    return arms, registry
