"""chatlm command line: train a tokenizer and a T5 chat model, evaluate it, chat with it.

    python train.py train --config=data/demo.yaml                # the CPU demo
    accelerate launch ./train.py train --train_file=data/my_train.parquet --model_size=small
    accelerate launch ./train.py train --is_finetune=True --finetune_from_ckp_file=model_save/best \\
        --train_file=data/sft_train.parquet
    accelerate launch ./train.py train --is_keep_training=True   # resume where it stopped
    python train.py train_tokenizer --files=data/my_train.parquet --output_dir=model_save/tokenizer
    python train.py evaluate --model_dir=model_save/best --test_file=data/demo_test.parquet
    python train.py chat --model_dir=model_save/best [--prompt=...]

Every TrainConfig field (config.py) is a flag of `train`; --config=FILE.yaml comes first, flags win.
"""
import fire

from config import TrainConfig, load_config
from utils.errors import exit_on_user_error


def train(config: str | None = None, **flags):
    """Pre-train (default), finetune (--is_finetune=True) or resume (--is_keep_training=True)."""
    from model.trainer import ChatTrainer
    cfg = load_config(config, **flags)
    ChatTrainer(cfg).train()


def train_tokenizer(files: str | list[str], output_dir: str = TrainConfig.tokenizer_dir,
                    vocab_size: int = TrainConfig.vocab_size, max_rows: int = 1_000_000,
                    max_seq_len: int = TrainConfig.max_seq_len):
    """Train a BPE tokenizer on the prompt/response columns of parquet files (or lines of text files).

    At most about `max_rows` texts are sampled, so a corpus of any size fits in memory.
    """
    from utils.tokenizer import train_tokenizer as train_bpe
    tokenizer = train_bpe(files, output_dir, vocab_size, max_rows, model_max_length=max_seq_len)
    print(f"tokenizer with {len(tokenizer)} tokens saved to {output_dir}")


def evaluate(model_dir: str, test_file: str, max_rows: int = 10**9, batch_size: int = 64, samples: int = 5):
    """BLEU-4, loss and exact match (per `task` column, if any) of a trained model on a parquet file."""
    from accelerate import Accelerator

    from model.infer import ChatBot
    from model.trainer import score_file
    from utils.logging import get_logger
    bot = ChatBot(model_dir)
    accelerator = Accelerator()
    model = accelerator.prepare(bot.model)
    score_file(model, accelerator, bot.tokenizer, test_file, batch_size, bot.max_new_tokens,
               get_logger(main_process=accelerator.is_main_process), max_rows, samples)


def chat(model_dir: str = "./model_save/best", prompt: str | None = None, search_type: str = "greedy"):
    """Chat in the terminal (streamed answers); with --prompt, answer once and exit."""
    from model.infer import ChatBot
    bot = ChatBot(model_dir)
    if prompt is not None:
        print(bot.answer(str(prompt), search_type=search_type)[0])
        return
    print("chatlm: type a prompt, an empty line or Ctrl+D to quit")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            break
        if search_type == "beam":  # beam search knows its answer only at the end: no streaming
            print(bot.answer(line, search_type="beam")[0])
            continue
        for piece in bot.stream(line, search_type=search_type):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    exit_on_user_error(fire.Fire, {"train": train, "train_tokenizer": train_tokenizer,
                                   "evaluate": evaluate, "chat": chat})
