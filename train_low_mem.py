"""chatlm with the low-memory profile: the same commands and trainer, other settings.

    python train_low_mem.py train --train_file=data/my_train.parquet --model_size=small
    accelerate launch ./train_low_mem.py train --is_keep_training=True

The profile (config.low_memory) streams the data with a small buffer, cuts micro-batches to 2
rows and raises gradient accumulation so the effective batch stays the same, turns on gradient
checkpointing and Adafactor (factored second moments), releases cached GPU memory every 100
steps and logs RSS and GPU memory. Flags given here still win over the profile.
"""
import train as cli
from config import TrainConfig, load_config, low_memory, merge
from utils.cli import dataclass_flags, run_cli, takes_flags

BATCH_KEYS = ("batch_size_per_gpu", "gradient_accumulation_steps")


@takes_flags(dataclass_flags(TrainConfig))
def train(config: str | None = None, **flags):
    """`train.py train` with the low-memory profile applied over the config file.

    Args:
        config: a YAML file of settings, applied before the profile and the flags.
    """
    from model.trainer import ChatTrainer
    cfg = low_memory(load_config(config, **flags))
    # The profile rewrites the batch split itself; any other flag the user gave wins over it.
    cfg = merge(cfg, {k: v for k, v in flags.items() if k not in BATCH_KEYS}, "the command line")
    ChatTrainer(cfg).train()


if __name__ == "__main__":
    run_cli({**cli.COMMANDS, "train": train}, "train_low_mem.py")
