"""Instruction data: read and validate files, format prompts, tokenize with label masking, pack.

Validation (:func:`load_examples`) needs no tokenizer and no model, so a wrong column or an empty
file fails the run in seconds, before any weights are downloaded or loaded.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_contract.config import DatasetSpec, TrainerConfig

from . import sources
from .errors import InvalidInput

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that do not count in the loss (prompt tokens, padding)."""

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class Example:
    """One validated row."""

    prompt: str
    answer: str
    system: str | None = None


@dataclass
class Sample:
    """One tokenized training sample; ``labels`` is ``IGNORE_INDEX`` where the loss is not taken."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    """Set on packed blocks only: each packed sample's positions, restarting at 0."""


def detect_format(path: Path, fmt: str, name: str | None = None) -> str:
    """The file format: ``fmt`` unless it is ``auto``, else from the extension."""
    if fmt != "auto":
        return fmt
    found = _EXTENSIONS.get(path.suffix.lower())
    if found is None:
        raise InvalidInput(
            f"{name or path}: cannot tell the format from the extension {path.suffix!r}; "
            "use .jsonl, .csv or .parquet, or set dataset.format"
        )
    return found


def read_rows(path: Path, fmt: str, name: str | None = None) -> list[dict[str, Any]]:
    """Read every row of a JSONL, CSV or Parquet file as a dict; ``name`` names it in errors."""
    name = name or str(path)
    if path.is_dir():
        raise InvalidInput(f"{name}: is a directory, expected a data file")
    fmt = detect_format(path, fmt, name)
    limit = max_data_bytes()
    size = path.stat().st_size
    if size > limit:
        raise InvalidInput(f"{name}: {size} bytes, more than KUBETUNE_MAX_DATA_BYTES ({limit}); split the data")
    if fmt == "parquet":
        _check_parquet_size(path, name, limit)
    try:
        if fmt == "jsonl":
            return _read_jsonl(path, name)
        if fmt == "csv":
            with path.open(newline="", encoding="utf-8") as fh:
                return list(csv.DictReader(fh))
        import pyarrow.parquet as pq

        return list(pq.read_table(path).to_pylist())
    except InvalidInput:
        raise
    except Exception as err:  # OSError, UnicodeDecodeError, csv.Error, pyarrow's ArrowInvalid, …
        raise InvalidInput(f"{name}: cannot read as {fmt}: {err}") from err


DEFAULT_MAX_DATA_BYTES = 16 * 1024**3


def max_data_bytes() -> int:
    """The largest data file the trainer reads (it reads a file whole): KUBETUNE_MAX_DATA_BYTES,
    16 GiB by default; for Parquet, the size once decompressed."""
    value = os.environ.get("KUBETUNE_MAX_DATA_BYTES", "").strip()
    if not value:
        return DEFAULT_MAX_DATA_BYTES
    if not value.isdigit() or int(value) < 1:
        raise InvalidInput(f"KUBETUNE_MAX_DATA_BYTES: expected a positive number of bytes, got {value!r}")
    return int(value)


def _check_parquet_size(path: Path, name: str, limit: int) -> None:
    """Refuse a Parquet file whose columns decompress to more than `limit` bytes (from its footer,
    before any page is read): a small file must not expand into all of the pod's memory."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as err:  # ArrowInvalid and friends: not a Parquet file
        raise InvalidInput(f"{name}: cannot read as parquet: {err}") from err
    expanded = sum(meta.row_group(i).column(j).total_uncompressed_size
                   for i in range(meta.num_row_groups) for j in range(meta.num_columns))
    if expanded > limit:
        raise InvalidInput(f"{name}: decompresses to {expanded} bytes, more than KUBETUNE_MAX_DATA_BYTES ({limit})")


def _read_jsonl(path: Path, name: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInput(f"{name}: line {number} is not valid JSON: {err.msg}") from err
            if not isinstance(row, dict):
                raise InvalidInput(f"{name}: line {number} is not a JSON object")
            rows.append(row)
    return rows


def column_names(present: list[Any], limit: int = 20, longest: int = 40) -> str:
    """The columns of a file, for a message that lands in status: at most `limit` names of at most
    `longest` characters, so a file that is not a data file cannot be echoed through its header."""
    names = [str(c) if len(str(c)) <= longest else str(c)[:longest] + "…" for c in present[:limit]]
    return repr(names) + (f" and {len(present) - limit} more" if len(present) > limit else "")


def load_examples(path: Path, spec: DatasetSpec, name: str | None = None) -> list[Example]:
    """Read ``path`` and check it: columns present, at least one row, text values only.

    ``name`` is how the file is called in messages (its source URI); the local path by default.
    """
    name = name or str(path)
    rows = read_rows(path, spec.format, name)
    if not rows:
        raise InvalidInput(f"{name}: the dataset is empty (no rows)")
    present = list(rows[0].keys())
    wanted = [("dataset.promptColumn", spec.prompt_column), ("dataset.answerColumn", spec.answer_column)]
    if spec.system_column:
        wanted.append(("dataset.systemColumn", spec.system_column))
    for field, column in wanted:
        if column not in present:
            raise InvalidInput(
                f"{name}: column {column!r} ({field}) not found; the file has columns {column_names(present)}"
            )
    examples: list[Example] = []
    for number, row in enumerate(rows, start=1):
        values = {}
        for field, column in wanted:
            value = row.get(column)
            if not isinstance(value, str):
                raise InvalidInput(
                    f"{name}: row {number}, column {column!r} ({field}): expected text, "
                    f"got {type(value).__name__} {value!r:.60}"
                )
            values[field] = value
        system = values.get("dataset.systemColumn") or spec.system_prompt
        examples.append(Example(values["dataset.promptColumn"], values["dataset.answerColumn"], system))
    return examples


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples (at least one) for evaluation, in a seeded order."""
    if len(examples) < 2:
        raise InvalidInput(
            f"cannot hold out a validation split from {len(examples)} example(s); "
            "add rows or set dataset.validation"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(examples) * fraction))
    validation = [examples[i] for i in sorted(order[:held])]
    train = [examples[i] for i in sorted(order[held:])]
    return train, validation


def use_chat_template(spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether rows are formatted with the tokenizer's chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if spec.template == "chat" and not has_template:
        raise InvalidInput("dataset.template is chat, but the tokenizer has no chat template")
    return spec.template == "chat" or (spec.template == "auto" and has_template)


def format_prompt(example: Example, spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase, chat: bool) -> str:
    """The text the model sees before the answer."""
    if chat:
        user = {"role": "user", "content": example.prompt}
        if not example.system:
            return str(tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True))
        system_message = {"role": "system", "content": example.system}
        try:
            text = tokenizer.apply_chat_template(
                [system_message, user], tokenize=False, add_generation_prompt=True
            )
        except Exception:  # some templates (Gemma, Mistral) reject a system role
            merged = {"role": "user", "content": f"{example.system}\n\n{example.prompt}"}
            text = tokenizer.apply_chat_template([merged], tokenize=False, add_generation_prompt=True)
        return str(text)
    system = f"{example.system}\n\n" if example.system else ""
    return spec.prompt_format.replace("{system}", system).replace("{prompt}", example.prompt)


def prompt_ids(example: Example, spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase, chat: bool) -> list[int]:
    """Token ids of the prompt, with the BOS token where the tokenizer has one."""
    text = format_prompt(example, spec, tokenizer, chat)
    ids: list[int] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


@dataclass
class Tokenized:
    """Tokenized samples, and what tokenizing found: each row's full length, truncated and dropped rows."""

    samples: list[Sample]
    lengths: list[int]
    """Tokens of every row, template applied, before truncation."""
    truncated: int
    dropped: int


def tokenize(
    examples: list[Example], spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase
) -> list[Sample]:
    """Tokenize prompt and answer separately, so the prompt/answer boundary is exact for masking.

    Samples longer than ``maxLength`` are truncated (counted and logged); a sample left with no
    answer token is dropped (counted and logged).
    """
    return tokenize_counted(examples, spec, tokenizer).samples


def tokenize_counted(examples: list[Example], spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase) -> Tokenized:
    """:func:`tokenize`, with the counts."""
    chat = use_chat_template(spec, tokenizer)
    eos = tokenizer.eos_token_id
    samples: list[Sample] = []
    lengths: list[int] = []
    truncated = dropped = 0
    for example in examples:
        prompt = prompt_ids(example, spec, tokenizer, chat)
        answer = list(tokenizer(example.answer, add_special_tokens=False)["input_ids"])
        if eos is not None:
            answer.append(eos)
        input_ids = prompt + answer
        labels = ([IGNORE_INDEX] * len(prompt) if spec.mask_prompt else list(prompt)) + answer
        lengths.append(len(input_ids))
        if len(input_ids) > spec.max_length:
            truncated += 1
            input_ids, labels = input_ids[: spec.max_length], labels[: spec.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        samples.append(Sample(input_ids, labels))
    if truncated:
        log.warning("%d of %d samples were longer than maxLength=%d and were truncated",
                    truncated, len(examples), spec.max_length)
    if dropped:
        log.warning("%d samples had no answer token left after truncation and were dropped", dropped)
    if not samples:
        raise InvalidInput(
            f"no usable sample: all {len(examples)} prompts fill dataset.maxLength={spec.max_length}"
        )
    return Tokenized(samples, lengths, truncated, dropped)


def render_samples(samples: list[Sample], tokenizer: PreTrainedTokenizerBase) -> str:
    """samples.txt: samples as the model sees them (template applied), the part without loss (the
    masked prompt) between [masked] and [/masked], so a person can check the template."""
    import itertools

    parts = []
    for i, sample in enumerate(samples, 1):
        text: list[str] = []
        pairs = zip(sample.input_ids, sample.labels, strict=True)
        for masked, run in itertools.groupby(pairs, key=lambda pair: pair[1] == IGNORE_INDEX):
            decoded = str(tokenizer.decode([token for token, _ in run], skip_special_tokens=False))
            text.append(f"[masked]{decoded}[/masked]" if masked else decoded)
        masked_count = sum(label == IGNORE_INDEX for label in sample.labels)
        parts.append(f"--- sample {i}: {len(sample.input_ids)} tokens, {masked_count} without loss ([masked]) ---\n"
                     + " ".join(text) + "\n")
    return "\n".join(parts)


def pack(samples: list[Sample], max_length: int) -> list[Sample]:
    """Put whole samples, in order, into blocks of at most ``max_length`` tokens.

    No sample is split between blocks. Inside a block each sample keeps its own positions
    (``position_ids`` restart at 0) and, through :func:`collate`, attends only to itself; the
    first label of each sample is ignored, as it would be unpacked (nothing before it predicts it).
    So a packed block trains exactly as its samples would one by one, without padding.
    """
    blocks: list[Sample] = []
    current = Sample([], [], [])
    for sample in samples:
        if current.input_ids and len(current.input_ids) + len(sample.input_ids) > max_length:
            blocks.append(current)
            current = Sample([], [], [])
        assert current.position_ids is not None
        current.input_ids.extend(sample.input_ids)
        current.labels.extend([IGNORE_INDEX, *sample.labels[1:]])
        current.position_ids.extend(range(len(sample.input_ids)))
    if current.input_ids:
        blocks.append(current)
    return [b for b in blocks if any(label != IGNORE_INDEX for label in b.labels[1:])]


def collate(batch: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sample; padding is masked from attention and loss.

    Packed blocks (with ``position_ids``) also get ``position_ids`` and a 4-D boolean attention
    mask (batch, 1, query, key): causal inside each packed sample, nothing across samples.
    """
    import torch

    width = max(len(s.input_ids) for s in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, sample in enumerate(batch):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        attention[row, :n] = 1
    if all(s.position_ids is None for s in batch):
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    # Which packed sample each token belongs to; padding gets its own id per token.
    segments = -torch.arange(1, width + 1).repeat(len(batch), 1)
    for row, sample in enumerate(batch):
        pos = sample.position_ids if sample.position_ids is not None else list(range(len(sample.input_ids)))
        n = len(pos)
        positions[row, :n] = torch.tensor(pos)
        segments[row, :n] = torch.cumsum((positions[row, :n] == 0).long(), 0)
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    mask = (same & causal)[:, None]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "position_ids": positions}


@dataclass
class Datasets:
    train: list[Example]
    validation: list[Example]


def load_datasets(config: TrainerConfig) -> Datasets:
    """Fetch and validate the data files; needs no tokenizer or model."""
    spec, storage = config.dataset, config.storage
    train_path = sources.resolve(spec.train, storage)
    train = load_examples(train_path, spec, spec.train)
    if spec.validation:
        validation = load_examples(sources.resolve(spec.validation, storage), spec, spec.validation)
    else:
        train, validation = split_examples(train, spec.validation_split, config.training.seed)
    log.info("data: %d training and %d validation examples", len(train), len(validation))
    return Datasets(train, validation)
