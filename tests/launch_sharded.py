"""`entangle` under a sharded Accelerate set-up on CPU processes, for tests.

Accelerate offers FSDP and DeepSpeed only on accelerators; torch's FSDP2 and DeepSpeed's ZeRO-3 both run
on CPU with gloo, so this harness builds the same state Accelerate builds on GPUs and runs the CLI:

    python -m torch.distributed.run --nproc_per_node 2 tests/launch_sharded.py fsdp2|zero3 train ARGS...
"""

import os
import sys

import accelerate
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

from entangle import cli

MODE = sys.argv.pop(1)
_init = accelerate.Accelerator.__init__


def forced(self, *args, **kwargs):
    _init(self, *args, **kwargs)   # train.device=cpu: Accelerate's multi-CPU state (gloo, one process per rank)
    # Accelerate re-derives the type from the device later on; pin it for this process.
    kind = DistributedType.DEEPSPEED if MODE == "zero3" else DistributedType.FSDP
    AcceleratorState.distributed_type = property(lambda s: kind, lambda s, v: None)
    if MODE == "zero3":
        plugin = DeepSpeedPlugin(zero_stage=3)
        plugin.set_mixed_precision("no")
        plugin.select(_from_accelerator_state=True)
        self.state.deepspeed_plugins = plugin
        self.deepspeed_engine_wrapped = None
    else:
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], cpu_ram_efficient_loading=False,
            state_dict_type="FULL_STATE_DICT")


accelerate.Accelerator.__init__ = forced
rc = cli.main(sys.argv[1:])
sys.stdout.flush()
sys.stderr.flush()
os._exit(rc)  # skip interpreter teardown: gloo/DeepSpeed threads at exit sometimes abort a CPU process
