"""The two numbers the study's rules share, fixed before the runs: the Dice margin and the finalists' seeds."""

__all__ = ["MIN_SEEDS", "NON_INFERIORITY"]

#: The smallest mean paired validation Dice difference (a fraction: -0.005 = -0.5 points) of an eligible arm.
NON_INFERIORITY = -0.005
#: Paired seeds an eligible arm needs to take part in the decision (a finalist); with none, the pick is provisional.
MIN_SEEDS = 12
