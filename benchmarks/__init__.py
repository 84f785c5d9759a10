"""The GPU benchmarks and their notes (NOTES.md, results/): `falcon-bench` (falcon_bench.py, the
training step and its kernels), the BitNet quantiser micro-benchmark (bitnet_bench.py), the
BitNet-against-bf16 training step and its per-projection costs (bitnet_step_bench.py) and the
multi-GPU scaling driver (scaling.py). A package so that `falcon-bench` installs as a command;
the library packages never import it."""
