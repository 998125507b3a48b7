"""``histolens models``: list the registered models, or print one model's card."""

from __future__ import annotations

import argparse
import json

from ._registry import _REGISTRY, DEFAULT_MODEL, get_card, list_models

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", nargs="?", help="print this model's card (JSON); omit to list all models"
    )
    parser.add_argument("--filter", default="*", help="shell pattern for the list, e.g. 'atlas*'")


def _status(name: str) -> str:
    entry = _REGISTRY[name]
    if entry.foundation:
        return "backbone from local checkpoint / HF cache"
    if entry.weights is None:
        return "architecture only (random init)"
    return (
        "weights present" if entry.weights.is_file() else "weights not built yet (histolens train)"
    )


def run(args: argparse.Namespace) -> int:
    if args.name:
        try:
            card = get_card(args.name)
        except ValueError as exc:
            print(f"error: {exc}")
            return 2
        print(json.dumps(card.to_dict(), indent=2))
        return 0
    names = list_models(args.filter)
    width = max((len(n) for n in names), default=4)
    for name in names:
        card = get_card(name)
        mark = "*" if name == DEFAULT_MODEL else " "
        print(
            f"{mark} {name:<{width}}  {card.backbone:<28} {card.mpp:>5} um/px  "
            f"tile {card.tile_size:>4}  {', '.join(card.tasks):<24} {_status(name)}"
        )
    print("(* = default; `histolens models NAME` prints a card)")
    return 0
