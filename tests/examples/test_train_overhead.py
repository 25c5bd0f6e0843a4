import pytest

from adst_examples.benchmarks import train_overhead


@pytest.mark.slow  # times six functions on a real smp model: ~15 s idle
def test_breakdown_times_each_part_of_the_adst_step(capsys):
    argv = ["--encoder", "resnet18", "--size", "32", "--batch", "2", "--steps", "1", "--warmup", "0"]
    (row,) = train_overhead.main([*argv, "--breakdown"])
    assert set(row["parts"]) == set(train_overhead.PARTS)
    assert all(seconds > 0 for seconds in row["parts"].values())
    assert row["ratio"] == row["adst_s"] / row["plain_s"]
    out = capsys.readouterr().out
    assert "| head |" in out and "share of the extra time" in out


@pytest.mark.slow  # three train steps on a real smp model
def test_a_second_main_target_is_timed_in_the_same_loop(capsys):
    argv = ["--encoder", "resnet18", "--size", "32", "--batch", "2", "--steps", "1", "--warmup", "0"]
    (row,) = train_overhead.main([*argv, "--main-target", "sdf", "--also-main-target", "core"])
    assert row["also_s"] > 0 and row["parts"] == {}
    out = capsys.readouterr().out
    assert "main_target sdf" in out and "main_target core in the same loop" in out
    (row,) = train_overhead.main(argv)
    assert row["also_s"] is None
