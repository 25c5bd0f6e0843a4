"""examples/benchmarks/term_gradients.py: per-term gradient norms into the exported model."""

from __future__ import annotations

import math

import pytest

from adst_examples.benchmarks import term_gradients

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_arm_specs_parse_into_presets_and_overrides():
    assert term_gradients.parse_arm("paper") == ("paper", {"preset": "paper"})
    name, overrides = term_gradients.parse_arm("t0=--preset adst --fusion-grad 0 --w-binary 0.5")
    assert name == "t0" and overrides == {"preset": "adst", "fusion_grad": 0.0, "w_binary": 0.5}
    with pytest.raises(SystemExit):
        term_gradients.parse_arm("plain=--no-adst")


@pytest.mark.slow  # trains a tiny model
def test_fusion_grad_zero_leaves_the_threshold_term_no_path_into_the_exported_model(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--cache-dir", str(tmp_path), "--batch", "2", "--batches", "1"]
    argv += [
        "--train-steps",
        "2",
        "--arm",
        "t1=--preset adst --fusion-grad 1",
        "--arm",
        "t0=--preset adst --fusion-grad 0",
        "--arm",
        "s=--preset adst --main-target sdf",
    ]
    rows = {(r["arm"], r["term"]): r for r in term_gradients.main(argv)}
    assert {term for arm, term in rows if arm == "t0"} == {"mask", "main", "threshold", "binary"}
    for arm in ("t0", "t1"):
        assert rows[arm, "mask"]["init_ratio"] == 1.0 and rows[arm, "mask"]["init"] > 0
        assert rows[arm, "main"]["init"] > 0 and rows[arm, "binary"]["init"] > 0
    assert rows["t1", "threshold"]["init"] > 0 and rows["t1", "threshold"]["trained"] > 0
    assert rows["t0", "threshold"]["init"] == 0.0 and rows["t0", "threshold"]["trained"] == 0.0
    # Same init, same batch: the terms fusion_grad does not touch pull equally hard before training.
    for term in ("mask", "main", "binary"):
        assert math.isclose(rows["t0", term]["init"], rows["t1", term]["init"], rel_tol=1e-5), term
    assert {term for arm, term in rows if arm == "s"} == {"mask", "main", "threshold", "binary"}
    printed = capsys.readouterr().out
    assert "| t0 | threshold | 10 | 0 | 0.00 |" in printed
