"""Multi-process start-up: ``jax.distributed.initialize`` when the environment says there are peers.

Cloud TPU VMs (one host or a pod slice: where ``libtpu`` is installed), GKE TPU pods (``TPU_WORKER_HOSTNAMES``)
and SLURM / Open MPI launches are detected by JAX itself (``initialize()`` with no arguments). Elsewhere set
``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on every
process (``JAX_LOCAL_DEVICE_IDS`` optionally). A single process starts nothing.
"""

from __future__ import annotations

import importlib.util
import os

import jax

from lora_jax.errors import ConfigError


def initialize_from_env() -> bool:
    """Initialise the JAX cluster if the environment describes one; return whether it did."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = os.environ.get("JAX_NUM_PROCESSES")
    pid = os.environ.get("JAX_PROCESS_ID")
    if address and n and pid is not None:
        for name, value in (("JAX_NUM_PROCESSES", n), ("JAX_PROCESS_ID", pid)):
            if not value.strip().isdigit():
                raise ConfigError(f"environment variable {name}={value!r}: expected a non-negative integer")
        if int(n) > 1:
            local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
            if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU collectives across processes need gloo
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(
                address, int(n), int(pid), local_device_ids=[int(x) for x in local.split(",")] if local else None
            )
            return True
        return False
    if (
        os.environ.get("TPU_WORKER_HOSTNAMES")
        or os.environ.get("SLURM_NTASKS", "1") != "1"
        or os.environ.get("OMPI_COMM_WORLD_SIZE", "1") != "1"
    ):
        jax.distributed.initialize()
        return True
    if importlib.util.find_spec("libtpu") is not None:
        # A Cloud TPU VM sets none of the variables above: JAX finds the slice's workers on the metadata server.
        # (libtpu alone drives a pod slice's devices, but Orbax's multi-host checkpoints need the distributed
        # client.) On a machine with libtpu but no TPU, JAX detects no cluster and raises ValueError.
        try:
            jax.distributed.initialize()
        except ValueError:
            return False
        return True
    return False
