"""Numeric defaults of the targets and the head's blocks (the head/loss configuration lives in presets.py)."""

#: DBNet shrink ratio r: the core offset is D = A (1 - r^2) / L.
SHRINK_RATIO: float = 0.4

#: Value of the border ("threshold") map far from any lesion boundary.
THRESH_MIN: float = 0.3

#: Value of the border ("threshold") map on a lesion boundary.
THRESH_MAX: float = 0.7

#: Width of the head's hidden layers (must satisfy SACA's group/split constraints).
HIDDEN_CHANNELS: int = 16

#: The head's main branch and fusion run at <= 1/HEAD_STRIDE of the mask size.
HEAD_STRIDE: int = 2

#: SACA defaults (SRU group norm groups, gate threshold; CRU split, squeeze, groups, kernel).
SACA_GROUP_NUM: int = 4
SACA_GATE_THRESHOLD: float = 0.5
SACA_ALPHA: float = 0.5
SACA_SQUEEZE_RATIO: int = 2
SACA_GROUP_SIZE: int = 2
SACA_GROUP_KERNEL_SIZE: int = 3

#: ``main_target="sdf-clip"``: the signed-distance target clipped to [-SDF_CLIP, SDF_CLIP], which tanh reaches with
#: finite logits (atanh(0.9) = 1.47), so pixels far from every edge stop pulling once they are there.
SDF_CLIP: float = 0.9

#: Steepness k of the DB-style differentiable binarization 1 / (1 + exp(-k (P - T))).
DB_STEEPNESS: float = 50.0
