"""Run loratune.train in a child process for the resume tests. argv: CONFIG [kill-in-checkpoint-step | final].

Each step sleeps a little so the parent can SIGKILL the child at a step of its choosing; with a step number,
the child SIGKILLs itself in the middle of writing that step's checkpoint (files written, not yet renamed); with
`final`, in the middle of the final save (the adapter written into a temporary folder, the rest not yet)."""

import importlib
import json
import os
import signal
import sys
import time

from loratune.config import load_config

# `loratune.train` is the public function; the module of the same name is reached through importlib.
loop = importlib.import_module("loratune.training.recipe")
checkpoint = importlib.import_module("loratune.training.checkpoint")
cfg = load_config(sys.argv[1])
slow_batch = loop.to_device_batch


def to_device_batch(*args, **kwargs):
    time.sleep(0.15)
    return slow_batch(*args, **kwargs)


loop.to_device_batch = to_device_batch
if len(sys.argv) > 2 and sys.argv[2] == "final":
    def dying_save_config(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_config = dying_save_config  # save_run writes the weights, then the config
elif len(sys.argv) > 2:
    kill_step = int(sys.argv[2])
    replace_dir = checkpoint._replace_dir

    def dying_replace(src, dst):
        if dst.name == f"step-{kill_step:06d}":
            os.kill(os.getpid(), signal.SIGKILL)
        replace_dir(src, dst)

    checkpoint._replace_dir = dying_replace
run_dir, final = loop.train(cfg, resume=None)
print(json.dumps(final))
