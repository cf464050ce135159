"""Instruction data: read and validate files, format prompts, tokenize with label masking, pack.

Three shapes of row: prompt/answer columns, a conversation (dataset.messagesColumn: the loss on the
assistant turns) and, for the preference methods, prompt/chosen/rejected (each text or messages).

Validation (:func:`load_examples`) needs no tokenizer and no model, so a wrong column or an empty
file fails the run in seconds, before any weights are downloaded or loaded.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from kubetune_contract.config import DatasetSpec, TrainerConfig
from kubetune_contract.events import DataLineage

from . import lineage, sources
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


Conversation = tuple[tuple[str, str], ...]
"""Chat messages as (role, content) pairs."""
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One validated row: a prompt and its answer, or a conversation."""

    prompt: str
    answer: str
    system: str | None = None
    turns: Conversation | None = None
    """A conversation (system first, optional; user and assistant in turn, ending with the
    assistant): the loss is taken on every assistant turn; ``prompt`` and ``answer`` are its last
    user and assistant turns (the answer generated and scored in evaluation)."""
    source: str = ""
    """The file and row, for messages about it."""


@dataclass(frozen=True)
class PreferenceExample:
    """One validated preference row: a prompt, and a chosen and a rejected answer to it; each is text or
    messages (the prompt's ending with the user's turn, the answers' the assistant's)."""

    prompt: str | Conversation
    chosen: str | Conversation
    rejected: str | Conversation
    system: str | None = None
    source: str = ""
    """The file and row, for messages about it."""

    def as_example(self) -> Example:
        """The prompt with its chosen answer: what evaluation generates for and scores against."""
        if isinstance(self.prompt, str) and isinstance(self.chosen, str):
            return Example(self.prompt, self.chosen, self.system)
        turns = conversation(self.prompt, self.system) + answer_turns(self.chosen)
        return conversation_example(turns, self.source)


def conversation(prompt: str | Conversation, system: str | None) -> Conversation:
    """A prompt as messages: text becomes one user turn; the system prompt goes first unless the
    messages have one."""
    turns: Conversation = (("user", prompt),) if isinstance(prompt, str) else prompt
    if system and not (turns and turns[0][0] == "system"):
        turns = (("system", system), *turns)
    return turns


def answer_turns(answer: str | Conversation) -> Conversation:
    return (("assistant", answer),) if isinstance(answer, str) else answer


def conversation_example(turns: Conversation, source: str = "") -> Example:
    """An Example of a checked conversation (it ends with the assistant's turn after a user's)."""
    system = turns[0][1] if turns[0][0] == "system" else None
    return Example(turns[-2][1], turns[-1][1], system, turns, source)


@dataclass
class Sample:
    """One tokenized training sample; ``labels`` is ``IGNORE_INDEX`` where the loss is not taken."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    """Set on packed blocks only: each packed sample's positions, restarting at 0."""

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class Pair:
    """One tokenized preference pair: the prompt with the chosen answer, and with the rejected one
    (the same prompt tokens); labels are IGNORE_INDEX on the prompt."""

    chosen: Sample
    rejected: Sample

    @property
    def tokens(self) -> int:
        return self.chosen.tokens + self.rejected.tokens


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


def read_table(path: Path, spec: DatasetSpec, name: str, wanted: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The rows of ``path``, checked to be there and to have the ``wanted`` (field, column) columns."""
    rows = read_rows(path, spec.format, name)
    if not rows:
        raise InvalidInput(f"{name}: the dataset is empty (no rows)")
    present = list(rows[0].keys())
    for field, column in wanted:
        if column not in present:
            raise InvalidInput(
                f"{name}: column {column!r} ({field}) not found; the file has columns {column_names(present)}"
            )
    return rows


def text_value(row: dict[str, Any], field: str, column: str, where: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise InvalidInput(f"{where}, column {column!r} ({field}): expected text, got {type(value).__name__} "
                           f"{value!r:.60}")
    return value


def messages_value(value: Any, field: str, column: str, where: str, json_text: bool) -> Conversation:
    """A list of {role, content} messages (``json_text``: a CSV cell, which holds it as JSON text)."""
    at = f"{where}, column {column!r} ({field})"
    if json_text and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise InvalidInput(f"{at}: not a JSON list of messages: {err.msg}") from err
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"{at}: expected a non-empty list of {{role, content}} messages, got "
                           f"{type(value).__name__} {value!r:.60}")
    turns = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise InvalidInput(f"{at}: message {i} is not a {{role, content}} object with text content")
        if message.get("role") not in ROLES:
            raise InvalidInput(f"{at}: message {i} has role {message.get('role')!r:.40}; expected one of "
                               f"{', '.join(ROLES)}")
        turns.append((str(message["role"]), str(message["content"])))
    return tuple(turns)


def check_roles(turns: Conversation, last: str, where: str) -> None:
    """System first (optional), then user and assistant in turn from the user, ending with ``last``."""
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    for i, (role, _) in enumerate(body):
        expected = ("user", "assistant")[i % 2]
        if role != expected:
            position = i + 1 + (len(turns) - len(body))
            raise InvalidInput(f"{where}: roles out of order: message {position} is {role}, expected {expected} "
                               "(system first, optional; then user and assistant in turn)")
    if not body or body[-1][0] != last:
        raise InvalidInput(f"{where}: the messages must end with the {last}'s turn")


def load_examples(path: Path, spec: DatasetSpec, name: str | None = None) -> list[Example]:
    """Read ``path`` and check it: columns present, at least one row, text values only (messages for
    dataset.messagesColumn, in a valid order of roles).

    ``name`` is how the file is called in messages (its source URI); the local path by default.
    """
    name = name or str(path)
    if spec.messages_column:
        rows = read_table(path, spec, name, [("dataset.messagesColumn", spec.messages_column)])
        csv_text = detect_format(path, spec.format, name) == "csv"
        examples = []
        for number, row in enumerate(rows, start=1):
            where = f"{name}: row {number}"
            turns = messages_value(row.get(spec.messages_column), "dataset.messagesColumn", spec.messages_column,
                                   where, csv_text)
            check_roles(turns, "assistant", where)
            examples.append(conversation_example(conversation(turns, spec.system_prompt), where))
        return examples
    wanted = [("dataset.promptColumn", spec.prompt_column), ("dataset.answerColumn", spec.answer_column)]
    if spec.system_column:
        wanted.append(("dataset.systemColumn", spec.system_column))
    rows = read_table(path, spec, name, wanted)
    examples = []
    for number, row in enumerate(rows, start=1):
        values = {field: text_value(row, field, column, f"{name}: row {number}") for field, column in wanted}
        system = values.get("dataset.systemColumn") or spec.system_prompt
        examples.append(Example(values["dataset.promptColumn"], values["dataset.answerColumn"], system))
    return examples


@dataclass
class Pairs:
    """The usable preference rows of a file, and how many were skipped (equal or empty answers)."""

    examples: list[PreferenceExample]
    skipped: int


def load_pairs(path: Path, spec: DatasetSpec, name: str | None = None) -> Pairs:
    """Read and check preference rows: prompt, chosen and rejected columns, each text or messages.
    Rows whose answers are equal, or either empty, are skipped (counted, and logged); none left is
    an error."""
    name = name or str(path)
    wanted = [("dataset.promptColumn", spec.prompt_column), ("dataset.chosenColumn", spec.chosen_column),
              ("dataset.rejectedColumn", spec.rejected_column)]
    system_column = [("dataset.systemColumn", spec.system_column)] if spec.system_column else []
    rows = read_table(path, spec, name, wanted + system_column)
    csv_text = detect_format(path, spec.format, name) == "csv"
    examples, skipped = [], 0
    for number, row in enumerate(rows, start=1):
        where = f"{name}: row {number}"
        values: dict[str, str | Conversation] = {}
        for field, column in wanted:
            value = row.get(column)
            text = isinstance(value, str) and not (csv_text and value.lstrip().startswith("["))
            values[field] = str(value) if text else messages_value(value, field, column, where, csv_text)
        system = next((text_value(row, f, c, where) for f, c in system_column), None) or spec.system_prompt
        prompt = values["dataset.promptColumn"]
        for answer in ("dataset.chosenColumn", "dataset.rejectedColumn"):
            check_roles(conversation(prompt, system) + answer_turns(values[answer]), "assistant", f"{where} ({answer})")
        chosen, rejected = values["dataset.chosenColumn"], values["dataset.rejectedColumn"]
        if chosen == rejected or not answer_text(chosen).strip() or not answer_text(rejected).strip():
            skipped += 1
            continue
        examples.append(PreferenceExample(prompt, chosen, rejected, system, where))
    if skipped:
        log.warning("%s: %d of %d rows skipped: the chosen and rejected answers are equal, or one is empty",
                    name, skipped, len(rows))
    if not examples:
        raise InvalidInput(f"{name}: no usable preference pair: in all {len(rows)} rows the chosen and rejected "
                           "answers are equal, or one is empty")
    return Pairs(examples, skipped)


def answer_text(answer: str | Conversation) -> str:
    return answer if isinstance(answer, str) else "".join(content for _, content in answer)


E = TypeVar("E")


def split_examples(examples: list[E], fraction: float, seed: int) -> tuple[list[E], list[E]]:
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


def render_chat(tokenizer: PreTrainedTokenizerBase, turns: Conversation, generation_prompt: bool, where: str) -> str:
    """``turns`` as the tokenizer's chat template writes them; a template that fails names the row."""
    try:
        text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2's TemplateError, raise_exception() in the template, …
        raise InvalidInput(f"{where}: the tokenizer's chat template cannot render it: {str(err)[:200]}") from err
    return str(text)


def require_chat(chat: bool, where: str) -> None:
    if not chat:
        raise InvalidInput(f"{where}: messages need the tokenizer's chat template (dataset.template auto or chat, "
                           "and a tokenizer that has one)")


def format_prompt(example: Example, spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase, chat: bool) -> str:
    """The text the model sees before the answer (for a conversation: before its last answer)."""
    if example.turns is not None:
        require_chat(chat, example.source or "a conversation")
        return render_chat(tokenizer, example.turns[:-1], True, example.source)
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


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def with_bos(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``ids`` starting with the BOS token where the tokenizer has one."""
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids


def prompt_ids(example: Example, spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase, chat: bool) -> list[int]:
    """Token ids of the prompt, with the BOS token where the tokenizer has one."""
    return with_bos(text_ids(tokenizer, format_prompt(example, spec, tokenizer, chat)), tokenizer)


def answer_ids(answer: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a text answer, ending with the EOS token where the tokenizer has one."""
    eos = tokenizer.eos_token_id
    return text_ids(tokenizer, answer) + ([eos] if eos is not None else [])


def conversation_segments(turns: Conversation, tokenizer: PreTrainedTokenizerBase,
                          where: str) -> list[tuple[str, bool]]:
    """A conversation's text in pieces, each marked whether the loss is taken on it: the assistant
    turns, as the chat template writes each (the text it adds to the conversation so far after the
    generation prompt). A template that does not extend its own rendering turn by turn is refused."""
    full = render_chat(tokenizer, turns, False, where)
    segments: list[tuple[str, bool]] = []
    done = 0
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = render_chat(tokenizer, turns[:i], True, where)
        through = render_chat(tokenizer, turns[: i + 1], False, where)
        if len(before) < done or not through.startswith(before) or not full.startswith(through):
            raise InvalidInput(f"{where}: the chat template does not render message {i + 1} (assistant) as a "
                               "continuation of the messages before it, so its tokens cannot be told apart; "
                               "use dataset.template plain with prompt/answer columns, or another template")
        segments += [(full[done:len(before)], False), (full[len(before):len(through)], True)]
        done = len(through)
    segments.append((full[done:], False))
    return [(text, trained) for text, trained in segments if text]


def conversation_sample(turns: Conversation, spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase,
                        where: str) -> Sample:
    """A conversation tokenized piece by piece: labels on the assistant turns (every token with
    dataset.maskPrompt false)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in conversation_segments(turns, tokenizer, where):
        ids = text_ids(tokenizer, text)
        input_ids += ids
        labels += ids if trained or not spec.mask_prompt else [IGNORE_INDEX] * len(ids)
    full = with_bos(input_ids, tokenizer)
    if len(full) > len(input_ids):
        labels = [IGNORE_INDEX, *labels]
    return Sample(full, labels)


T = TypeVar("T", "Sample", "Pair")


@dataclass
class Tokenized(Generic[T]):
    """Tokenized samples (or pairs), and what tokenizing found: each row's full length, truncated and
    dropped rows."""

    samples: list[T]
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


def tokenize_counted(examples: list[Example], spec: DatasetSpec,
                     tokenizer: PreTrainedTokenizerBase) -> Tokenized[Sample]:
    """:func:`tokenize`, with the counts."""
    chat = use_chat_template(spec, tokenizer)
    samples: list[Sample] = []
    lengths: list[int] = []
    truncated = dropped = 0
    for number, example in enumerate(examples, start=1):
        if example.turns is not None:
            where = example.source or f"conversation {number}"
            require_chat(chat, where)
            sample = conversation_sample(example.turns, spec, tokenizer, where)
            input_ids, labels = sample.input_ids, sample.labels
        else:
            prompt = prompt_ids(example, spec, tokenizer, chat)
            answer = answer_ids(example.answer, tokenizer)
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


def pair_ids(example: PreferenceExample, spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase, chat: bool,
             where: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the prompt, the chosen and the rejected answer. Text throughout: the prompt as
    for sft, each answer followed by EOS. Messages anywhere: the chat template's rendering, each
    answer being what it adds after the prompt's generation prompt."""
    prompt, chosen, rejected = example.prompt, example.chosen, example.rejected
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return (prompt_ids(Example(prompt, "", example.system), spec, tokenizer, chat), answer_ids(chosen, tokenizer),
                answer_ids(rejected, tokenizer))
    require_chat(chat, where)
    turns = conversation(example.prompt, example.system)
    before = render_chat(tokenizer, turns, True, where)
    answers = []
    for answer in (example.chosen, example.rejected):
        full = render_chat(tokenizer, turns + answer_turns(answer), False, where)
        if not full.startswith(before):
            raise InvalidInput(f"{where}: the chat template does not render the answer as a continuation of the "
                               "prompt, so its tokens cannot be told apart")
        answers.append(text_ids(tokenizer, full[len(before):]))
    return with_bos(text_ids(tokenizer, before), tokenizer), answers[0], answers[1]


def tokenize_pairs(examples: list[PreferenceExample], spec: DatasetSpec,
                   tokenizer: PreTrainedTokenizerBase) -> Tokenized[Pair]:
    """Tokenize preference rows into pairs that share the prompt's tokens. A pair longer than
    maxLength keeps its answers and loses the start of its prompt (the BOS token stays); answers
    that alone leave less than a quarter of maxLength to the prompt are cut at the end."""
    chat = use_chat_template(spec, tokenizer)
    bos, limit = tokenizer.bos_token_id, spec.max_length
    pairs: list[Pair] = []
    lengths: list[int] = []
    truncated = 0
    for number, example in enumerate(examples, start=1):
        prompt, chosen, rejected = pair_ids(example, spec, tokenizer, chat, example.source or f"pair {number}")
        longest = max(len(chosen), len(rejected))
        lengths.append(len(prompt) + longest)
        if len(prompt) + longest > limit:
            truncated += 1
            keep = max(limit - longest, min(len(prompt), limit // 4))
            head = prompt[:1] if bos is not None and prompt[:1] == [bos] else []
            prompt = head + prompt[len(prompt) - (keep - len(head)):] if keep > len(head) else prompt[:keep]
            chosen, rejected = chosen[: limit - len(prompt)], rejected[: limit - len(prompt)]
        masked = [IGNORE_INDEX] * len(prompt)
        pairs.append(Pair(Sample(prompt + chosen, masked + chosen), Sample(prompt + rejected, masked + rejected)))
    if truncated:
        log.warning("%d of %d preference pairs were longer than maxLength=%d: their prompts were cut from the start",
                    truncated, len(examples), limit)
    return Tokenized(pairs, lengths, truncated, 0)


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
    """For the preference methods: each pair's prompt with its chosen answer (evaluation generates
    for these)."""
    train_pairs: list[PreferenceExample] | None = None
    validation_pairs: list[PreferenceExample] | None = None
    skipped: int = 0
    """Preference rows of the training file skipped: equal or empty answers."""
    files: list[DataLineage] = dataclasses.field(default_factory=list)
    """The files read, with their sha256 (the run's lineage)."""


def load_datasets(config: TrainerConfig) -> Datasets:
    """Fetch and validate the data files; needs no tokenizer or model."""
    spec, storage = config.dataset, config.storage
    train_path = sources.resolve(spec.train, storage)
    validation_path = sources.resolve(spec.validation, storage) if spec.validation else None
    files = [lineage.data_file("train", spec.train, train_path)]
    if validation_path is not None:
        files.append(lineage.data_file("validation", str(spec.validation), validation_path))
    if config.preference_tuning:
        loaded = load_pairs(train_path, spec, spec.train)
        pairs = loaded.examples
        if validation_path is not None:
            held = load_pairs(validation_path, spec, spec.validation).examples
        else:
            pairs, held = split_examples(pairs, spec.validation_split, config.training.seed)
        log.info("data: %d training and %d validation preference pairs", len(pairs), len(held))
        return Datasets([p.as_example() for p in pairs], [p.as_example() for p in held], pairs, held, loaded.skipped,
                        files)
    train = load_examples(train_path, spec, spec.train)
    if validation_path is not None:
        validation = load_examples(validation_path, spec, spec.validation)
    else:
        train, validation = split_examples(train, spec.validation_split, config.training.seed)
    log.info("data: %d training and %d validation examples", len(train), len(validation))
    return Datasets(train, validation, files=files)
