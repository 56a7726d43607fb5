"""Programs that train bt-jax models: `python -m train` and `python -m train.memory`."""
