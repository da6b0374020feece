"""Launched by tests/test_engines.py under torchrun: a run of `ChatTrainer` with the flags given
as JSON, and a hook that records, after each micro-batch's backward, whether Accelerate marks it
the last of its accumulation and whether any trainable parameter holds a gradient yet. Under
FSDP2, a micro-batch whose gradients were reduce-scattered leaves them on the sharded parameters;
one that only accumulates keeps them inside FSDP2 and leaves `.grad` unset. Writes one JSON
line per micro-batch to the file named by the second argument, with the process's rank."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class GradientsAfterBackward:
    def __init__(self, path):
        self.path = path

    def on_backward(self, trainer):
        params = [p for p in trainer.policy.model.parameters() if p.requires_grad]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"rank": trainer.accelerator.process_index,
                                "last": trainer.accelerator.sync_gradients,
                                "grads": sum(p.grad is not None for p in params), "params": len(params)}) + "\n")


if __name__ == "__main__":
    from config import load_config
    from model.trainer import ChatTrainer
    flags, out = json.loads(sys.argv[1]), sys.argv[2]
    ChatTrainer(load_config(**flags), hooks=[GradientsAfterBackward(f"{out}.rank{os.environ['RANK']}")]).train()
