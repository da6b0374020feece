"""Cut a large prompt/response parquet training set down to a sample, streaming.

Random 3M rows of a 10M-row file, and a disjoint 300k validation sample:
    python sample_training_data.py --input data/my_train_dataset.parquet \\
        --output data/my_train_dataset_3m.parquet --num_samples 3000000 \\
        --valid_output data/my_valid_dataset_300k.parquet --valid_samples 300000

Smart mode (drop empty, too short/long and duplicate rows, keep the best-scored):
    python sample_training_data.py --input data/my_train_dataset.parquet \\
        --output data/my_train_dataset_3m.parquet --num_samples 3000000 --smart [--near_dup]

Mix several inputs (commas separate them; one count or ratio each, or one for all):
    python sample_training_data.py --input data/a.parquet,data/b.parquet \\
        --output data/mix.parquet --ratio 0.3,0.5
"""
from utils.cli import run_cli
from utils.errors import UserError
from utils.sampling import DEFAULT_ROW_GROUP_SIZE, SmartOptions, get_sources, sample_parquet


def _as_list(value, flag: str) -> list | None:
    """Fire gives `a,b` as a string or a tuple and `3` as an int: make a list."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        if flag == "--input":
            return items
        try:
            return [float(v) if any(c in v for c in ".eE") else int(v.replace("_", "")) for v in items]
        except ValueError:
            raise UserError(f"{flag} must be a number or numbers separated by commas, got {value!r}") from None
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def main(input: str | list[str], output: str, num_samples=None, ratio=None,  # noqa: A002 (flag name fixed)
         smart: bool = False, seed: int = 42, valid_output: str | None = None, valid_samples: int | None = None,
         row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
         min_prompt_chars: int = SmartOptions.min_prompt_chars,
         max_prompt_chars: int = SmartOptions.max_prompt_chars,
         min_response_chars: int = SmartOptions.min_response_chars,
         max_response_chars: int = SmartOptions.max_response_chars,
         near_dup: bool = False, near_dup_threshold: float = SmartOptions.near_dup_threshold,
         progress: bool = True, overwrite: bool = False):
    """Sample --num_samples rows (or --ratio of the rows) of each --input into --output.

    Args:
        input: parquet file(s) with string columns prompt and response; commas separate several.
        output: parquet file to write (never one of the inputs).
        num_samples: rows to take from each input (one value, or one per input).
        ratio: share of each input's rows to take, in (0, 1], instead of --num_samples.
        smart: filter, deduplicate and keep the best-scored rows instead of a random sample.
        seed: makes the sample reproducible.
        valid_output: parquet file for a validation sample disjoint from --output.
        valid_samples: rows in the validation sample (split across inputs like the counts).
        row_group_size: rows per row group of the outputs.
        min_prompt_chars: smart mode drops prompts shorter than this.
        max_prompt_chars: smart mode drops prompts longer than this.
        min_response_chars: smart mode drops responses shorter than this.
        max_response_chars: smart mode drops responses longer than this.
        near_dup: smart mode also drops near duplicates (MinHash LSH on character 3-grams).
        near_dup_threshold: Jaccard similarity of 3-grams from which rows count as near duplicates.
        progress: show progress bars.
        overwrite: replace an existing --output or --valid_output file.
    """
    if near_dup and not smart:
        raise UserError("--near_dup works with --smart: add --smart")
    inputs = _as_list(input, "--input")
    sources = get_sources([str(p) for p in inputs], _as_list(num_samples, "--num_samples"),
                          _as_list(ratio, "--ratio"))
    options = SmartOptions(min_prompt_chars, max_prompt_chars, min_response_chars, max_response_chars,
                           near_dup, near_dup_threshold) if smart else None
    report = sample_parquet(sources, str(output), valid_output=valid_output and str(valid_output),
                            valid_samples=valid_samples or 0, smart=options, seed=seed,
                            row_group_size=row_group_size, progress=progress, overwrite=overwrite)
    print(report.format())


if __name__ == "__main__":
    run_cli(main, "sample_training_data.py")
