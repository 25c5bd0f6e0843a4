"""What the study's rules share, fixed before the runs: the Dice margin, the finalists' seeds, the finalist pool."""

import math
from typing import Any

__all__ = ["MIN_SEEDS", "NON_INFERIORITY", "finalist_pool", "not_eligible"]

#: The smallest mean paired validation Dice difference (a fraction: -0.005 = -0.5 points) of an eligible arm.
NON_INFERIORITY = -0.005
#: Paired seeds an eligible arm needs to take part in the decision (a finalist); with none, the pick is provisional.
MIN_SEEDS = 12


def not_eligible(paired_val: dict[str, Any]) -> str | None:
    """Why an arm's paired validation differences (``paired_val`` of its report entry) leave it out of the
    decision, or ``None`` when it is eligible (non-inferior on validation Dice, with a BIoU difference)."""
    dice, biou = paired_val["dice"]["mean"], paired_val["boundary_iou"]["mean"]
    if not (math.isfinite(dice) and math.isfinite(biou)):
        return "no paired validation runs"
    if dice < NON_INFERIORITY:
        return f"validation Δ Dice {100 * dice:+.2f} points < {100 * NON_INFERIORITY:+.1f}"
    return None


def finalist_pool(ranked: list[str], seeds: dict[str, int]) -> tuple[list[str], dict[str, Any]]:
    """The arms the rule decides among, best first, and what the report says of them.

    ``ranked``: the eligible arms, best first; ``seeds``: their paired seeds. The pool is the finalists (>=
    :data:`MIN_SEEDS` seeds) or, with none, every eligible arm (the pick is then ``provisional``). Returns the pool
    and ``{provisional, short, arm, paired_seeds}`` (``short``: eligible arms left out for their seed count).
    """
    finalists = [a for a in ranked if seeds[a] >= MIN_SEEDS]
    pool = finalists or list(ranked)
    fields = {
        "provisional": not finalists,
        "short": {a: n for a, n in seeds.items() if n < MIN_SEEDS} if finalists else {},
        "arm": pool[0],
        "paired_seeds": seeds[pool[0]],
    }
    return pool, fields
