"""A 4-device (2 data x 2 fsdp) QLoRA run gives the 1-device loss curve; partition rules; batch errors.

The multi-device run needs XLA_FLAGS set before JAX starts, so it runs in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from jax.sharding import PartitionSpec

from jaxlora.train.sharding import param_spec

ROOT = Path(__file__).resolve().parents[2]


def test_param_spec_shards_the_largest_divisible_axis():
    assert param_spec((64, 128), 4) == PartitionSpec(None, "fsdp")
    assert param_spec((2048,), 4) == PartitionSpec("fsdp")
    assert param_spec((6, 3), 4) == PartitionSpec()  # nothing divisible: replicate
    assert param_spec((), 4) == PartitionSpec()
    assert param_spec((64, 128), 1) == PartitionSpec()


def test_four_simulated_devices_match_one_device():
    """2x2 and 1x4 meshes; XLA must not have to gather an activation whole (before the stacked layers kept
    their layer axis unsharded, a 1x4 CLI run logged 32 "Involuntary full rematerialization" warnings)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "tests.train._sharding_worker"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    # Float tolerance: the sharded run sums partial matmuls and gradients in another order.
    np.testing.assert_allclose(res["four"], res["one"], rtol=2e-5)
    np.testing.assert_allclose(res["fsdp4"], res["one"], rtol=2e-5)
    assert "Involuntary full rematerialization" not in out.stderr, out.stderr[-3000:]
    assert res["one"][-1] < res["one"][0]
    # Packed 4-bit codes, dense params and adapters are all split over the fsdp axis somewhere.
    for kind in ("QuantizedWeight:uint8", "LoRAParam:float32", "Param:float32"):
        assert any("fsdp" in spec for spec in res["placed"][kind]), (kind, res["placed"])
    assert "6 rows" in res["error"] and "multiple of 4" in res["error"]
