"""chatlm command line: train a tokenizer and a T5 chat model, evaluate it, chat with it.

    python train.py train --config=data/demo.yaml                # the CPU demo
    accelerate launch ./train.py train --train_file=data/my_train.parquet --model_size=small
    accelerate launch ./train.py train --is_finetune=True --finetune_from_ckp_file=model_save/best \\
        --train_file=data/sft_train.parquet
    accelerate launch ./train.py train --is_keep_training=True   # resume where it stopped
    python train.py train_tokenizer --files=data/my_train.parquet --output_dir=model_save/tokenizer
    python train.py evaluate --model_dir=model_save/best --test_file=data/demo_test.parquet
    python train.py chat --model_dir=model_save/best [--prompt=...]
    python train.py make_dpo_pairs --model_dir=model_save/best --input=sft.parquet --output=pairs.parquet
    python train.py serve --model_dir=model_save/best [--host=127.0.0.1 --port=8000 --api_key=KEY]
    python train.py plot --output_dir=model_save/demo         # plots/training.png from metrics.jsonl
    python train.py COMMAND --help                               # the command's flags

Every TrainConfig field (config.py) is a flag of `train`; --config=FILE.yaml comes first, flags win.
Every command checks its flags before it does anything.
"""
import os

from config import TrainConfig, load_config
from utils.cli import dataclass_flags, run_cli, takes_flags
from utils.errors import UserError


@takes_flags(dataclass_flags(TrainConfig))
def train(config: str | None = None, **flags):
    """Pre-train (default), finetune (--is_finetune=True) or resume (--is_keep_training=True).

    Args:
        config: a YAML file of settings, applied before the flags.
    """
    from model.trainer import ChatTrainer
    cfg = load_config(config, **flags)
    ChatTrainer(cfg).train()


def train_tokenizer(files: str | list[str], output_dir: str = TrainConfig.tokenizer_dir,
                    vocab_size: int = TrainConfig.vocab_size, max_rows: int = 1_000_000,
                    max_seq_len: int = TrainConfig.max_seq_len):
    """Train a BPE tokenizer on the prompt/response columns of parquet files (or lines of text files).

    Args:
        files: parquet or text files: a path, a glob or a list.
        output_dir: where the tokenizer is saved (replaced whole, only once training succeeded).
        vocab_size: tokens in the vocabulary, special tokens included.
        max_rows: about this many rows are sampled, so a corpus of any size fits in memory.
        max_seq_len: the tokenizer's model_max_length.
    """
    from utils.files import TEXT_COLUMNS, expand_files, has_usable_row, open_parquet, probe_writable
    from utils.tokenizer import train_tokenizer as train_bpe
    if vocab_size < 16 or max_rows <= 0 or max_seq_len <= 0:
        raise UserError("--vocab_size must be >= 16, --max_rows and --max_seq_len > 0")
    paths = expand_files(files)
    for path in paths:
        if not path.endswith(".parquet"):
            continue
        pf = open_parquet(path, columns=())
        present = [c for c in TEXT_COLUMNS if c in pf.schema_arrow.names]
        if not present:
            raise UserError(f"{path} has no prompt or response column (found: {', '.join(pf.schema_arrow.names)})")
        if not any(has_usable_row(pf, (c,)) for c in present):
            raise UserError(f"{path} has no text to train a tokenizer on (every {' and '.join(present)} is empty)")
    probe_writable(output_dir, "output_dir")
    tokenizer = train_bpe(paths, output_dir, vocab_size, max_rows, model_max_length=max_seq_len)
    print(f"tokenizer with {len(tokenizer)} tokens saved to {output_dir}")


def evaluate(model_dir: str, test_file: str, max_rows: int = 10**9, batch_size: int = 64, samples: int = 5):
    """BLEU-4, loss and exact match (per `task` column, if any) of a trained model on a parquet file.

    Args:
        model_dir: a model directory written by `train` (best/ or final/).
        test_file: parquet with string columns prompt and response (and optionally task).
        max_rows: score at most this many rows.
        batch_size: rows per generation batch.
        samples: sample answers printed at the end.
    """
    if max_rows <= 0 or batch_size <= 0 or samples < 0:
        raise UserError("--max_rows and --batch_size must be > 0, --samples >= 0")
    from accelerate import Accelerator

    from model.evaluation import score_file
    from model.infer import ChatBot
    from model.run import Run
    from utils.files import check_data_file
    from utils.logging import get_logger
    check_data_file(test_file, what="test_file")
    bot = ChatBot(model_dir)
    accelerator = Accelerator()
    model = accelerator.prepare(bot.model)
    score_file(model, Run(accelerator), bot.tokenizer, test_file, batch_size, bot.max_new_tokens,
               get_logger(main_process=accelerator.is_main_process), max_rows, samples)


def chat(model_dir: str = "./model_save/best", prompt: str | None = None, search_type: str = "greedy"):
    """Chat in the terminal (streamed answers), the conversation kept (/new starts over); with
    --prompt, answer once and exit.

    Args:
        model_dir: a model directory written by `train` (best/ or final/).
        prompt: answer this one prompt and exit.
        search_type: greedy, beam or sampling.
    """
    from model.chat_model import SEARCH_TYPES
    from model.infer import ChatBot
    if search_type not in SEARCH_TYPES:
        raise UserError(f"--search_type={search_type!r} is not one of {list(SEARCH_TYPES)}")
    bot = ChatBot(model_dir)
    if prompt is not None:
        print(bot.answer(str(prompt), search_type=search_type)[0])
        return
    if bot.has_template:
        print("chatlm: type a message; /new starts a new conversation; an empty line or Ctrl+D quits "
              "(the oldest turns are dropped when the conversation is longer than the model reads)")
    else:
        print("chatlm: this model has no chat template (saved before conversations): each prompt is answered "
              "alone; an empty line or Ctrl+D quits")
    history = []
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            break
        if line == "/new":
            history = []
            print("(a new conversation)")
            continue
        history.append({"role": "user", "content": line})
        asked = history if bot.has_template else line
        if search_type == "beam":  # beam search knows its answer only at the end: no streaming
            answer = bot.answer([asked], search_type="beam")[0]
            print(answer)
        else:
            pieces = []
            for piece in bot.stream(asked, search_type=search_type):
                pieces.append(piece)
                print(piece, end="", flush=True)
            print()
            answer = "".join(pieces)
        history.append({"role": "assistant", "content": answer})


def make_dpo_pairs(model_dir: str, input: str, output: str, batch_size: int = 32,  # noqa: A002 (flag name)
                   max_rows: int = 10**12, search_type: str = "greedy", overwrite: bool = False):
    """Write DPO pairs (prompt, chosen, rejected) from a model's own answers to prompt/response rows.

    chosen is the file's response, rejected what the model answers; rows where the two are
    equal are dropped. Other columns (a task) are kept. The output is written whole or not at all.

    Args:
        model_dir: the model whose answers become the rejected texts (e.g. model_save/demo/best).
        input: parquet with string columns prompt and response.
        output: parquet file to write, never the input.
        batch_size: prompts generated together.
        max_rows: read at most this many rows.
        search_type: greedy, beam or sampling.
        overwrite: replace an existing --output file.
    """
    from model.chat_model import SEARCH_TYPES
    from model.infer import ChatBot, make_dpo_pairs as make_pairs
    from utils.files import check_data_file, probe_writable, refuse_to_replace
    if batch_size <= 0 or max_rows <= 0:
        raise UserError("--batch_size and --max_rows must be > 0")
    if search_type not in SEARCH_TYPES:
        raise UserError(f"--search_type={search_type!r} is not one of {list(SEARCH_TYPES)}")
    if os.path.abspath(output) == os.path.abspath(input):
        raise UserError(f"--output {output} is the input; write the pairs to a new file")
    check_data_file(input, ("prompt", "response"), what="input")
    refuse_to_replace(output, "output", overwrite)
    probe_writable(os.path.dirname(os.path.abspath(output)), "output")
    bot = ChatBot(model_dir)
    counts = make_pairs(bot, input, output, batch_size, max_rows, search_type, log=lambda _: None)
    print(f"{counts['read']:,} rows read: {counts['kept']:,} pairs written to {output}, "
          f"{counts['same_as_reference']:,} dropped (the model's answer equals the response), "
          f"{counts['empty']:,} empty rows skipped")


def serve(model_dir: str = "./model_save/best", host: str = "127.0.0.1", port: int = 8000, api_key: str = "",
          allow_remote_without_key: bool = False, model_name: str = "", allowed_hosts: str = "",
          allowed_origins: str = "", max_batch_size: int = 16, max_queue: int = 64, max_body_bytes: int = 64 * 1024,
          max_prompt_tokens: int = 0, max_tokens: int = 1024, max_stops: int = 4, max_stop_chars: int = 64,
          timeout_s: float = 300.0, max_connections: int = 256, header_timeout_s: float = 10.0,
          body_timeout_s: float = 30.0, keepalive_s: float = 15.0, drain_timeout_s: float = 30.0, device: str = ""):
    """Serve a model over HTTP: OpenAI's /v1/chat/completions and /v1/completions (streaming too),
    /api/chat, a web chat at /, /metrics for Prometheus.

    Args:
        model_dir: a model directory written by `train` (best/ or final/).
        host: the address to listen on; anything but localhost needs an API key.
        port: the TCP port.
        api_key: clients must send 'Authorization: Bearer KEY'; default: $CHATLM_API_KEY, else no key.
        allow_remote_without_key: listen on a non-local --host without a key, on purpose.
        model_name: the model's id in the API; default: the last two parts of model_dir (demo/best).
        allowed_hosts: host names the Host header may name besides --host, localhost and 127.0.0.1 (a,b; '*': any).
        allowed_origins: web origins whose pages may call the API from a browser (CORS), e.g. http://localhost:3000.
        max_batch_size: rows decoded together; new requests join at the next step.
        max_queue: requests waiting beyond those; more in flight are answered 429.
        max_body_bytes: the largest request body (413 beyond).
        max_prompt_tokens: the longest prompt in tokens (400 beyond); 0: the tokenizer's model_max_length.
        max_tokens: the most tokens a request may ask to generate (400 beyond).
        max_stops: stop strings per request.
        max_stop_chars: characters per stop string.
        timeout_s: seconds a request may wait and generate in all (504 beyond).
        max_connections: open connections and requests at once (503 beyond).
        header_timeout_s: seconds a client may take to send a request's headers (the connection is closed beyond).
        body_timeout_s: seconds a client may take to send a request's body (408 beyond).
        keepalive_s: a stream that waits sends an SSE comment this often, so proxies keep it open.
        drain_timeout_s: on SIGTERM or Ctrl+C, seconds the requests in flight may take to finish.
        device: cpu, cuda, cuda:1, ...; default: cuda when there is one.
    """
    from serve.options import start
    start(model_dir, host, port, api_key, allow_remote_without_key, model_name, max_batch_size, max_queue,
          max_body_bytes, max_prompt_tokens, max_tokens, timeout_s, device, allowed_hosts, allowed_origins,
          max_connections, header_timeout_s, body_timeout_s, drain_timeout_s, keepalive_s, max_stops, max_stop_chars)


def export(model_dir: str = "./model_save/best", format: str = "onnx", output_dir: str = "",  # noqa: A002 (flag name)
           overwrite: bool = False):
    """Export a trained model for other runtimes: ONNX (encoder, decoder, decoder with past key values;
    the tokenizer and configs beside them), checked against the model before it is kept.

    Args:
        model_dir: a model directory written by `train` (best/ or final/).
        format: onnx.
        output_dir: the directory to write; default: MODEL_DIR/../onnx.
        overwrite: replace an existing output_dir.
    """
    from model.export import FORMATS, export as export_model
    from model.infer import check_model_dir
    if format not in FORMATS:
        raise UserError(f"--format={format!r} is not one of {list(FORMATS)}")
    check_model_dir(model_dir)
    export_model(model_dir, output_dir or os.path.join(os.path.dirname(os.path.abspath(model_dir)), "onnx"),
                 overwrite)


def plot(output_dir: str = TrainConfig.output_dir, metric: str = ""):
    """Draw output_dir/plots/training.png from output_dir/metrics.jsonl, also while the run is going.

    Args:
        output_dir: the output_dir of a run (finished, stopped or going).
        metric: the validation metric of the third panel; default: the run's best_metric.
    """
    from utils.plots import check_plottable, plot_training
    check_plottable(output_dir, metric or None)
    print(f"plot written to {plot_training(output_dir, metric or None)}")


COMMANDS = {"train": train, "train_tokenizer": train_tokenizer, "evaluate": evaluate, "chat": chat,
            "make_dpo_pairs": make_dpo_pairs, "serve": serve, "export": export, "plot": plot}

if __name__ == "__main__":
    run_cli(COMMANDS, "train.py")
