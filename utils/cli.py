"""One command-line mechanism for every entry script: flags checked before any work, `--help`.

Fire parses the values and calls the command; before it does, `run_cli` checks every flag
name against the command's own flags (an unknown one is one line naming the closest valid
flag and all of them), coerces the values to the annotated types, and answers `--help`/`-h`
with the command's flags, their types, defaults and meanings. Fire alone would run the
command with the flags it knows and only then fail on the others (the sampler wrote its
output with the default seed before it complained about `--seedd`).
"""
import dataclasses
import difflib
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable

import fire

from utils.errors import UserError, exit_on_user_error


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str
    type: typing.Any = None  # None: any value fire parses
    default: typing.Any = inspect.Parameter.empty  # empty: required
    help: str = ""


def type_name(tp) -> str:
    if tp is None:
        return "value"
    if tp is type(None):
        return "None"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(type_name(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if typing.get_origin(tp) is dict:
        return f"dict[{', '.join(type_name(t) for t in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(name: str, value, tp):
    """Return `value` as type `tp`, or raise a UserError naming the flag and the expected type.

    Floats must be finite: a learning rate of nan or inf is never what the user meant.
    """
    if tp is None or tp is typing.Any:
        return value
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # str | list[str], int | None
        if value is None and type(None) in typing.get_args(tp):
            return None
        for option in typing.get_args(tp):
            if option is type(None):
                continue
            try:
                return coerce(name, value, option)
            except UserError:
                pass
        raise UserError(f"--{name} must be {type_name(tp)}, got {value!r}")
    if typing.get_origin(tp) is dict:
        key, item = typing.get_args(tp)
        if isinstance(value, dict):
            return {coerce(name, k, key): coerce(name, v, item) for k, v in value.items()}
        raise UserError(f"--{name} must be a mapping, got {value!r}")
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [coerce(name, v, item) for v in value]
        raise UserError(f"--{name} must be a list, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise UserError(f"--{name} must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # fire parses --output_dir=2024 as a number
    raise UserError(f"--{name} must be {type_name(tp)}, got {value!r} ({type(value).__name__})")


def docstring_args(fn: Callable) -> dict[str, str]:
    """{argument: meaning} from the `Args:` section of a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    if "Args:" not in doc:
        return {}
    meanings, current = {}, None
    for line in doc.split("Args:", 1)[1].splitlines():
        m = re.match(r"\s{0,8}(\w+)(?: \([^)]*\))?: (.*)", line)
        if m:
            current = m.group(1)
            meanings[current] = m.group(2).strip()
        elif current and line.strip() and line.startswith(" " * 8):
            meanings[current] += " " + line.strip()
        elif not line.strip() and meanings:
            current = None
    return meanings


def dataclass_flags(cls) -> list[Flag]:
    """Flags from a dataclass: the field comments in its source are their meanings."""
    hints = typing.get_type_hints(cls)
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return [Flag(f.name, hints[f.name], f.default, comments.get(f.name, "")) for f in dataclasses.fields(cls)]


def flags_of(fn: Callable) -> list[Flag]:
    """A command's flags: its parameters (meanings from its docstring), plus `fn.extra_flags`
    for a command that takes them through **kwargs (train takes every TrainConfig field)."""
    meanings, hints = docstring_args(fn), typing.get_type_hints(fn)
    flags = [Flag(p.name, hints.get(p.name), p.default, meanings.get(p.name, ""))
             for p in inspect.signature(fn).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return flags + list(getattr(fn, "extra_flags", []))


def takes_flags(flags: list[Flag]):
    """Declare the flags a command receives through **kwargs."""
    def mark(fn):
        fn.extra_flags = flags
        return fn
    return mark


def format_help(prog: str, fn: Callable) -> str:
    summary = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
    lines = [f"usage: {prog} [--flag=value ...]", "", summary, "", "flags:"]
    for f in flags_of(fn):
        default = "required" if f.default is inspect.Parameter.empty else f"default {f.default!r}"
        lines.append(f"  --{f.name} ({type_name(f.type)}, {default})")
        if f.help:
            lines.append(f"      {f.help}")
    return "\n".join(lines)


def split_flags(args: list[str], flags: list[Flag]) -> tuple[list, dict]:
    """Positional values and {flag: raw text} as fire reads them: `--a=1`, `--a 1`, `--a` for a
    boolean True and `--noa` for False. Raises a UserError for a name the command lacks."""
    known = {f.name: f for f in flags}
    positional, named, i = [], {}, 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            raise UserError("fire's own flags after `--` are not supported; remove the `--`")
        if not arg.startswith("-") or re.fullmatch(r"-\d.*", arg):
            positional.append(arg)
            i += 1
            continue
        key, has_value, value = arg.lstrip("-").partition("=")
        key = key.replace("-", "_")
        next_is_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        if key not in known and key.startswith("no") and is_bool(known.get(key[2:], Flag(""))) and not has_value:
            named[key[2:]] = "False"
            i += 1
            continue
        if key not in known:
            raise UserError(unknown_flag_message(key, list(known)))
        if has_value:
            named[key] = value
        elif is_bool(known[key]) and not (next_is_value and args[i + 1].lower() in ("true", "false", "auto")):
            named[key] = "True"
        elif next_is_value:
            named[key] = args[i + 1]
            i += 1
        else:
            raise UserError(f"--{key} needs a value: --{key}=VALUE")
        i += 1
    return positional, named


def is_bool(flag: Flag) -> bool:
    return flag.type is bool or bool in typing.get_args(flag.type)


def unknown_flag_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean --{close[0]}? " if close else ""
    return f"unknown flag --{key}; {hint}valid flags: {', '.join('--' + v for v in valid)}"


def check_args(fn: Callable, args: list[str]) -> None:
    """Every flag known and of the right type, every required flag given: before any work."""
    flags = flags_of(fn)
    positional, named = split_flags(args, flags)
    params = [f for f in flags if f.name not in named]
    if len(positional) > len(params):
        raise UserError(f"unexpected argument {positional[len(params)]!r}; give values as --flag=value")
    values = dict(zip([f.name for f in params], positional))
    values.update(named)
    known = {f.name: f for f in flags}
    for name, text in values.items():
        coerce(name, fire.parser.DefaultParseValue(text), known[name].type)
    missing = [f.name for f in flags if f.default is inspect.Parameter.empty and f.name not in values]
    if missing:
        raise UserError(f"--{missing[0]} is required; see --help")


def with_coerced_flags(fn: Callable) -> Callable:
    """`fn` called with every flag coerced to its annotated type (fire gives "1e-3" as a float
    but "007" as an int, `--files=a,b` as a tuple)."""
    known = {f.name: f for f in flags_of(fn)}

    def call(*args, **kwargs):
        names = [f.name for f in known.values()]
        kwargs.update(zip(names, args))
        return fn(**{k: coerce(k, v, known[k].type) if k in known else v for k, v in kwargs.items()})

    call.__signature__ = inspect.signature(fn)
    call.__doc__, call.__name__ = fn.__doc__, fn.__name__
    return call


def run_cli(commands: dict[str, Callable] | Callable, prog: str, argv: list[str] | None = None):
    """Run one command of `commands` (or the single command) from `argv`, as described above."""
    argv = sys.argv[1:] if argv is None else list(argv)
    exit_on_user_error(_run, commands, prog, argv)


def _run(commands, prog: str, argv: list[str]):
    if isinstance(commands, dict):
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(f"usage: {prog} COMMAND [--flag=value ...]   ({prog} COMMAND --help lists its flags)\n")
            for name, fn in commands.items():
                print(f"  {name:<16} {(inspect.getdoc(fn) or '').splitlines()[0]}")
            if not argv:
                sys.exit(2)
            return
        name, args = argv[0], argv[1:]
        if name not in commands:
            close = difflib.get_close_matches(name, list(commands), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"unknown command {name!r}; {hint}commands: {', '.join(commands)}")
        fn, prog = commands[name], f"{prog} {name}"
    else:
        fn, args = commands, argv
    if any(a in ("-h", "--help") for a in args):
        print(format_help(prog, fn))
        return
    check_args(fn, args)
    component = {k: with_coerced_flags(v) for k, v in commands.items()} if isinstance(commands, dict) \
        else with_coerced_flags(commands)
    # Fire prints what a command returns; ours return None or values tests use in-process.
    fire.Fire(component, command=argv, name=prog)
