"""Regression prompts: fixed prompts answered greedily at every evaluation, each with what its
answer must be (exact text), contain (a substring) or match (a regular expression).

The file is YAML (a list of mappings, or {prompts: [...]}) or JSONL (one mapping per line):

    - prompt: 一千二百三十四
      expect: "1234"
    - {name: date, prompt: 2024-01-02 用中文怎么说, expect: "二〇二四年", match: contains}
    - {prompt: 3 加 4, expect: "^7$", match: regex}
"""
import dataclasses
import json
import os
import re

import torch
import yaml

from utils.errors import UserError

MATCHES = ("exact", "contains", "regex")


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    prompt: str
    expect: str
    match: str = "exact"

    def passes(self, answer: str) -> bool:
        if self.match == "exact":
            return answer.strip() == self.expect.strip()
        if self.match == "contains":
            return self.expect in answer
        return re.search(self.expect, answer) is not None


def load_checks(path: str) -> list[Check]:
    """The checks of a regression file; any mistake in it is one error naming the entry."""
    if not os.path.isfile(path):
        raise UserError(f"--regression_file={path} not found; give a YAML or JSONL file of prompt/expect entries")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            entries = yaml.safe_load(text) or []
            entries = entries.get("prompts", entries) if isinstance(entries, dict) else entries
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise UserError(f"--regression_file={path} cannot be parsed ({str(err).splitlines()[0]})") from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"--regression_file={path} holds no entries; give a list of {{prompt, expect}} mappings")
    checks, names = [], set()
    for i, entry in enumerate(entries, 1):
        where = f"--regression_file={path}, entry {i}"
        if not isinstance(entry, dict) or not {"prompt", "expect"} <= entry.keys():
            raise UserError(f"{where}: needs the keys prompt and expect (and optionally name and match)")
        unknown = set(entry) - {"name", "prompt", "expect", "match"}
        if unknown:
            raise UserError(f"{where}: unknown key {sorted(unknown)[0]!r}; the keys are name, prompt, expect, match")
        match = entry.get("match", "exact")
        if match not in MATCHES:
            raise UserError(f"{where}: match {match!r} is not one of {list(MATCHES)}")
        prompt, expect = str(entry["prompt"]), str(entry["expect"])
        if not prompt.strip():
            raise UserError(f"{where}: the prompt is empty")
        if match == "regex":
            try:
                re.compile(expect)
            except re.error as err:
                raise UserError(f"{where}: {expect!r} is not a valid regular expression ({err})") from None
        name = str(entry.get("name") or f"#{i}")
        if name in names:
            raise UserError(f"{where}: the name {name!r} is used twice; give each entry its own name")
        names.add(name)
        checks.append(Check(name, prompt, expect, match))
    return checks


@torch.no_grad()
def run_checks(model, tokenizer, checks: list[Check], max_new_tokens: int, device,
               batch_size: int = 32) -> list[tuple[Check, str, bool]]:
    """(check, greedy answer, passed) for every check, in order."""
    results = []
    for i in range(0, len(checks), batch_size):
        part = checks[i:i + batch_size]
        # The tokenizer appends [EOS]: the encoder input training saw.
        inputs = tokenizer([c.prompt for c in part], padding=True, truncation=True, return_tensors="pt",
                           return_token_type_ids=False).to(device)
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        for check, answer in zip(part, tokenizer.batch_decode(out, skip_special_tokens=True)):
            results.append((check, answer, check.passes(answer)))
    return results
