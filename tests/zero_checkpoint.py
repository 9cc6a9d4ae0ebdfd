"""Make a real DeepSpeed ZeRO training checkpoint on CPU (run as a script by test_formats.py).

usage: python zero_checkpoint.py HF_FOLDER OUT_FOLDER STAGE
The model is loaded from HF_FOLDER, wrapped by deepspeed.initialize with a zero-lr
optimizer, and saved with engine.save_checkpoint, so the ZeRO shards hold exactly
HF_FOLDER's weights (fp32 master copy).
"""

import os
import sys

os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu")
os.environ.setdefault("MASTER_PORT", "29533")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")
import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

# Hack: DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce op (minutes on 2 cores)
# that a single-process save never uses; mark it incompatible so it is skipped.
deepspeed.ops.__compatible_ops__[get_accelerator().create_op_builder("ShareMemCommBuilder").NAME] = False

from transformers import AutoModelForCausalLM  # noqa: E402

src, out, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(src)
opt = torch.optim.SGD(model.parameters(), lr=0.0)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
    "train_batch_size": 1, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True})
engine.save_checkpoint(out, tag="global_step7")
print("saved", out)
