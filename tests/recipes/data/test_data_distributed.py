"""Two gloo ranks under torchrun: bundled corpus built once (rank 0 first, barrier), Megatron's
dataset builder run distributed on CPU, and the DP=2 slices equal to the DP=1 global batch."""

from pathlib import Path

from tests.conftest import torchrun

HERE = Path(__file__).resolve().parent


def test_two_ranks_build_bundled_and_see_the_dp1_batch(tmp_path):
    proc = torchrun(HERE / "dp_bundled_worker.py", 2, str(tmp_path))
    assert "DP2 == DP1" in proc.stdout, proc.stdout[-2000:]
    assert len(list(tmp_path.glob("bundled-*/*.bin"))) == 1
    assert not list(tmp_path.glob("*partial*"))
