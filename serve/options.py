"""`train.py serve`'s flags checked before any work, the limits they set, and the start: the
command in train.py only declares the flags (and their --help) and calls `start`."""
import math
import os

from utils.errors import UserError


def start(model_dir: str, host: str, port: int, api_key: str, allow_remote_without_key: bool, model_name: str,
          max_batch_size: int, max_queue: int, batch_wait_ms: float, max_body_bytes: int, max_prompt_tokens: int,
          max_tokens: int, timeout_s: float, device: str) -> None:
    """Check the flags (one error line each), load the model and serve until stopped."""
    from serve.app import API_KEY_ENV, Limits, check_port_free, is_loopback, run
    if not 0 < port < 65536:
        raise UserError(f"--port={port} is not a TCP port; pass 1 to 65535")
    for name, value in (("max_batch_size", max_batch_size), ("max_body_bytes", max_body_bytes),
                        ("max_tokens", max_tokens)):
        if value <= 0:
            raise UserError(f"--{name} must be > 0, got {value}")
    if max_queue < 0 or max_prompt_tokens < 0 or batch_wait_ms < 0 or not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise UserError("--max_queue, --max_prompt_tokens and --batch_wait_ms must be >= 0, --timeout_s > 0")
    key = api_key or os.environ.get(API_KEY_ENV, "")
    if not is_loopback(host) and not key and not allow_remote_without_key:
        raise UserError(f"--host={host} can be reached from other machines: set --api_key=KEY (or ${API_KEY_ENV}), "
                        "or pass --allow_remote_without_key=True to serve without a key on purpose")
    if device:
        import torch
        try:
            torch.device(device)
        except RuntimeError:
            raise UserError(f"--device={device!r} is not a device; pass cpu, cuda or cuda:N") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device={device} but this machine has no CUDA GPU; pass --device=cpu")
    check_port_free(host, port)
    from model.infer import ChatBot
    bot = ChatBot(model_dir, device or None)
    limits = Limits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens or bot.max_prompt_tokens,
                    max_tokens=max_tokens, default_max_tokens=min(bot.max_new_tokens, max_tokens), timeout_s=timeout_s)
    parts = os.path.normpath(os.path.abspath(model_dir)).split(os.sep)
    run(bot, host, port, model_name or "/".join(parts[-2:]), key or None, limits, max_batch_size, max_queue,
        batch_wait_ms)
