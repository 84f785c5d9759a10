"""benchmarks/packed_throughput_bench.py's CPU smoke run: it times both batches, its packed batch is
the data pipeline's (fuller rows than one conversation per row), and the packed row equals its
conversations run alone (fp32 on CPU) in the report it writes."""

import json

from benchmarks import packed_throughput_bench


def test_smoke_run_reports_packed_and_unpacked_throughput(megatron_single, tmp_path, capsys):
    out = tmp_path / "report.json"
    packed_throughput_bench.main(["--tiny", "--json", str(out)])
    report = json.loads(out.read_text())
    unpacked, packed = report["results"]
    assert unpacked["mode"] == "one_per_row" and packed["mode"] == "packed_sdpa"
    assert unpacked["conversations"] == 2 and packed["conversations"] > 2
    assert packed["efficiency"] > unpacked["efficiency"]
    for row in (unpacked, packed):
        assert row["real_tokens_per_s"] > 0 and row["ms"] > 0
    assert packed["conversations_in_row"] >= 2
    assert packed["max_rel_err_logits"] <= 1e-5 and packed["rel_err_loss"] <= 1e-5
    assert "real_tokens_per_s" in capsys.readouterr().out
