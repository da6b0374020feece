"""chatlm with the low-memory profile: `train.py` with --profile=low_memory.

    python train_low_mem.py train --train_file=data/my_train.parquet --model_size=small
    accelerate launch ./train_low_mem.py train --is_keep_training=True

The profile (config.low_memory, applied in load_config) streams the data with a small buffer,
cuts micro-batches to 2 rows and raises gradient accumulation so the effective batch stays the
same, turns on gradient checkpointing and Adafactor (factored second moments), releases cached
GPU memory every 100 steps and logs RSS and GPU memory. Flags given here still win over it.
"""
import train as cli
from config import TrainConfig
from utils.cli import dataclass_flags, run_cli, takes_flags


@takes_flags(dataclass_flags(TrainConfig))
def train(config: str | None = None, **flags):
    """`train.py train --profile=low_memory`.

    Args:
        config: a YAML file of settings, applied before the profile and the flags.
    """
    cli.train(config, **{"profile": "low_memory", **flags})


if __name__ == "__main__":
    run_cli({**cli.COMMANDS, "train": train}, "train_low_mem.py")
