"""One process of a training-cache build (and optionally a short run after it), for
tests/test_cache_distributed.py, which starts it in fresh processes: the device count is fixed when JAX
starts, and jax.distributed joins each process once.

    python tests/cache_checks.py CONFIG.json RANK PROCESSES PORT DEVICES cache|train [--die-after-shards N]

--die-after-shards N: the last process ends itself (os._exit, as a kill would: no cleanup) when it is
about to build its (N+1)-th shard.
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("rank", type=int)
parser.add_argument("processes", type=int)
parser.add_argument("port", type=int)
parser.add_argument("devices", type=int)
parser.add_argument("action", choices=["cache", "train"])
parser.add_argument("--die-after-shards", type=int)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from lumina_jax.training import cache, loop  # noqa: E402
from lumina_jax.training.config import TrainConfig  # noqa: E402

if args.processes > 1:
    jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.processes, process_id=args.rank)
if args.die_after_shards is not None and args.rank == args.processes - 1:
    build_shard, built = cache._build_shard, []

    def build_then_die(*shard_args):
        if len(built) == args.die_after_shards:
            os._exit(9)
        built.append(shard_args[1])
        build_shard(*shard_args)

    cache._build_shard = build_then_die

config = TrainConfig(**json.loads(open(args.config).read()))
if args.action == "cache":
    loop.prepare_data(config)
    print(json.dumps({"process": jax.process_index(), "local_devices": len(jax.local_devices())}))
else:
    summary = loop.train(config, progress=False)
    print(json.dumps({"process": jax.process_index(), "step": summary.step, "devices": jax.device_count()}))
sys.stdout.flush()
if args.processes > 1:
    jax.distributed.shutdown()
