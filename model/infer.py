"""Load a trained model directory and answer prompts, in batches or streamed token by token."""
import os
import threading
from collections.abc import Iterator

import torch
from safetensors import SafetensorError
from transformers import TextIteratorStreamer

from model.chat_model import SEARCH_TYPES, TextToTextModel
from utils.errors import UserError
from utils.files import describe_error
from utils.tokenizer import load_tokenizer


def check_model_dir(model_dir: str) -> None:
    """A directory written by `train`: config, safetensors weights and a tokenizer."""
    if not os.path.isdir(model_dir):
        raise UserError(f"no trained model in {model_dir}; train one first or pass --model_dir=DIR "
                        "(e.g. model_save/best)")
    for name, what in (("config.json", "config.json"), ("model.safetensors", "weights (model.safetensors)"),
                       ("tokenizer.json", "tokenizer (tokenizer.json)")):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise UserError(f"{model_dir} has no {what}; pass --model_dir= a directory written by `train` "
                            "(best/ or final/)")


class ChatBot:
    """Answers prompts with a directory written by `train` (or any T5 saved with its tokenizer)."""

    def __init__(self, model_dir: str, device: str | None = None):
        check_model_dir(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(model_dir)
        try:
            self.model = TextToTextModel.from_pretrained(model_dir).to(self.device).eval()
        except (OSError, ValueError, SafetensorError, RuntimeError) as err:
            raise UserError(f"cannot load the model in {model_dir} ({describe_error(err)}); "
                            "pass --model_dir= an intact directory written by `train`") from None
        self.max_new_tokens = self.model.generation_config.max_new_tokens or 256

    def encode(self, prompts: list[str]) -> dict:
        # The tokenizer appends [EOS]: the same encoder input as in training.
        return self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_new_tokens,
                              return_tensors="pt", return_token_type_ids=False).to(self.device)

    def answer(self, prompts: str | list[str], search_type: str = "greedy", batch_size: int = 32,
               max_new_tokens: int | None = None) -> list[str]:
        """Answers to `prompts`, in order."""
        check_search_type(search_type)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        answers = []
        for i in range(0, len(prompts), batch_size):
            inputs = self.encode(prompts[i:i + batch_size])
            out = self.model.my_generate(inputs["input_ids"], inputs["attention_mask"],
                                         max_seq_len=max_new_tokens or self.max_new_tokens, search_type=search_type)
            answers += self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return answers

    def stream(self, prompt: str, search_type: str = "greedy", max_new_tokens: int | None = None) -> Iterator[str]:
        """Yield the answer to `prompt` piece by piece as it is generated."""
        check_search_type(search_type)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=False, skip_special_tokens=True)
        inputs = self.encode([prompt])
        worker = threading.Thread(target=self.model.my_generate, kwargs=dict(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            max_seq_len=max_new_tokens or self.max_new_tokens, search_type=search_type, streamer=streamer))
        worker.start()
        yield from streamer
        worker.join()


def check_search_type(search_type: str) -> None:
    if search_type not in SEARCH_TYPES:
        raise UserError(f"search_type must be one of {sorted(SEARCH_TYPES)}, got {search_type!r}")
