"""`train.py serve`'s flags checked before any work, the limits they set, and the start: the
command in train.py only declares the flags (and their --help) and calls `start`."""
import math
import os

from utils.errors import UserError


def names(value) -> tuple[str, ...]:
    """A flag of names: 'a,b', or the tuple fire makes of it."""
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(v.strip() for v in str(value or "").split(",") if v.strip())


def start(model_dir: str, host: str, port: int, api_key: str, allow_remote_without_key: bool, model_name: str,
          max_batch_size: int, max_queue: int, max_body_bytes: int, max_prompt_tokens: int, max_tokens: int,
          timeout_s: float, device: str, allowed_hosts="", allowed_origins="", max_connections: int = 256,
          header_timeout_s: float = 10.0, body_timeout_s: float = 30.0, drain_timeout_s: float = 30.0,
          keepalive_s: float = 15.0, max_stops: int = 4, max_stop_chars: int = 64) -> None:
    """Check the flags (one error line each), load the model and serve until stopped."""
    from serve.app import API_KEY_ENV, Limits, Network, check_port_free, is_loopback, run
    from serve.guard import WILDCARDS
    if not 0 < port < 65536:
        raise UserError(f"--port={port} is not a TCP port; pass 1 to 65535")
    for name, value in (("max_batch_size", max_batch_size), ("max_body_bytes", max_body_bytes),
                        ("max_tokens", max_tokens), ("max_connections", max_connections), ("max_stops", max_stops),
                        ("max_stop_chars", max_stop_chars)):
        if value <= 0:
            raise UserError(f"--{name} must be > 0, got {value}")
    if max_queue < 0 or max_prompt_tokens < 0:
        raise UserError("--max_queue and --max_prompt_tokens must be >= 0")
    for name, value in (("timeout_s", timeout_s), ("header_timeout_s", header_timeout_s),
                        ("body_timeout_s", body_timeout_s), ("drain_timeout_s", drain_timeout_s),
                        ("keepalive_s", keepalive_s)):
        if not (value > 0 and math.isfinite(value)):
            raise UserError(f"--{name} must be a number of seconds > 0, got {value}")
    key = api_key or os.environ.get(API_KEY_ENV, "")
    if not is_loopback(host) and not key and not allow_remote_without_key:
        raise UserError(f"--host={host} can be reached from other machines: set --api_key=KEY (or ${API_KEY_ENV}), "
                        "or pass --allow_remote_without_key=True to serve without a key on purpose")
    hosts, origins = names(allowed_hosts), names(allowed_origins)
    if host.strip("[]") in WILDCARDS and not hosts:
        raise UserError(f"--host={host} listens on every address: name the host names clients use in the Host header "
                        "with --allowed_hosts=NAME[,NAME] (or '*' to accept any, behind a proxy that checks them)")
    bad = [o for o in origins if o != "null" and "://" not in o]
    if bad:
        raise UserError(f"--allowed_origins: {bad[0]!r} is not an origin; give scheme://host[:port], "
                        "e.g. http://localhost:3000")
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
                    max_tokens=max_tokens, default_max_tokens=min(bot.max_new_tokens, max_tokens), timeout_s=timeout_s,
                    max_stops=max_stops, max_stop_chars=max_stop_chars, body_timeout_s=body_timeout_s,
                    keepalive_s=keepalive_s)
    network = Network(host, port, hosts, origins, max_connections, header_timeout_s, drain_timeout_s)
    parts = os.path.normpath(os.path.abspath(model_dir)).split(os.sep)
    run(bot, network, model_name or "/".join(parts[-2:]), key or None, limits, max_batch_size, max_queue)
