"""The output head and the log-probability of each label, a chunk of tokens at a time.

Every objective needs, at each target token, log p(label) over the whole vocabulary (the
cross-entropy is its negative; DPO and GRPO sum it per sequence), and kl_beta the KL between the
policy's and the reference's distributions there. Computed from the full logits, that is a
(tokens, vocabulary) fp32 tensor, its log-softmax and their gradients: at vocabulary 29,298 and
16k target tokens, 1.9 GB each. Here the head's matmul, the log-softmax and the loss are fused
per chunk of `chunk` tokens, so at most one chunk's logits exist at a time (the approach of fused
linear-cross-entropy kernels such as Liger's). The summed cross-entropy (ChunkedNLL) makes its
gradients in forward, from the logits at hand; the per-token results (ChunkedHead) recompute
each chunk's logits in backward, except where the head is frozen (SFT, LoRA): then each token's
gradient with respect to its hidden state is made in forward too, and backward only scales it.
Liger and Cut-Cross-Entropy are Triton kernels for CUDA and give the cross-entropy only, not
per-token log-probabilities and a KL; this is pure torch, for every device and objective.

Precision is the head's as it would run under the ambient autocast: the matmuls in autocast's
dtype where it is on, the softmax and the loss in fp32, as `lm_head(...).float()` then a
log-softmax does.
"""
import torch

LABEL_PAD = -100


def _logits(hidden: torch.Tensor, weight: torch.Tensor, dtype) -> torch.Tensor:
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    return (hidden @ weight.t()).float()


class ChunkedHead(torch.autograd.Function):
    """(N, d) hidden states, (V, d) head, (N,) labels -> (N,) log p(label) and, with a reference
    (its hidden states and head, no gradient), (N,) KL(policy || reference) per token."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_temperature: float, chunk: int, ref_hidden, ref_weight, dtype):
        n, t = hidden.shape[0], inv_temperature
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        kl = torch.zeros(n if ref_hidden is not None else 0, dtype=torch.float32, device=hidden.device)
        # With the head frozen (SFT's shared embedding, LoRA, a frozen decoder head) only the
        # hidden states need a gradient, and each token's is its upstream gradient times a (d,)
        # vector known here: d log p(label) / d h and d KL / d h. Made now from the logits at hand,
        # they spare backward the recomputed logits (3 head matmuls a chunk become 2); they hold
        # (N, d) floats, not (N, V).
        ahead = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        d_logp = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if ahead else None
        d_kl = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) \
            if ahead and ref_hidden is not None else None
        mm = dtype or torch.promote_types(hidden.dtype, weight.dtype)
        w = weight.to(mm) if ahead else None
        with torch.no_grad():
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                logp = (_logits(hidden[lo:hi], weight, dtype) * t).log_softmax(-1)
                logps[lo:hi] = logp.gather(1, labels[lo:hi, None]).squeeze(1)
                p = logp.exp() if ref_hidden is not None or ahead else None
                if ref_hidden is not None:
                    d = logp - (_logits(ref_hidden[lo:hi], ref_weight, dtype) * t).log_softmax(-1)
                    kl[lo:hi] = (p * d).sum(-1)
                if ahead:  # as backward below: onehot(label) - p, and p * (log p - log q - KL)
                    g = -p
                    g[torch.arange(hi - lo, device=g.device), labels[lo:hi]] += 1.0
                    d_logp[lo:hi] = ((g * t).to(mm) @ w).float()
                    if d_kl is not None:
                        d_kl[lo:hi] = ((p * (d - kl[lo:hi, None]) * t).to(mm) @ w).float()
        ctx.save_for_backward(hidden, weight, labels, ref_hidden, ref_weight, d_logp, d_kl)
        ctx.inv_temperature, ctx.chunk, ctx.dtype = inv_temperature, chunk, dtype
        return logps, kl

    @staticmethod
    def backward(ctx, grad_logps, grad_kl):
        hidden, weight, labels, ref_hidden, ref_weight, d_logp, d_kl = ctx.saved_tensors
        t, chunk, dtype = ctx.inv_temperature, ctx.chunk, ctx.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if d_logp is not None:  # the head frozen: the gradients made in forward, scaled
            grad_h = grad_logps[:, None] * d_logp
            if d_kl is not None and grad_kl is not None:
                grad_h = grad_h + grad_kl[:, None] * d_kl
            return (grad_h.to(hidden.dtype), None, None, None, None, None, None, None)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        mm = dtype or torch.promote_types(hidden.dtype, weight.dtype)
        w = weight.to(mm)
        rows = torch.arange(min(chunk, hidden.shape[0]), device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk):
            hi = min(hidden.shape[0], lo + chunk)
            h = hidden[lo:hi].to(mm)
            logp = ((h @ w.t()).float() * t).log_softmax(-1)
            p = logp.exp()
            # d log p(label) / d z = onehot(label) - p; d KL / d z = p * (log p - log q - KL)
            gl = grad_logps[lo:hi, None]
            g = p * -gl
            g[rows[:hi - lo], labels[lo:hi]] += gl[:, 0]
            if ref_hidden is not None and grad_kl is not None:
                logq = (_logits(ref_hidden[lo:hi], ref_weight, dtype) * t).log_softmax(-1)
                d = logp - logq
                g += grad_kl[lo:hi, None] * p * (d - (p * d).sum(-1, keepdim=True))
            g = (g * t).to(mm)
            if need_h:
                grad_h[lo:hi] = (g @ w).to(hidden.dtype)
            if need_w:
                grad_w += (g.t() @ h).float()
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None, None, None, None)


class ChunkedNLL(torch.autograd.Function):
    """(N, d) hidden states, (V, d) head, (N,) labels (padding read as 0) and (N,) mask -> the
    summed -log p(label) over the masked tokens, a scalar: the cross-entropy's numerator. Its
    gradient is a scalar times fixed tensors, so they are made here in forward, chunk by chunk
    from the logits at hand, and backward only scales them: three head matmuls a chunk (logits,
    the hidden states' gradient, the head's), as the full logits take, not four (Liger's fused
    linear cross-entropy works so). ChunkedHead stays for per-token results (DPO, GRPO, the KL)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, chunk: int, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        mm = dtype or torch.promote_types(hidden.dtype, weight.dtype)
        w = weight.to(mm)
        wt, h_all, labels, m = w.t(), hidden.to(mm), labels[:, None], mask[:, None]
        # Each operator is a kernel launch on a GPU, where a small model waits on the host: what
        # can be done once for the batch (the mask, the label picks' sum, the -1 at each label) is
        # not done a chunk at a time. The mask scales the (tokens, d) side, never a chunk's
        # (tokens, vocabulary) logits: the same products, one pass over them fewer.
        picked = torch.empty(n, 1, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.no_grad():
            hm = h_all * m.to(mm) if need_w else None
            minus_one = torch.full((min(n, chunk), 1), -1.0, device=hidden.device)
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                lab = labels[lo:hi]
                logp = (h_all[lo:hi] @ wt).float().log_softmax(-1)
                torch.gather(logp, 1, lab, out=picked[lo:hi])
                if need_h or need_w:  # d -log p(label) / d z = p - onehot(label)
                    g = logp.exp_().scatter_add_(1, lab, minus_one if hi - lo == chunk else minus_one[:hi - lo])
                    g = g.to(mm)
                    if need_h:
                        grad_h[lo:hi] = g @ w
                    if need_w:
                        grad_w += (g.t() @ hm[lo:hi]).float()
            total = -(picked * m).sum()
            if need_h:
                grad_h *= m
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return ((grad_total * grad_h).to(ctx.dtypes[0]) if grad_h is not None else None,
                (grad_total * grad_w).to(ctx.dtypes[1]) if grad_w is not None else None, None, None, None, None)


# Under torch.compile the chunked head runs eagerly between the compiled T5 graphs: its loop runs
# once per chunk, a count that follows the batch's token count, so dynamo would guard on that count
# and compile again for each new one. Its work is a few large matmuls a chunk, which gain nothing
# from fusion.
@torch.compiler.disable
def summed_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = -1) -> torch.Tensor:
    """(B, T, d) hidden states, the (V, d) head and (B, T) labels (-100: padding) -> the sum of
    -log p(label) over the target tokens, through the head in chunks (ChunkedNLL)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    flat = labels.reshape(-1)
    mask = (flat != LABEL_PAD).float()
    return ChunkedNLL.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat.clamp(min=0), mask,
                            chunk_tokens(chunk, weight.shape[0]), dtype)


AUTO_CHUNK_ELEMENTS = 2 ** 21  # 8 MB of fp32 logits a chunk
AUTO_FULL_ELEMENTS = 2 ** 26  # auto: batches whose logits would hold fewer (256 MB in fp32) take the full ones


def chunk_tokens(chunk: int, vocab: int) -> int:
    """Tokens per chunk; `chunk` < 0: as many as fill AUTO_CHUNK_ELEMENTS logits. On a CPU larger
    chunks were slower (a 1024-token chunk at vocabulary 8,064, 33 MB, made a tiny-preset step
    1.6x slower: blocks that large are mapped and unmapped by the allocator at each use)."""
    return chunk if chunk > 0 else max(16, AUTO_CHUNK_ELEMENTS // vocab)


def use_chunks(chunk: int, labels: torch.Tensor, vocab: int) -> int:
    """The `chunk` setting for a batch of `labels` (shapes only: no sync), for ChunkedHead, whose
    chunks recompute the logits in backward (DPO, GRPO, kl_beta; the plain cross-entropy's
    ChunkedNLL does not and always chunks): -1 (auto) chunks where the full logits would reach
    AUTO_FULL_ELEMENTS and keeps the full ones below, where the recomputed matmul cost more than
    the memory saved (about 7% of a step at vocabulary 8,000 on a CPU); 0 never chunks; N > 0
    always, N tokens a chunk."""
    if chunk >= 0:
        return chunk
    return chunk if labels.numel() * vocab >= AUTO_FULL_ELEMENTS else 0


@torch.compiler.disable
def token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = -1,
                temperature: float = 1.0, reference: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, d) hidden states (after T5's output scaling), the (V, d) head and (B, T) labels
    (-100: padding) -> (B, T) log p(label) at temperature `temperature` (0 at padding), and with
    `reference` = (its (B, T, d) hidden states, its head) the (B, T) KL(policy || reference)."""
    shape, device_type = labels.shape, hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    flat = labels.reshape(-1)
    mask = flat != LABEL_PAD
    ref_hidden, ref_weight = (reference[0].reshape(-1, reference[0].shape[-1]).detach(), reference[1].detach()) \
        if reference is not None else (None, None)
    # Every position goes through, padding too (its label read as 0 and its result zeroed): picking
    # the target positions out would size a tensor by the mask's count, a host sync.
    logps, kl = ChunkedHead.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat.clamp(min=0), 1.0 / temperature,
                                  chunk_tokens(chunk, weight.shape[0]), ref_hidden, ref_weight, dtype)
    logps = (logps * mask).view(shape)
    return logps, (kl * mask).view(shape) if reference is not None else None
