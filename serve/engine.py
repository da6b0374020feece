"""Continuous batching for the server: requests join the decoding batch at the next step.

One worker thread owns the model. At each step it admits the requests waiting (in arrival order,
up to `max_batch_size` rows in all): their encoder pass and first decoder step run together,
apart from the running rows, and their rows then join the running batch. Every running row gets
one token per step, with its own settings (temperature, top_p, top_k, repetition penalty, seed,
max_tokens, min_tokens, stop strings); a row leaves the batch as soon as it is finished or its
client has gone. So a short request's wait does not depend on the longest answer in flight.

How rows of different ages share one decoder call: T5's decoder attends to its own past with a
relative position bias. The self-attention caches are kept right-aligned (a row that joined
later has masked slots on the left), so the query is always in the last slot and every row's
relative distances are the same: one bias for the batch, a padding mask per row. The encoder
states and the cross-attention caches of rows with longer prompts are padded with masked slots.
Slots that every row masks are cut off as rows leave.

The decode loop is ours, not `model.generate` or a serving library's: `generate` takes one set of
sampling settings and one streamer for the whole batch and cannot add or drop a row; vLLM and
TGI batch decoder-only models continuously but not T5. Greedy decoding here gives the same
tokens as `generate` (tested against `ChatBot.answer`). The next tokens of all rows are chosen in
one set of tensor operations: sampling draws each row's uniform number from a counter-based
hash of its seed and step, so a seeded request samples the same text in any batch. Text is
decoded incrementally (a few tokens at a time, as vLLM does), and stop strings are matched by
one automaton per stop (Knuth-Morris-Pratt) fed only the new characters: a token costs the same
however long the answer or the stop strings.
"""
import dataclasses
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from model.chat_model import EOS_ID, PAD_ID


class QueueFull(Exception):
    """More requests are in flight than the server admits."""


class Stopped(Exception):
    """The engine is draining or stopped: it admits no new request."""


@dataclasses.dataclass
class Settings:
    """How one request is decoded (vLLM's names for what OpenAI's API lacks)."""
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already generated (as HF and vLLM)
    min_tokens: int = 0  # [EOS] is not chosen before this many tokens
    ignore_eos: bool = False  # [EOS] is never chosen: the answer runs to max_tokens or a stop string
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's, and the n most likely ones


class StopMatcher:
    """Finds the first of several stop strings in a text fed a few characters at a time, with one
    Knuth-Morris-Pratt automaton per stop: each character costs O(1) amortised per stop, whatever
    the text's length. `held` is how many trailing characters may still begin a stop."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.failure = [self._failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)

    @staticmethod
    def _failure(s: str) -> list[int]:
        fail, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail[i] = k
        return fail

    def feed(self, text: str) -> tuple[int, int] | None:
        """Feed `text`; when a stop is completed, the index in `text` just past it and its length."""
        for i, char in enumerate(text):
            for n, (stop, fail) in enumerate(zip(self.stops, self.failure)):
                k = self.state[n]
                while k and char != stop[k]:
                    k = fail[k - 1]
                if char == stop[k]:
                    k += 1
                if k == len(stop):
                    return i + 1, k
                self.state[n] = k
        return None

    @property
    def held(self) -> int:
        return max(self.state, default=0)


class Detokenizer:
    """Token ids to text incrementally: each new token decodes a window of a few tokens (vLLM's
    prefix/read offsets), and text is released only once it no longer ends in U+FFFD (a byte of
    a character the next token completes)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.tokens)
            return after[len(before):]
        return ""


@dataclasses.dataclass
class Job:
    """One request: its prompt ids, settings and where its text goes.

    `on_event(kind, payload)` is called from the worker thread: ("delta", text) as the answer
    grows (when `stream`), then ("done", job) once, or ("error", message) once. `logprobs` holds,
    per generated token when asked: (token id, its log-probability, [(id, log-probability)] of the
    most likely ones), under the model's own distribution (before temperature and filters).
    """
    prompt_ids: list[int]
    settings: Settings
    on_event: Callable[[str, object], None]
    stream: bool = True  # send ("delta", text) events as the answer grows
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # the answer so far, stop strings removed
    sent: int = 0  # characters of `text` already sent as deltas
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled", "error"
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    first_token_at: float | None = None
    logprobs: list = dataclasses.field(default_factory=list)
    on_cancel: Callable[["Job"], None] | None = None  # set by the engine: frees a waiting job's place at once

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.on_cancel is not None:
                self.on_cancel(self)


@dataclasses.dataclass
class Stats:
    """What the engine has done; shown by /health."""
    waiting: int = 0
    running: int = 0
    batches: int = 0  # admissions: groups of requests that joined the batch together
    steps: int = 0  # decoder steps
    largest_batch: int = 0  # the most rows decoded in one step
    answered: int = 0
    cancelled: int = 0
    tokens_generated: int = 0


class Observer:
    """What the engine reports as it works (the server's metrics); these defaults do nothing."""

    def step(self, rows: int, waiting: int) -> None:
        pass

    def first_token(self, job: Job, seconds: float) -> None:
        pass

    def tokens(self, count: int, seconds_per_token: float) -> None:
        pass


MASK64 = (1 << 64) - 1


def uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B,) numbers in [0, 1) from (seed, step) pairs, (B,) int64 each: splitmix64 of their mix, on
    int64 tensors (wrapping products are the same bits as unsigned ones; the right shifts are
    masked to act as unsigned)."""
    def shift(x, n):
        return (x >> n) & ((1 << (64 - n)) - 1)
    golden = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
    x = seeds * golden + (steps + 1) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = (x ^ shift(x, 30)) * -4658895280553007687
    x = (x ^ shift(x, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    x = x ^ shift(x, 31)
    return shift(x, 11).double() * 2.0 ** -53


def choose(logits: torch.Tensor, rows: "Running") -> torch.Tensor:
    """The next token of every row, from (B, V) logits and the rows' settings as tensors:
    repetition penalty, [EOS] held back, then greedy (temperature 0) or sampling with
    temperature, top-k and top-p, by the inverse of each row's distribution at its own uniform
    number."""
    x = logits.float().clone()  # the logits stay as they are for the log-probabilities
    if rows.seen is not None:
        p = rows.penalty[:, None]
        x = torch.where(rows.seen, torch.where(x > 0, x / p, x * p), x)
    no_eos = rows.ignore_eos | (rows.steps < rows.min_tokens)
    x[:, EOS_ID] = torch.where(no_eos, float("-inf"), x[:, EOS_ID])
    greedy = x.argmax(-1)
    if not rows.sampled:
        return greedy
    scaled = x / rows.temperature.clamp(min=1e-6)[:, None]
    if rows.largest_top_k:
        k = rows.top_k
        kth = scaled.topk(rows.largest_top_k, dim=-1).values.gather(1, (k.clamp(min=1) - 1)[:, None])
        scaled = torch.where((k[:, None] > 0) & (scaled < kth), float("-inf"), scaled)
    probs, order = scaled.softmax(-1).sort(-1, descending=True)
    # Keep the smallest set whose mass reaches top_p (the first token always).
    probs = torch.where(probs.cumsum(-1) - probs >= rows.top_p[:, None], 0.0, probs)
    cdf = probs.double().cumsum(-1)
    u = uniforms(rows.seeds, rows.steps) * cdf[:, -1]
    index = torch.searchsorted(cdf, u[:, None], right=True).clamp(max=probs.shape[-1] - 1)
    sampled = order.gather(1, index)[:, 0]
    return torch.where(rows.temperature > 0, sampled, greedy)


# Per-row settings kept as tensors (dtype), so choosing a step's tokens builds none.
ROW_SETTINGS = {"temperature": torch.float32, "top_p": torch.float32, "top_k": torch.long,
                "penalty": torch.float32, "min_tokens": torch.long, "ignore_eos": torch.bool}


class Running:
    """The rows being decoded: their jobs, encoder states, caches, masks and settings.

    `decoder_mask` (B, slots) covers the self-attention cache's slots and the slot of the token
    fed next (`last`); rows are right-aligned in it."""

    def __init__(self, jobs, encoded, encoder_mask, cache, decoder_mask, last, device, vocab, tokenizer):
        self.jobs, self.encoded, self.encoder_mask, self.cache = jobs, encoded, encoder_mask, cache
        self.decoder_mask, self.last, self.device, self.vocab = decoder_mask, last, device, vocab
        self.texts = [Detokenizer(tokenizer) for _ in jobs]
        self.matchers = [StopMatcher(j.settings.stop) for j in jobs]
        settings = [j.settings for j in jobs]
        values = {"temperature": [x.temperature for x in settings], "top_p": [x.top_p for x in settings],
                  "top_k": [x.top_k for x in settings], "penalty": [x.repetition_penalty for x in settings],
                  "min_tokens": [x.min_tokens for x in settings], "ignore_eos": [x.ignore_eos for x in settings]}
        for name, dtype in ROW_SETTINGS.items():
            setattr(self, name, torch.tensor(values[name], dtype=dtype, device=device))
        self.seeds = torch.tensor([x.seed if x.seed is not None else secrets.randbits(62) for x in settings],
                                  dtype=torch.long, device=device)
        self.steps = torch.zeros(len(jobs), dtype=torch.long, device=device)
        self.seen = torch.zeros(len(jobs), vocab, dtype=torch.bool, device=device) \
            if any(x.repetition_penalty != 1 for x in settings) else None
        self.flags()

    def flags(self) -> None:
        """What the rows' settings ask of `choose` (read on the host once, when the rows change)."""
        settings = [j.settings for j in self.jobs]
        self.sampled = any(x.temperature > 0 for x in settings)
        self.largest_top_k = max((x.top_k for x in settings), default=0)

    def __len__(self):
        return len(self.jobs)

    def per_row(self) -> list[str]:
        return [*ROW_SETTINGS, "seeds", "steps", "encoded", "encoder_mask", "decoder_mask", "last"]

    def select(self, keep: list[int]) -> None:
        """Keep the rows `keep`, then cut the slots every row masks."""
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        for name in self.per_row():
            setattr(self, name, getattr(self, name)[index])
        self.jobs = [self.jobs[r] for r in keep]
        self.texts, self.matchers = [self.texts[r] for r in keep], [self.matchers[r] for r in keep]
        if self.seen is not None:
            self.seen = self.seen[index]
        self.flags()
        self.trim()

    def trim(self) -> None:
        left = int(self.decoder_mask.any(0).int().argmax())  # the first slot a row uses
        if left:
            self.decoder_mask = self.decoder_mask[:, left:]
            for layer in self.cache.self_attention_cache.layers:
                layer.keys, layer.values = layer.keys[:, :, left:], layer.values[:, :, left:]
        used = int(self.encoder_mask.any(0).nonzero().max()) + 1  # the slots after the longest prompt
        if used < self.encoder_mask.shape[1]:
            self.encoded, self.encoder_mask = self.encoded[:, :used], self.encoder_mask[:, :used]
            for layer in self.cache.cross_attention_cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :used], layer.values[:, :, :used]

    def merge(self, other: "Running") -> None:
        """Add `other`'s rows after these: their past slots masked on the left, the shorter
        prompts' encoder slots masked on the right."""
        pad_left = self.decoder_mask.shape[1] - other.decoder_mask.shape[1]
        source = max(self.encoder_mask.shape[1], other.encoder_mask.shape[1])

        def right(t, n, dim):  # zeros appended along `dim` up to n
            extra = n - t.shape[dim]
            if not extra:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim)

        def left(t, n, dim):
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim) if n else t

        self_layers, cross_layers = [], []
        for a, b in zip(self.cache.self_attention_cache.layers, other.cache.self_attention_cache.layers):
            self_layers.append((torch.cat([a.keys, left(b.keys, pad_left, 2)]),
                                torch.cat([a.values, left(b.values, pad_left, 2)])))
        for a, b in zip(self.cache.cross_attention_cache.layers, other.cache.cross_attention_cache.layers):
            cross_layers.append((torch.cat([right(a.keys, source, 2), right(b.keys, source, 2)]),
                                 torch.cat([right(a.values, source, 2), right(b.values, source, 2)])))
        self.cache = EncoderDecoderCache(DynamicCache(self_layers), DynamicCache(cross_layers))
        self.encoded = torch.cat([right(self.encoded, source, 1), right(other.encoded, source, 1)])
        self.encoder_mask = torch.cat([right(self.encoder_mask, source, 1), right(other.encoder_mask, source, 1)])
        self.decoder_mask = torch.cat([self.decoder_mask, left(other.decoder_mask, pad_left, 1)])
        for name in [*ROW_SETTINGS, "seeds", "steps", "last"]:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        if self.seen is not None or other.seen is not None:
            def seen(rows):
                return rows.seen if rows.seen is not None else \
                    torch.zeros(len(rows), self.vocab, dtype=torch.bool, device=self.device)
            self.seen = torch.cat([seen(self), seen(other)])
        self.jobs += other.jobs
        self.texts += other.texts
        self.matchers += other.matchers
        self.flags()


class Engine:
    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 64, observer: Observer = None,
                 log=print):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        # Ids the tokenizer can decode; the embedding is padded beyond them (never chosen).
        self.vocab_size = len(tokenizer)
        self.log, self.observer = log, observer or Observer()
        self.stats = Stats()
        self.waiting: deque[Job] = deque()
        self.running: Running | None = None
        self._lock = threading.Condition()
        self._stopping = False
        self.error: str | None = None  # why the worker died
        self._worker = threading.Thread(target=self._run, name="chatlm-generate", daemon=True)

    def start(self) -> "Engine":
        self._worker.start()
        return self

    def alive(self) -> bool:
        return self._worker.is_alive() and self.error is None

    def stop(self) -> None:
        """Finish: cancel what is left, waiting or running, and end the worker."""
        with self._lock:
            self._stopping = True
            for job in list(self.waiting) + (list(self.running.jobs) if self.running is not None else []):
                job.cancelled.set()
            self._lock.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout=30)

    # ---- admission -------------------------------------------------------------------
    def in_flight(self) -> int:
        return self.stats.waiting + self.stats.running

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise QueueFull when `max_batch_size + max_queue` are in flight."""
        with self._lock:
            if self._stopping or not self.alive():
                raise Stopped
            if self.in_flight() >= self.max_batch_size + self.max_queue:
                raise QueueFull
            job.on_cancel = self._cancel_waiting
            self.waiting.append(job)
            self.stats.waiting += 1
            self._lock.notify_all()

    def _cancel_waiting(self, job: Job) -> None:
        """A job cancelled before it runs leaves the queue at once (its place is free now)."""
        with self._lock:
            if job in self.waiting:
                self.waiting.remove(job)
                self.stats.waiting -= 1
                self.stats.cancelled += 1
                job.finish_reason = "cancelled"

    def _release(self, job: Job) -> None:
        with self._lock:
            self.stats.running -= 1
            if job.finish_reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.answered += 1

    # ---- the worker --------------------------------------------------------------------
    def _run(self) -> None:
        new = []
        try:
            while True:
                with self._lock:
                    while not self.waiting and self.running is None and not self._stopping:
                        self._lock.wait()
                    if self._stopping and self.running is None:
                        return
                    room = self.max_batch_size - (len(self.running) if self.running else 0)
                    new = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
                    self.stats.waiting -= len(new)
                    self.stats.running += len(new)
                self.step(new)
        except Exception as err:  # noqa: BLE001 (a dead worker is reported by /health, and its jobs fail)
            self.error = f"{type(err).__name__}: {err}"
            self.log(f"generation failed, the worker stopped: {self.error}")
            with self._lock:
                jobs = new + list(self.waiting) + (self.running.jobs if self.running else [])
                self.waiting.clear()
            for job in jobs:
                if job.finish_reason is None:
                    job.finish_reason = "error"
                    job.on_event("error", "generation failed on the server; see its log")

    @torch.inference_mode()
    def step(self, new: list[Job]) -> None:
        """One decoder step of every row: the running ones, and `new` (their encoder pass first;
        they join with their first step)."""
        started = time.monotonic()
        new = [j for j in new if not self._dropped(j)]
        if new:
            joining = self.prefill(new)
            if self.running is None:
                self.running = joining
            else:
                self.running.merge(joining)
            with self._lock:
                self.stats.batches += 1
        rows = self.running
        decoded = len(rows) if rows is not None else 0
        if rows is not None:
            logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=rows.encoded),
                                attention_mask=rows.encoder_mask, decoder_input_ids=rows.last,
                                decoder_attention_mask=rows.decoder_mask, cache=rows.cache,
                                use_cache=True).logits[:, -1, :self.vocab_size]
            self.advance(rows, logits, started)
        with self._lock:
            self.stats.steps += 1
            self.stats.largest_batch = max(self.stats.largest_batch, decoded)
        self.observer.step(decoded, self.stats.waiting)

    def _dropped(self, job: Job) -> bool:
        if job.cancelled.is_set():
            job.finish_reason = "cancelled"
            self._release(job)
            return True
        return False

    def prefill(self, jobs: list[Job]) -> Running:
        """The rows of `jobs` before their first decoder step: their encoder pass, and the keys and
        values their cross-attention reads at every step (no self-attention slot yet).

        The cross keys and values are computed here, with the layers' own projections, as T5's
        attention computes them at a first step (`k(encoder states)` in (B, heads, S, d_kv)), so
        that the new rows take their first step in the same decoder call as the running ones."""
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, :len(job.prompt_ids)] = torch.tensor(job.prompt_ids)
            mask[row, :len(job.prompt_ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        encoded = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        self_layers, cross_layers = [], []
        for block in self.model.get_decoder().block:
            attention = block.layer[1].EncDecAttention
            shape = (len(jobs), -1, attention.n_heads, attention.key_value_proj_dim)
            keys = attention.k(encoded).view(shape).transpose(1, 2)
            values = attention.v(encoded).view(shape).transpose(1, 2)
            cross_layers.append((keys, values))
            self_layers.append((keys[:, :, :0], values[:, :, :0]))
        cache = EncoderDecoderCache(DynamicCache(self_layers), DynamicCache(cross_layers))
        last = torch.full((len(jobs), 1), PAD_ID, dtype=torch.long, device=self.device)  # T5 starts from pad
        return Running(jobs, encoded, mask, cache, torch.ones((len(jobs), 1), dtype=torch.long, device=self.device),
                       last, self.device, self.vocab_size, self.tokenizer)

    def advance(self, rows: Running, logits: torch.Tensor, started: float) -> None:
        """Choose every row's next token, update their texts, and drop the rows that are done."""
        chosen = choose(logits, rows)
        want = [j.settings.logprobs for j in rows.jobs]
        logprobs = top = None
        if any(n is not None for n in want):
            logp = logits.float().log_softmax(-1)
            logprobs = logp.gather(1, chosen[:, None])[:, 0].tolist()
            n = max(n or 0 for n in want)
            top = [list(zip(i, v)) for i, v in zip(*(t.tolist() for t in logp.topk(n, -1)[::-1]))] if n else None
        if rows.seen is not None:
            rows.seen[torch.arange(len(rows), device=self.device), chosen] = True
        tokens = chosen.tolist()
        now = time.monotonic()
        keep = []
        for row, (job, token) in enumerate(zip(rows.jobs, tokens)):
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
                continue
            if job.first_token_at is None:
                job.first_token_at = now
                self.observer.first_token(job, now - job.submitted)
            job.tokens.append(token)
            if logprobs is not None and want[row] is not None:
                job.logprobs.append((token, logprobs[row], top[row][:want[row]] if top else []))
            reason = self._advance(job, token, rows.texts[row], rows.matchers[row])
            if reason:
                self._finish(job, reason)
            else:
                keep.append(row)
        with self._lock:
            self.stats.tokens_generated += len(tokens)
        self.observer.tokens(len(tokens), now - started)
        rows.last, rows.steps = chosen[:, None], rows.steps + 1
        rows.decoder_mask = torch.cat([rows.decoder_mask, rows.decoder_mask.new_ones((len(rows), 1))], 1)
        if len(keep) < len(rows):
            if keep:
                rows.select(keep)
            else:
                rows.jobs = []
                if rows is self.running:
                    self.running = None

    def _finish(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        if reason != "cancelled":
            self._emit(job, final=True, held=0)
            job.on_event("done", job)
        self._release(job)

    def _advance(self, job: Job, token: int, text: Detokenizer, matcher: StopMatcher) -> str | None:
        """Add the job's new token to its text; the finish reason once it is done."""
        s = job.settings
        if token == EOS_ID and not s.ignore_eos:
            return "stop"
        delta = text.add(token)
        found = matcher.feed(delta) if matcher.stops else None
        if found is not None:
            end, length = found
            job.text = (job.text + delta[:end])[:len(job.text) + end - length]
            return "stop"
        job.text += delta
        if len(job.tokens) >= s.max_tokens:
            return "length"
        self._emit(job, final=False, held=matcher.held)
        return None

    def _emit(self, job: Job, final: bool, held: int) -> None:
        """Send the part of the answer no later token can change: all but a tail that may begin
        a stop string."""
        if not job.stream:
            return
        ready = len(job.text) - (0 if final else held)
        if ready > job.sent:
            piece, job.sent = job.text[job.sent:ready], ready
            job.on_event("delta", piece)

    # ---- a synchronous run, for tests and tools -----------------------------------------
    def generate(self, jobs: list[Job]) -> None:
        """Decode `jobs` to their ends in this thread (the worker must not be running)."""
        for job in jobs:
            job.on_cancel = None
        with self._lock:
            self.stats.running += len(jobs)
        self.step(jobs)
        while self.running is not None:
            self.step([])

