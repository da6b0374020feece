"""Batched generation for the server: requests that arrive together are decoded together.

One worker thread owns the model. Requests wait in a queue; the worker takes every request
waiting (after `batch_wait_ms` more for company), sorts them by prompt length, and decodes them
in batches of at most `max_batch_size`, one token for every row per step. Each row keeps its
own settings (temperature, top_p, seed, max_tokens, stop strings) and its own stream of text;
a row leaves the batch as soon as it is finished or its client has gone, and the batch ends
when its last row has. Requests arriving during a batch wait for the next one.

The decode loop is ours, not `model.generate`: `generate` takes one set of sampling settings
and one streamer for the whole batch (its streamers refuse a batch of more than one) and
cannot drop a row whose client disconnected. Greedy decoding here gives the same tokens as
`generate` (tested against `ChatBot.answer`).
"""
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from model.chat_model import EOS_ID, PAD_ID


class QueueFull(Exception):
    """More requests are in flight than the server admits."""


@dataclasses.dataclass
class Settings:
    """How one request is decoded."""
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclasses.dataclass
class Job:
    """One request: its prompt ids, settings and where its text goes.

    `on_event(kind, payload)` is called from the worker thread: ("delta", text) as the answer
    grows (when `stream`), then ("done", job) once, or ("error", message) once.
    """
    prompt_ids: list[int]
    settings: Settings
    on_event: Callable[[str, object], None]
    stream: bool = True  # send ("delta", text) events as the answer grows
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # the answer so far, stop strings removed
    sent: int = 0  # characters of `text` already sent as deltas
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled"
    submitted: float = dataclasses.field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclasses.dataclass
class Stats:
    """What the engine has done; shown by /health."""
    waiting: int = 0
    running: int = 0
    batches: int = 0
    largest_batch: int = 0
    answered: int = 0
    cancelled: int = 0
    tokens_generated: int = 0


class BatchEngine:
    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 64, batch_wait_ms: float = 10,
                 log=print):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size, self.max_queue, self.batch_wait_s = max_batch_size, max_queue, batch_wait_ms / 1000
        # Ids the tokenizer can decode; the embedding is padded beyond them (never sampled).
        self.vocab_size = len(tokenizer)
        self.log = log
        self.stats = Stats()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._worker = threading.Thread(target=self._run, name="chatlm-generate", daemon=True)

    def start(self) -> "BatchEngine":
        self._worker.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)

    # ---- admission -------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue `job`, or raise QueueFull when `max_batch_size + max_queue` are in flight."""
        with self._lock:
            if self._in_flight >= self.max_batch_size + self.max_queue:
                raise QueueFull
            self._in_flight += 1
            self.stats.waiting += 1
        self._queue.put(job)

    def _release(self, job: Job) -> None:
        with self._lock:
            self._in_flight -= 1
            self.stats.running -= 1
            if job.finish_reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.answered += 1

    # ---- the worker --------------------------------------------------------------------
    def _take_waiting(self) -> list[Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs, deadline = [first], time.monotonic() + self.batch_wait_s
        while True:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this round
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        while (jobs := self._take_waiting()) is not None:
            with self._lock:
                self.stats.waiting -= len(jobs)
                self.stats.running += len(jobs)
            # Similar lengths together: less padding in the encoder and in the cross-attention.
            jobs.sort(key=lambda j: len(j.prompt_ids))
            for start in range(0, len(jobs), self.max_batch_size):
                batch = jobs[start:start + self.max_batch_size]
                try:
                    self.decode(batch)
                except Exception as err:  # noqa: BLE001 (a failed batch must not stop the server)
                    self.log(f"generation failed: {type(err).__name__}: {err}")
                    for job in batch:
                        if job.finish_reason is None:
                            job.finish_reason = "error"
                            job.on_event("error", "generation failed on the server; see its log")
                            self._release(job)

    def _finish(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        if reason != "cancelled":
            self._emit(job, final=True)
            job.on_event("done", job)
        self._release(job)

    @torch.inference_mode()
    def decode(self, jobs: list[Job]) -> None:
        """Decode `jobs` together until every one is finished or cancelled."""
        live = [j for j in jobs if not j.cancelled.is_set()]
        for job in jobs:
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
        if not live:
            return
        with self._lock:
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        width = max(len(j.prompt_ids) for j in live)
        ids = torch.full((len(live), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(live), width), dtype=torch.long)
        for row, job in enumerate(live):
            ids[row, :len(job.prompt_ids)] = torch.tensor(job.prompt_ids)
            mask[row, :len(job.prompt_ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        encoded = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        last = torch.full((len(live), 1), PAD_ID, dtype=torch.long, device=self.device)  # T5 starts from pad
        generators = [seeded_generator(j.settings.seed) for j in live]
        for _ in itertools.count():
            logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), attention_mask=mask,
                                decoder_input_ids=last, cache=cache, use_cache=True).logits[:, -1, :self.vocab_size]
            chosen = [self.next_token(logits[row], job.settings, generators[row]) for row, job in enumerate(live)]
            keep = []
            for row, (job, token) in enumerate(zip(live, chosen)):
                if job.cancelled.is_set():
                    self._finish(job, "cancelled")
                    continue
                job.tokens.append(token)
                reason = self._advance(job, token)
                if reason:
                    self._finish(job, reason)
                else:
                    keep.append(row)
            with self._lock:
                self.stats.tokens_generated += len(live)
            if not keep:
                return
            if len(keep) < len(live):  # drop finished rows from every tensor and the cache
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                encoded, mask = encoded[index], mask[index]
                live, generators = [live[r] for r in keep], [generators[r] for r in keep]
                chosen = [chosen[r] for r in keep]
            last = torch.tensor(chosen, dtype=torch.long, device=self.device).unsqueeze(1)

    def next_token(self, logits: torch.Tensor, settings: Settings, generator: torch.Generator) -> int:
        """Greedy at temperature 0; otherwise nucleus sampling with the row's own generator."""
        if settings.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
        if settings.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest set whose mass reaches top_p (the first token always).
            outside = sorted_probs.cumsum(0) - sorted_probs >= settings.top_p
            probs = probs.scatter(0, order[outside], 0.0)
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))

    def _advance(self, job: Job, token: int) -> str | None:
        """Update the job's text with its new token; the finish reason once it is done."""
        if token == EOS_ID:
            return "stop"
        job.text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        for stop in job.settings.stop:
            if stop and (at := job.text.find(stop)) >= 0:
                job.text = job.text[:at]
                return "stop"
        if len(job.tokens) >= job.settings.max_tokens:
            return "length"
        self._emit(job, final=False)
        return None

    def _emit(self, job: Job, final: bool) -> None:
        """Send the part of the answer no later token can change."""
        if not job.stream:
            return
        ready = len(job.text)
        if not final:
            # Hold back a character the next token may complete (a byte of a multi-byte
            # character decodes to U+FFFD) and a tail that may begin a stop string.
            ready = len(job.text.rstrip("\ufffd"))
            held = max((k for stop in job.settings.stop for k in range(1, min(len(stop), ready + 1))
                        if job.text[:ready].endswith(stop[:k])), default=0)
            ready -= held
        if ready > job.sent:
            piece, job.sent = job.text[job.sent:ready], ready
            job.on_event("delta", piece)


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator per request: a seeded request samples the same text in any batch."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
