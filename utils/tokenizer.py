"""Train the project's tokenizer: BPE from the `tokenizers` library, saved as a PreTrainedTokenizerFast.

Special tokens: [PAD]=0 (also T5's decoder start token), [EOS]=1, [UNK]=2. The tokenizer
appends [EOS] to every text itself, so `tokenizer(prompt)` is exactly the encoder input the
model was trained on; its chat template (model/conversations.py, in tokenizer_config.json)
renders a conversation's history as that text: `apply_chat_template(messages, tokenize=False)`.
"""
import os

import numpy as np

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from utils.errors import UserError
from utils.files import MESSAGES, TEXT_COLUMNS, atomic_dir, expand_files, open_parquet

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"
# How a conversation's history is the encoder's input (model/conversations.py): one user message
# is its content alone, as a single-turn prompt always was; a longer history is each turn after a
# marker of its role. Saved in tokenizer_config.json, so every tool that applies chat templates
# renders exactly what the model was trained on.
CHAT_TEMPLATE = (
    "{%- if messages | length == 1 and messages[0]['role'] == 'user' -%}"
    "{{ messages[0]['content'] }}"
    "{%- else -%}"
    "{%- for message in messages -%}<{{ message['role'] }}>{{ message['content'] }}{%- endfor -%}"
    "{%- endif -%}")

SPECIAL_TOKENS = [PAD, EOS, UNK]
# Always in the vocabulary, however rare in the corpus: the space marker and printable ASCII.
ASCII_ALPHABET = ["▁"] + [chr(c) for c in range(33, 127)]


def iter_corpus(files: list[str], max_rows: int, seed: int = 0):
    """Yield the texts of about `max_rows` rows sampled evenly from parquet and text files.

    Parquet is read one row group at a time and each row kept with a fixed probability, so
    a 10 GB corpus costs a row group of memory, not the file.
    """
    parquet = {f: open_parquet(f, columns=()) for f in files if f.endswith(".parquet")}
    text = [f for f in files if not f.endswith(".parquet")]
    total = sum(pf.metadata.num_rows for pf in parquet.values()) + sum(_count_lines(f) for f in text)
    keep = min(1.0, max_rows / max(total, 1))
    rng = np.random.default_rng(seed)
    for path, pf in parquet.items():
        columns = [c for c in (*TEXT_COLUMNS, MESSAGES) if c in pf.schema_arrow.names]
        if not columns:
            raise UserError(f"{path} has no prompt/response or messages column (found {pf.schema_arrow.names})")
        for batch in pf.iter_batches(batch_size=8192, columns=columns):
            chosen = np.flatnonzero(rng.random(batch.num_rows) < keep)
            for name, column in zip(batch.column_names, batch.columns):
                for value in column.take(chosen).to_pylist():
                    if name != MESSAGES:
                        if value:
                            yield value
                    elif isinstance(value, list):  # a conversation: its turns as the template renders them
                        yield "".join(f"<{m.get('role')}>{m.get('content') or ''}" for m in value if isinstance(m, dict))
    for path in text:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip() and rng.random() < keep:
                    yield line.rstrip("\n")


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def train_tokenizer(files: str | list[str], output_dir: str, vocab_size: int = 29298,
                    max_rows: int = 1_000_000, model_max_length: int = 256,
                    seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on the prompt/response texts of `files` and save it to `output_dir`."""
    files = expand_files(files)
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # Digits are split one by one (numbers stay learnable); spaces become ▁ so decoding keeps
    # them; punctuation stands alone. Chinese has no spaces: BPE merges characters into words.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        # A Chinese corpus holds tens of thousands of rare characters: keep the most
        # frequent ones as the alphabet and let the rest fall to [UNK].
        limit_alphabet=vocab_size // 2 + len(ASCII_ALPHABET), initial_alphabet=ASCII_ALPHABET,
        show_progress=False)
    tokenizer.train_from_iterator(iter_corpus(files, max_rows, seed), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, tokenizer.token_to_id(EOS))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    assert fast.pad_token_id == 0 and fast.eos_token_id == 1, "special token ids moved"
    save_tokenizer(fast, output_dir)
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, output_dir: str) -> None:
    with atomic_dir(output_dir) as tmp:
        tokenizer.save_pretrained(tmp)


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory and check the special tokens the model relies on."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise UserError(f"no tokenizer in {path}; train one with `python train.py train_tokenizer` "
                        "or point --tokenizer_dir at a tokenizer directory")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 (tokenizers raises a plain Exception for a bad tokenizer.json)
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"the tokenizer in {path} cannot be loaded ({reason}); retrain it with "
                        "`python train.py train_tokenizer` or point at an intact tokenizer directory") from None
    if tokenizer.pad_token_id != 0 or tokenizer.eos_token_id != 1:
        raise UserError(f"tokenizer in {path} must have [PAD]=0 and [EOS]=1 "
                        f"(has pad={tokenizer.pad_token_id}, eos={tokenizer.eos_token_id}); retrain it")
    return tokenizer
