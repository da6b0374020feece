"""Conversations: a `messages` column of {role, content} turns, as the encoder inputs and targets
a T5 model trains on, through the chat template its tokenizer carries.

An encoder-decoder reads the history with its encoder and writes the answer with its decoder, so
each assistant turn of a conversation is a training row: the turns before it (rendered by the
template) are the encoder input, its content the target. `last_turn_only` keeps only the last.

The template (`CHAT_TEMPLATE`, saved in the tokenizer's `tokenizer_config.json`) renders one user
message as its content alone, so a single-turn `prompt` row and a one-message conversation give
the same encoder input as before conversations existed; a longer history is each turn's content
after a marker of its role (`<system>`, `<user>`, `<assistant>`), in order. The markers are
printable ASCII, which every tokenizer this project trains has in its alphabet, and punctuation
isolates them from the text around them. `tokenizer.apply_chat_template(messages,
tokenize=False)` on a history ending with a user turn is exactly the encoder input: training
renders with the same call.

A history longer than `max_seq_len` tokens keeps the system message and the latest turns,
dropping whole old turns (a user turn with its answer) first; the counts of such histories are
reported. A conversation that is malformed (no assistant turn, an assistant turn before any user
turn, a role other than system, user or assistant, a system turn after the first, an empty
content, two turns of the same speaker in a row) gives no row: it is skipped and counted like an
empty row.
"""
import numpy as np
import pyarrow as pa

from utils.errors import UserError
from utils.files import MESSAGES
from utils.tokenizer import CHAT_TEMPLATE  # noqa: F401 (the template, named here for the stream and the tests)

ROLES = ("system", "user", "assistant")


def problem(messages) -> str | None:
    """Why `messages` is not a conversation to train on, or None."""
    if not isinstance(messages, (list, tuple)) or not messages:
        return "no turns"
    previous = None
    for i, turn in enumerate(messages):
        role, content = (turn.get("role"), turn.get("content")) if isinstance(turn, dict) else (None, None)
        if role not in ROLES:
            return f"turn {i} has role {role!r}"
        if not isinstance(content, str) or not content.strip():
            return f"turn {i} is empty"
        if role == "system" and i:
            return f"turn {i} is a system turn after the first"
        if role == "assistant" and previous != "user":
            return f"turn {i} is an assistant turn not after a user turn"
        if role == "user" and previous == "user":
            return f"turn {i} follows another user turn"
        previous = role
    return None


def render(tokenizer, messages: list[dict]) -> str:
    """The encoder input of a history (ending with a user turn): the tokenizer's chat template."""
    return tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                         tokenize=False)


def fit(tokenizer, history: list[dict], max_tokens: int) -> tuple[str, int]:
    """The rendered `history`, without its oldest turns (after a system message) while it is
    longer than `max_tokens` tokens ([EOS] counted), and how many turns were dropped. The last
    user turn always stays (the tokenizer then cuts its end, as for any long prompt)."""
    system = history[:1] if history[0]["role"] == "system" else []
    turns = history[len(system):]
    text = render(tokenizer, history)
    while len(turns) > 1 and len(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]) > max_tokens:
        turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]
        text = render(tokenizer, system + turns)
    return text, len(history) - len(system) - len(turns)


MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def targets(objective) -> tuple[str, ...]:
    """What an objective's rows hold besides the prompt: response, or DPO's chosen and rejected."""
    return tuple(c for c in objective.columns if c != "prompt")


def file_targets(objective) -> tuple[str, ...]:
    """The columns a file of conversations needs besides `messages` (the response is in it)."""
    return tuple(c for c in targets(objective) if c != "response")


def check_column(pf, path: str) -> None:
    """`messages` is a list of {role, content} string structs, or one error line."""
    kind = pf.schema_arrow.field(MESSAGES).type
    ok = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type) and all(
        name in [f.name for f in kind.value_type] and
        (pa.types.is_string(kind.value_type.field(name).type) or pa.types.is_large_string(kind.value_type.field(name).type))
        for name in ("role", "content"))
    if not ok:
        raise UserError(f"column messages of {path} is {kind}; it must be a list of {{role, content}} string structs "
                        "(the format of the HF chat datasets)")


def as_conversations(table: pa.Table, objective) -> pa.Table:
    """A prompt/response table (or DPO's prompt/chosen/rejected) as conversations: the prompt a
    user turn, the response an assistant turn; other columns kept. The prompt is rendered back
    as itself: a one-message history is its content."""
    prompts = table.column("prompt").to_pylist()
    if "response" in objective.columns:
        responses = table.column("response").to_pylist()
        messages = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                    for p, r in zip(prompts, responses)]
    else:
        messages = [[{"role": "user", "content": p}] for p in prompts]
    kept = [c for c in table.column_names if c not in ("prompt", "response")]
    return pa.table({MESSAGES: pa.array(messages, MESSAGE_TYPE), **{c: table.column(c) for c in kept}})


def has_conversations(names) -> bool:
    """Whether a file with these columns holds conversations (a `messages` column, no `prompt`)."""
    return MESSAGES in names and "prompt" not in names


def expand(tokenizer, texts: dict, rows: np.ndarray, targets: tuple[str, ...], max_tokens: int,
           last_turn_only: bool = False) -> tuple[dict, np.ndarray, int]:
    """Conversations ({"messages": [...], other columns: [...]}) as rows of the objective's
    columns, their row numbers (repeated per row made), and how many histories were cut.

    With a `response` target, each assistant turn of a conversation is a row (prompt = the
    history before it; the last only with `last_turn_only`). Otherwise (DPO's chosen and
    rejected) the conversation is the history the other columns answer: one row, prompt = all
    its turns, which must end with a user turn. A malformed conversation is one row with an empty
    prompt, which the objective skips and counts. Without a tokenizer (a check before one exists)
    a good history's prompt is a placeholder."""
    out = {c: [] for c in ("prompt", *targets)}
    keep = [c for c in texts if c not in (MESSAGES, "prompt", *targets)]
    out.update({c: [] for c in keep})
    index, cut = [], 0
    per_turn = "response" in targets

    def add(i, prompt, **values):
        out["prompt"].append(prompt)
        for c in targets:
            out[c].append(values.get(c, texts[c][i] if c in texts else None))
        for c in keep:
            out[c].append(texts[c][i])
        index.append(i)

    for i, messages in enumerate(texts[MESSAGES]):
        messages = [dict(m) for m in messages] if isinstance(messages, (list, tuple)) else messages
        if problem(messages) is not None:
            add(i, "")
            continue
        if per_turn:
            answers = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
            if not answers:
                add(i, "")
                continue
            for j in answers[-1:] if last_turn_only else answers:
                prompt, dropped = fit(tokenizer, messages[:j], max_tokens) if tokenizer is not None else ("-", 0)
                cut += dropped > 0
                add(i, prompt, response=messages[j]["content"])
        else:
            if messages[-1]["role"] != "user":
                add(i, "")
                continue
            prompt, dropped = fit(tokenizer, messages, max_tokens) if tokenizer is not None else ("-", 0)
            cut += dropped > 0
            add(i, prompt)
    return out, rows[np.asarray(index, dtype=np.int64)] if len(rows) else rows, cut
