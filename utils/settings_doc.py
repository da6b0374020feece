"""docs/settings.md, the table of every TrainConfig field, generated from config.py: each field's
default and the comment on its line, under the section comments of the dataclass.

    python -m utils.settings_doc          # rewrite docs/settings.md
    python -m utils.settings_doc --check  # exit 1 when docs/settings.md is not what config.py gives
"""
import ast
import dataclasses
import io
import os
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.py")
PAGE = os.path.join(ROOT, "docs", "settings.md")

HEAD = """# Settings

Every `TrainConfig` field (config.py) is a flag of `train` (`--field=value`) and a key of a
`--config=FILE.yaml`; defaults < the YAML file < `profile` < flags. This page is generated from
the field comments in config.py by `python -m utils.settings_doc` (a test fails when it is not
up to date). Bad values and combinations are one `error:` line at start-up.
"""


def field_comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
    """Comments by line: those after code (a field's meaning) and those on a line of their own."""
    trailing, own = {}, {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            text = tok.string.lstrip("#").strip()
            (own if not lines[row - 1][:tok.start[1]].strip() else trailing)[row] = text
    return trailing, own


def fmt_default(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def render() -> str:
    """The page's text."""
    from config import TrainConfig
    with open(CONFIG, encoding="utf-8") as f:
        source = f.read()
    trailing, own = field_comments(source)
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    out, previous_end = [HEAD], cls.lineno
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign):
            continue
        name = node.target.id
        section = [own[r] for r in range(previous_end + 1, node.lineno) if r in own]
        if section:
            out.append(f"\n## {section[0].split(':')[0].rstrip('.')}\n")
            if len(" ".join(section)) > len(section[0].split(":")[0]) + 2:
                out.append(" ".join(section) + "\n")
            out.append("| field | default | meaning |\n| --- | --- | --- |")
        meaning = trailing.get(node.end_lineno, trailing.get(node.lineno, "")).replace("|", "\\|")
        out.append(f"| `{name}` | `{fmt_default(defaults[name])}` | {meaning} |")
        previous_end = node.end_lineno
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        with open(PAGE, encoding="utf-8") as f:
            if f.read() != text:
                print(f"{PAGE} is out of date: run python -m utils.settings_doc", file=sys.stderr)
                return 1
        return 0
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main(sys.argv[1:]))
