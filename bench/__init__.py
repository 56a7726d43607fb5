"""Benchmarks of bt-jax, run from the repository root.

- `python -m bench`: bt-jax against transformers' PyTorch BridgeTower on the
  same random weights and inputs, inference heads and the train step
  (RESULTS.md).
- `python -m bench.embed`: the embedding job `bt_jax.embed.run` against the
  same job written with transformers, end to end and model calls alone
  (EMBED_RESULTS.md).
- `python -m bench.data_throughput`: the input pipeline's examples per second
  against worker processes and threads (data_throughput.md).
- `python -m bench.step_parts`: the time of each part of the fused train step.
- `python -m bench.gpu`: the bfloat16 train step and inference heads on one
  GPU.

`bench.workers` runs each framework in its own process for `bench` and
`bench.embed`.
"""
