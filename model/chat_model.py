"""The T5 text-to-text chat model.

A plain `T5ForConditionalGeneration` underneath: a saved directory loads with
`AutoModelForSeq2SeqLM.from_pretrained(dir)` and needs nothing from this project.
The encoder input is the raw prompt followed by [EOS]; there is no chat template.
"""
import dataclasses

import torch
from transformers import AttentionInterface, GenerationConfig, T5Config, T5ForConditionalGeneration
from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, create_bidirectional_mask, sdpa_mask
from transformers.models.t5.modeling_t5 import eager_attention_forward
from transformers.utils import ModelOutput

from model.chunked import summed_nll, token_logps

from config import T5ModelConfig

PAD_ID, EOS_ID = 0, 1


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    """Round the embedding up so matrix shapes suit GPU kernels; extra rows are never produced."""
    return (n + multiple - 1) // multiple * multiple


def get_t5_config(model_config: T5ModelConfig, vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=padded_vocab_size(vocab_size),
        d_model=model_config.d_model, d_ff=model_config.d_ff, d_kv=model_config.d_kv,
        num_heads=model_config.num_heads, num_layers=model_config.num_layers,
        num_decoder_layers=model_config.num_decoder_layers,
        relative_attention_num_buckets=model_config.relative_attention_num_buckets,
        relative_attention_max_distance=model_config.relative_attention_max_distance,
        dropout_rate=model_config.dropout_rate, feed_forward_proj=model_config.feed_forward_proj,
        # T5 starts decoding from the pad token.
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
    )


def trained_bias_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, position_bias: torch.Tensor | None = None, **kwargs):
    """Attention for `attn_implementation="auto"`: torch's sdpa, except where T5's relative
    position bias is trained on a CPU. sdpa's CPU flash kernel takes no gradient for its mask, so
    there it falls back to its math kernel, whose safe softmax makes three more passes over the
    (batch, heads, queries, keys) scores (isneginf, all, where: 3-5% of a tiny-preset step) and which
    is slower than the eager one. Here the bias and the mask are added once, as the matmul's input
    (baddbmm), and the softmax is the plain one: the eager result within fp32 rounding. Under
    autocast (the scores in bf16, the bias fp32) it is T5's eager attention, the mask folded into
    the bias. Every other case goes to sdpa as it is: inference, cross-attention (a bias with no
    gradient), and CUDA, whose memory-efficient kernel takes the bias's gradient itself. Hand-made
    because transformers' T5 has no kernel for it; its eager and sdpa functions are reused."""
    if position_bias is None or not position_bias.requires_grad or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_bias=position_bias, **kwargs)
    (b, h, q_len, d), k_len = query.shape, key.shape[2]
    is_causal = q_len > 1 and attention_mask is None and getattr(module, "is_causal", False)
    bias = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
    if bias.dtype != query.dtype:
        return eager_attention_forward(module, query, key, value, None, scaling=scaling, dropout=dropout,
                                       position_bias=bias)[0], None
    scores = torch.baddbmm(bias.expand(b, h, q_len, k_len).reshape(b * h, q_len, k_len),
                           query.reshape(b * h, q_len, d), key.reshape(b * h, k_len, d).transpose(1, 2),
                           alpha=d ** -0.5 if scaling is None else scaling)
    weights = torch.nn.functional.dropout(scores.softmax(-1), p=dropout, training=module.training)
    out = torch.bmm(weights, value.reshape(b * h, k_len, -1)).view(b, h, q_len, -1)
    return out.transpose(1, 2).contiguous(), None


# The name transformers knows the kernel by (set_attn_implementation); masks as sdpa takes them.
TRAINED_BIAS_ATTENTION = "chatlm_sdpa"
AttentionInterface.register(TRAINED_BIAS_ATTENTION, trained_bias_attention)
AttentionMaskInterface.register(TRAINED_BIAS_ATTENTION, sdpa_mask)
ATTENTION_KERNELS = {"auto": TRAINED_BIAS_ATTENTION, "sdpa": "sdpa", "eager": "eager"}


def get_generation_config(max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(decoder_start_token_id=PAD_ID, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)


# The original's search types, as generation settings.
SEARCH_TYPES = {
    "greedy": dict(do_sample=False, num_beams=1),
    "beam": dict(do_sample=False, num_beams=5, early_stopping=True, no_repeat_ngram_size=4),
    "sampling": dict(do_sample=True, top_k=50, top_p=0.95, temperature=0.9),
}


def disable_dropout(model: torch.nn.Module) -> int:
    """Turn off every dropout of `model` in train mode too; returns how many were on.

    T5 drops out through `nn.Dropout` modules and through its attention's float `dropout` (TRL's
    disable_dropout_in_model misses the latter); LoRA's `lora_dropout` is an `nn.Dropout` as well.
    Only the modules change: the saved config keeps its `dropout_rate` for later finetuning.
    """
    switched = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p, switched = 0.0, switched + 1
        elif isinstance(getattr(module, "dropout", None), float) and module.dropout:
            module.dropout, switched = 0.0, switched + 1
    return switched


@dataclasses.dataclass
class HeadOutput(ModelOutput):
    hidden: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None
    token_kl: torch.Tensor | None = None
    summed_nll: torch.Tensor | None = None


class TextToTextModel(T5ForConditionalGeneration):
    """T5 with the original project's `my_generate` helper, and `encoder_repeats`."""

    def forward(self, input_ids=None, attention_mask=None, encoder_outputs=None, encoder_repeats: int = 1,
                head: str = "logits", chunk: int = -1, temperature: float = 1.0, kl_to: tuple | None = None,
                **kwargs):
        """T5's forward; with `encoder_repeats` r > 1 the decoder batch (labels, decoder inputs) has r
        rows per encoder row, consecutive: the encoder runs once per prompt and its output is
        repeated, instead of the prompt being repeated and encoded r times (GRPO's groups). Through
        forward, so a DDP or FSDP wrapper sees one call.

        `head` (with `labels`): "logits", T5's output; "hidden", the decoder's output as the head
        reads it, no logits (`.hidden`); "logps", the log-probability of each label at
        `temperature` (`.token_logps`, 0 at padding) through the head in chunks of `chunk` tokens
        (model/chunked.py), and with `kl_to` = (the reference's "hidden", its head weight) the KL
        to the reference at each token (`.token_kl`); "nll", the sum of -log p(label) over the target
        tokens (`.summed_nll`, the cross-entropy's numerator, its gradients made with it). No
        (tokens, vocabulary) tensor is kept."""
        if kwargs.get("labels") is not None:
            # Scored, not generated: no key/value cache. T5's decoder otherwise builds one per call
            # (use_cache is on in its config, and HF's forward keeps it on with labels), two
            # DynamicCaches that each deep-copy the config: 7% of a micro model's eager CPU step.
            kwargs.setdefault("use_cache", False)
            if attention_mask is not None and attention_mask.dim() == 2:
                attention_mask = self.padding_mask(attention_mask)
        if encoder_repeats > 1:
            if encoder_outputs is None:
                encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            hidden = encoder_outputs[0].repeat_interleave(encoder_repeats, 0)
            encoder_outputs, input_ids = (hidden,), None
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(encoder_repeats, 0)
        if head == "logits":
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   encoder_outputs=encoder_outputs, **kwargs)
        labels = kwargs["labels"]
        states = self.head_inputs(input_ids, attention_mask, encoder_outputs, labels)
        if head == "hidden":
            return HeadOutput(hidden=states)
        if head == "nll":
            return HeadOutput(summed_nll=summed_nll(states, self.lm_head.weight, labels, chunk))
        logps, kl = token_logps(states, self.lm_head.weight, labels, chunk, temperature, kl_to)
        return HeadOutput(token_logps=logps, token_kl=kl)

    def head_inputs(self, input_ids, attention_mask, encoder_outputs, labels) -> torch.Tensor:
        """(B, T, d): what T5ForConditionalGeneration.forward hands its lm_head (the encoder,
        the decoder on the labels shifted right, the output scaling of tied embeddings), the
        same calls; transformers has no forward that stops before the head."""
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        out = self.decoder(input_ids=self._shift_right(labels), encoder_hidden_states=encoder_outputs[0],
                           encoder_attention_mask=attention_mask, use_cache=False, return_dict=True)[0]
        return out * self.model_dim ** -0.5 if self.config.scale_decoder_outputs else out

    def padding_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The (B, S) padding mask as the (B, 1, 1, S) mask the attention implementation takes,
        for the encoder and the cross-attention alike. Given the 2D mask, transformers asks
        `mask.all()` on each of the two, to skip the mask when nothing is padded: a host sync each
        (T5's position bias is an attention mask anyway, so the skip gains nothing). Made here,
        the same mask is passed on as it is."""
        shape = torch.empty(attention_mask.shape[0], 1, 0, dtype=self.dtype, device=attention_mask.device)
        return create_bidirectional_mask(config=self.config, inputs_embeds=shape, attention_mask=attention_mask,
                                         allow_is_bidirectional_skip=False)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # config.json names the class other tools know (converters, serving engines map
        # `architectures` to their own implementation); this subclass adds no weights.
        # Directories saved before, naming TextToTextModel, still load here and with Auto*.
        super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = ["T5ForConditionalGeneration"]
        if kwargs.get("is_main_process", True):
            self.config.save_pretrained(save_directory)

    @torch.no_grad()
    def my_generate(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor | None = None,
                    max_seq_len: int = 256, search_type: str = "greedy", streamer=None,
                    **overrides) -> torch.LongTensor:
        """Generate answers for a batch of encoded prompts; returns (batch, new_tokens) ids."""
        if search_type not in SEARCH_TYPES:
            raise ValueError(f"search_type must be one of {sorted(SEARCH_TYPES)}, got {search_type!r}")
        if search_type == "beam" and streamer is not None:
            raise ValueError("streaming works with greedy or sampling search, not beam")
        settings = {**SEARCH_TYPES[search_type], **overrides}
        return self.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_seq_len,
                             decoder_start_token_id=PAD_ID, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                             streamer=streamer, **settings)
