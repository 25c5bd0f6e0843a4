"""The ADST study's command line: every arm × dataset × seed, paired intervals against the baseline.

::

    python examples/study.py --datasets busi,kvasir --arms baseline,adst,paper --seeds 5 --epochs busi=50,kvasir=40
    python examples/study.py --folder cvc data/CVC/Original "data/CVC/Ground Truth" --datasets cvc --seeds 5
    python examples/study.py --out runs/study --report-only      # report the runs already in a folder

The study itself is the package :mod:`adst_examples.studylib` (see its docstring and docs/study.md).
"""

from adst_examples.studylib.cli import cli, main

__all__ = ["main"]

if __name__ == "__main__":
    cli()
