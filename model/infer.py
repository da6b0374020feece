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
from utils.logging import quiet_libraries
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
        quiet_libraries()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(model_dir)
        try:
            self.model = TextToTextModel.from_pretrained(model_dir).to(self.device).eval()
        except (OSError, ValueError, SafetensorError, RuntimeError) as err:
            raise UserError(f"cannot load the model in {model_dir} ({describe_error(err)}); "
                            "pass --model_dir= an intact directory written by `train`") from None
        self.max_new_tokens = self.model.generation_config.max_new_tokens or 256
        # Prompts are cut where training cut them (the tokenizer keeps the run's max_seq_len).
        limit = self.tokenizer.model_max_length
        self.max_prompt_tokens = limit if 0 < limit < 1_000_000 else 512

    @property
    def has_template(self) -> bool:
        """Whether the model was saved with a chat template (models trained before conversations were not)."""
        return bool(self.tokenizer.chat_template)

    def prompt_text(self, prompt: str | list[dict]) -> str:
        """The encoder input of a prompt, or of a conversation's history (a list of {role, content}
        turns ending with a user turn) through the chat template, its oldest turns dropped while it
        is longer than max_prompt_tokens. Without a template, a history's last user turn alone."""
        if isinstance(prompt, str):
            return prompt
        from model.conversations import fit
        if not self.has_template:
            return next(m["content"] for m in reversed(prompt) if m["role"] == "user")
        return fit(self.tokenizer, prompt, self.max_prompt_tokens)[0]

    def encode(self, prompts: list[str | list[dict]]) -> dict:
        # The tokenizer appends [EOS]: the same encoder input as in training.
        return self.tokenizer([self.prompt_text(p) for p in prompts], padding=True, truncation=True,
                              max_length=self.max_prompt_tokens, return_tensors="pt",
                              return_token_type_ids=False).to(self.device)

    def answer(self, prompts: str | list[str] | list[list[dict]], search_type: str = "greedy", batch_size: int = 32,
               max_new_tokens: int | None = None) -> list[str]:
        """Answers to `prompts` (texts, or conversations' histories: lists of {role, content} turns), in order."""
        check_search_type(search_type)
        prompts = [prompts] if isinstance(prompts, str) or prompts and isinstance(prompts[0], dict) else list(prompts)
        answers = []
        for i in range(0, len(prompts), batch_size):
            inputs = self.encode(prompts[i:i + batch_size])
            out = self.model.my_generate(inputs["input_ids"], inputs["attention_mask"],
                                         max_seq_len=max_new_tokens or self.max_new_tokens, search_type=search_type)
            answers += self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return answers

    def stream(self, prompt: str | list[dict], search_type: str = "greedy",
               max_new_tokens: int | None = None) -> Iterator[str]:
        """Yield the answer to `prompt` (a text or a conversation's history) piece by piece as it is generated."""
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


def make_dpo_pairs(bot: ChatBot, input_path: str, output: str, batch_size: int = 32, max_rows: int = 10**12,
                   search_type: str = "greedy", log=print) -> dict:
    """Preference pairs from a model's own answers (the original's recipe): chosen = the
    reference `response`, rejected = what the model says. Rows where both are equal teach
    nothing and are dropped; other columns (a `task`) are carried along.

    Streams `input_path` batch by batch and writes `output` atomically (a temporary file
    renamed when complete). Returns the counts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from model.dataset import non_empty
    from utils.files import check_data_file
    from utils.metrics import normalise
    pf = check_data_file(input_path, ("prompt", "response"), what="input")
    extra = [c for c in pf.schema_arrow.names if c not in ("prompt", "response")]
    schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())]
                       + [pf.schema_arrow.field(c) for c in extra])
    tmp = f"{output}.tmp-{os.getpid()}"
    counts = {"read": 0, "kept": 0, "same_as_reference": 0, "empty": 0}
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in pf.iter_batches(batch_size=max(batch_size, 1024)):
                batch = batch.slice(0, max(0, max_rows - counts["read"]))
                if batch.num_rows == 0:
                    break
                counts["read"] += batch.num_rows
                prompts, responses = batch.column("prompt").to_pylist(), batch.column("response").to_pylist()
                keep = non_empty(prompts, responses)
                counts["empty"] += int((~keep).sum())
                index = [i for i, k in enumerate(keep) if k]
                answers = bot.answer([prompts[i] for i in index], search_type=search_type, batch_size=batch_size)
                rows = [(i, a) for i, a in zip(index, answers) if normalise(a) != normalise(responses[i])]
                counts["same_as_reference"] += len(index) - len(rows)
                counts["kept"] += len(rows)
                if rows:
                    take = pa.array([i for i, _ in rows])
                    columns = {"prompt": batch.column("prompt").take(take), "chosen": batch.column("response").take(take),
                               "rejected": pa.array([a for _, a in rows], pa.string()),
                               **{c: batch.column(c).take(take) for c in extra}}
                    writer.write_table(pa.table(columns, schema=schema))
                log(f"{counts['read']:,} rows read, {counts['kept']:,} pairs kept")
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return counts
