"""Temporary: which attention kernel breaks packed == alone (bf16, Mamba on the reference path)."""
import contextlib, json, os, sys, time
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from falcon_h1.megatron_compat.parallel import initialize_parallel
from falcon_h1.kernels import KernelOptions
from falcon_h1.model import build_model
from tests.falcon_h1.packed_model import CONFIG, ROWS, batch, errors, run_alone, run_packed

initialize_parallel(tp=1, pp=1)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
out = os.environ.get("OUT", "/tmp")
off = dict(triton_ssd=False, triton_conv=False, fused_mamba_branch=False)
H32 = CONFIG.replace(head_dim=32)
B = SDPBackend
cases = [
    ("sdpa any", CONFIG, "sdpa", None),
    ("sdpa WITHOUT the alignment copy", CONFIG, "sdpa", "unaligned"),
    ("flex WITHOUT the alignment copy", CONFIG, "flex", "unaligned"),
    ("triton conv, sdpa", CONFIG, "sdpa", "conv"),
    ("unfused", CONFIG, "unfused", None),
    ("sdpa cudnn only", CONFIG, "sdpa", [B.CUDNN_ATTENTION]),
    ("sdpa efficient only", CONFIG, "sdpa", [B.EFFICIENT_ATTENTION]),
    ("sdpa math only", CONFIG, "sdpa", [B.MATH]),
    ("sdpa efficient+math", CONFIG, "sdpa", [B.EFFICIENT_ATTENTION, B.MATH]),
    ("hd32 sdpa any", H32, "sdpa", None),
    ("varlen", CONFIG, "varlen", None),
    ("flex", CONFIG, "flex", None),
    ("hd32 flex", H32, "flex", None),
    ("hd32 varlen", H32, "varlen", None),
]
import falcon_h1.kernels.document_attention as _da
ALIGNED = getattr(_da, "_rows_aligned", lambda t: t)
rows = []
for name, cfg, attn, backends in cases:
    t = time.time()
    try:
        opts = dict(off, triton_conv=backends == "conv")
        import falcon_h1.kernels.document_attention as da  # the alignment cases: identity here
        da._rows_aligned = (lambda t: t) if backends == "unaligned" else ALIGNED
        backends = None if backends in ("conv", "unaligned") else backends
        ctx = sdpa_kernel(backends) if backends else contextlib.nullcontext()
        with ctx:
            model = build_model(cfg, precision="bf16", kernel_options=KernelOptions(packed_attention=attn, **opts), seed=7)
            data = {k: v.to(DEV) for k, v in batch(ROWS, cfg.vocab_size).items()}
            P, A_ = run_packed(model, data), run_alone(model, data, ROWS)
        got = errors(P, A_)
        per_doc = []
        for st, ln in ((0, 13), (13, 37), (50, 22)):
            w_, g_ = A_["logits"][:, st:st + ln].double(), P["logits"][:, st:st + ln].double()
            per_doc.append(round(((g_ - w_).norm() / w_.norm()).item(), 4))
        row = dict(case=name, per_doc=per_doc, logits=round(got["logits"], 5), loss=round(got["loss"], 5), s=round(time.time() - t, 1))
    except Exception as e:
        row = dict(case=name, error=f"{type(e).__name__}: {str(e)[:200]}", s=round(time.time() - t, 1))
    rows.append(row)
    print(json.dumps(row), flush=True)
    json.dump(rows, open(f"{out}/packed_diag2.json", "w"), indent=1)
