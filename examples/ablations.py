"""One table of every ablation that ``compare.py`` wrote into a comparison folder.

``compare.py --tag NAME --adst-flags "..."`` writes ``OUT/comparison-NAME.json`` next to the untagged
``OUT/comparison.json`` (the defaults); all of them share the baselines in OUT. This script puts their paired
Dice differences side by side, sorted by the **validation** difference, which is what settings are chosen on;
the test difference is shown but never used to choose.

    python examples/ablations.py runs/q-kvasir            # prints markdown; --json FILE also saves it
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pm(stat: dict[str, Any]) -> str:
    if not stat.get("n"):
        return "n/a"
    spread = f" ± {stat['std']:.4f}" if stat["n"] > 1 and math.isfinite(stat["std"]) else ""
    return f"{stat['mean']:+.4f}{spread} ({stat['adst_better']}/{stat['n']})"


def collect(folder: Path) -> list[dict[str, Any]]:
    """Rows ``{tag, flags, seeds, val, test, test_dice, hd95}``, best validation difference first."""
    files = sorted(folder.glob("comparison*.json"))
    if not files:
        raise FileNotFoundError(f"no comparison*.json in '{folder}' (run examples/compare.py --out {folder} first)")
    rows = []
    for path in files:
        report = json.loads(path.read_text(encoding="utf-8"))
        if "paired_val_dice" not in report:
            raise ValueError(f"{path}: no paired_val_dice (written by an older compare.py); rerun compare.py")
        tag = path.stem.removeprefix("comparison").removeprefix("-") or "default"
        adst = report["summary"]["adst"]
        rows.append(
            {
                "tag": tag,
                "flags": " ".join(report["adst_flags"]) or "(defaults)",
                "seeds": report["seeds"],
                "val": report["paired_val_dice"],
                "test": report["paired_dice"],
                "test_dice": adst["dice"],
                "hd95": adst["hd95"],
            }
        )
    rows.sort(key=lambda row: -row["val"]["mean"] if row["val"]["n"] else math.inf)
    return rows


def format_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| ablation | ADST flags | seeds | Δ val Dice (better/n) | Δ test Dice (better/n) "
        "| ADST test Dice | ADST HD95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        dice, hd95 = row["test_dice"], row["hd95"]
        lines.append(
            f"| {row['tag']} | `{row['flags']}` | {','.join(map(str, row['seeds']))} | {_pm(row['val'])} | "
            f"{_pm(row['test'])} | {dice['mean']:.4f} | {hd95['mean']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a compare.py --out folder")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = collect(args.folder)
    print(format_markdown(rows), end="")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return rows


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"ablations.py: error: {error}")
