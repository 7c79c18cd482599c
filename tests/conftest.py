import os

# Tests run on CPU; multi-device tests start their own subprocesses with more devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
