"""Load a trained model directory and answer prompts, in batches or streamed token by token."""
import os
import threading
from collections.abc import Iterator

import torch
from transformers import AutoTokenizer, TextIteratorStreamer

from model.chat_model import TextToTextModel
from utils.errors import UserError


class ChatBot:
    """Answers prompts with a directory written by `train` (or any T5 saved with its tokenizer)."""

    def __init__(self, model_dir: str, device: str | None = None):
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise UserError(f"no trained model in {model_dir}; train one first or pass --model_dir=DIR "
                            "(e.g. model_save/best)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = TextToTextModel.from_pretrained(model_dir).to(self.device).eval()
        self.max_new_tokens = self.model.generation_config.max_new_tokens or 256

    def encode(self, prompts: list[str]) -> dict:
        # The tokenizer appends [EOS]: the same encoder input as in training.
        return self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_new_tokens,
                              return_tensors="pt", return_token_type_ids=False).to(self.device)

    def answer(self, prompts: str | list[str], search_type: str = "greedy", batch_size: int = 32,
               max_new_tokens: int | None = None) -> list[str]:
        """Answers to `prompts`, in order."""
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
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=False, skip_special_tokens=True)
        inputs = self.encode([prompt])
        worker = threading.Thread(target=self.model.my_generate, kwargs=dict(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            max_seq_len=max_new_tokens or self.max_new_tokens, search_type=search_type, streamer=streamer))
        worker.start()
        yield from streamer
        worker.join()
