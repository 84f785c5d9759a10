"""falcon-bench (benchmarks/falcon_bench.py) on CPU: the command is installed from the module that
holds it, it refuses to run without a GPU, and every variant of our model it times computes Hugging
Face's FalconH1 loss (on the GPU the benchmark prints the variants' first-step losses for the same
check)."""

from __future__ import annotations

import fnmatch
import importlib
import tomllib

import pytest
import torch

from tests.conftest import REPO

# variants that are not our model with other kernel options / config: HF itself (moved to CUDA),
# torch.compile (minutes on CPU), BitNet (another function), random init (other weights)
NOT_HF_FUNCTION = {"hf_transformers", "hf_transformers_checkpointing", "ours_fused_compiled", "ours_bitnet_fused",
                   "ours_bitnet_reference_ste", "ours_bitnet_scales_on_activations", "ours_bitnet_fused_int8_input",
                   "ours_bitnet_fused_float_input", "ours_bf16_random_init"}


def test_falcon_bench_command_is_installed_from_its_module():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    module, function = project["project"]["scripts"]["falcon-bench"].split(":")
    packaged = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert any(fnmatch.fnmatch(module.split(".")[0], pattern) for pattern in packaged), (module, packaged)
    assert (REPO / module.split(".")[0] / "__init__.py").is_file()
    assert callable(getattr(importlib.import_module(module), function))


def test_falcon_bench_without_a_gpu_says_so(monkeypatch):
    from benchmarks import falcon_bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="falcon-bench needs a CUDA GPU"):
        falcon_bench.main(["--variants", "ours_fused", "--kernels", "none"])


def test_every_variant_of_our_model_computes_the_hf_loss(megatron_single, tmp_path):
    from transformers import FalconH1ForCausalLM

    from benchmarks import falcon_bench
    from falcon_h1.presets import get_preset

    preset = get_preset("falcon_h1_tiny").replace(num_hidden_layers=2)
    torch.manual_seed(0)
    FalconH1ForCausalLM(falcon_bench._hf_config(preset)).to(torch.bfloat16).save_pretrained(tmp_path)
    hf = FalconH1ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()  # the bf16 weights, fp32 math
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, preset.vocab_size, (2, 24), generator=g)
    labels = torch.randint(0, preset.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        want_logits = hf(ids).logits
        want = torch.nn.functional.cross_entropy(want_logits.flatten(0, 1), labels.flatten()).item()
    ours_loss = lambda m: m(ids, labels=labels).float().mean()
    variants = falcon_bench._variants(tmp_path, preset, ours_loss, ids, labels)
    checked = sorted(set(variants) - NOT_HF_FUNCTION)
    assert {"ours_fused", "ours_fused_options_off", "ours_fused_ssd_recompute", "ours_unfused_sdpa"} <= set(checked)
    for name in checked:
        model, loss_of = variants[name]()
        with torch.no_grad():
            logits, loss = model(ids).float(), loss_of(model).item()
        # bf16 activations against fp32 (a random-init model would be ~100% off in the logits)
        assert ((logits - want_logits).norm() / want_logits.norm()).item() <= 2e-2, name
        assert abs(loss - want) / want <= 1e-2, (name, loss, want)


def test_a_variant_past_its_time_limit_is_stopped():
    import signal
    import time

    from benchmarks.falcon_bench import VariantTimeout, time_limit

    before = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    with pytest.raises(VariantTimeout, match="--variant-timeout 0.2 s"):
        with time_limit(0.2):
            while time.monotonic() - started < 5:  # Python bytecode: the alarm lands between ops
                sum(range(1000))
    assert time.monotonic() - started < 2
    assert signal.getsignal(signal.SIGALRM) is before
    with time_limit(None):  # no limit
        time.sleep(0.01)
