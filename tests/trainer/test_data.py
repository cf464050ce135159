"""Data validation and tokenization: fail fast with clear messages, mask prompts from the loss."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from devcluster import tiny
from kubetune_contract.config import DatasetSpec
from kubetune_trainer import data
from kubetune_trainer.errors import InvalidInput

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def tokenizer(assets: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets / "backbone"))


def spec(**fields: object) -> DatasetSpec:
    return DatasetSpec.model_validate({"train": "unused.jsonl", **fields})


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_prompt_tokens_are_masked_and_answer_tokens_are_labels(tokenizer: object, template: str) -> None:
    example = data.Example(prompt="reverse : red cat dog", answer="dog cat red")
    [sample] = data.tokenize([example], spec(template=template), tokenizer)  # type: ignore[arg-type]
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]  # type: ignore[operator,attr-defined]
    n_prompt = len(sample.input_ids) - len(answer_ids)
    assert n_prompt > 3
    assert sample.labels[:n_prompt] == [data.IGNORE_INDEX] * n_prompt
    assert sample.labels[n_prompt:] == answer_ids == sample.input_ids[n_prompt:]


# The whole rendered sample, system text included: "system" alone would also match the chat
# template's own <|system|> token, so each system text is made of words the tiny tokenizer knows.
RENDERED = {
    "chat": "<s> <|system|> {system} <|user|> {prompt} <|assistant|> {answer} </s>",
    "plain": "<s> {system} ### Instruction: {prompt} ### Response: {answer} </s>",
}


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_system_column_wins_over_system_prompt_and_is_masked(tmp_path: Path, tokenizer: object, template: str) -> None:
    path = tmp_path / "train.jsonl"
    column_text, prompt_text = "you are a helpful assistant .", "you are a capital assistant ."
    rows = [{"prompt": "capital of peru ?", "answer": "lima", "sys": column_text},
            {"prompt": "capital of chile ?", "answer": "santiago", "sys": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = spec(systemColumn="sys", systemPrompt=prompt_text, template=template)
    examples = data.load_examples(path, dataset)
    assert [e.system for e in examples] == [column_text, prompt_text]
    chat = data.use_chat_template(dataset, tokenizer)  # type: ignore[arg-type]
    assert chat == (template == "chat")
    for example, system in zip(examples, (column_text, prompt_text), strict=True):
        assert system in data.format_prompt(example, dataset, tokenizer, chat)  # type: ignore[arg-type]
    first, second = data.tokenize(examples, dataset, tokenizer)  # type: ignore[arg-type]
    for sample, row, system in ((first, rows[0], column_text), (second, rows[1], prompt_text)):
        expected = RENDERED[template].format(system=system, prompt=row["prompt"], answer=row["answer"])
        assert tokenizer.decode(sample.input_ids) == expected  # type: ignore[attr-defined]
    n_answer = sum(label != data.IGNORE_INDEX for label in first.labels)
    assert n_answer == 2  # "lima" and EOS


def test_mask_prompt_false_trains_on_every_token(tokenizer: object) -> None:
    [sample] = data.tokenize([data.Example("capital of peru ?", "lima")], spec(maskPrompt=False), tokenizer)  # type: ignore[arg-type]
    assert sample.labels == sample.input_ids


def test_long_samples_are_truncated_and_counted(tokenizer: object, caplog: pytest.LogCaptureFixture) -> None:
    long = data.Example("reverse : " + " ".join(tiny.WORDS * 3), "red")
    samples = data.tokenize([long, data.Example("capital of peru ?", "lima")], spec(maxLength=16), tokenizer)  # type: ignore[arg-type]
    assert all(len(s.input_ids) <= 16 for s in samples)
    assert "1 of 2 samples were longer than maxLength=16" in caplog.text


def test_packing_keeps_samples_whole_with_their_own_positions_and_masks(tokenizer: object) -> None:
    examples = [data.Example(r["prompt"], r["answer"]) for r in tiny.make_rows(20)]
    samples = data.tokenize(examples, spec(), tokenizer)  # type: ignore[arg-type]
    blocks = data.pack(samples, 32)
    assert len(blocks) < len(samples) and all(len(b.input_ids) <= 32 for b in blocks)
    unpacked = []
    for block in blocks:
        assert block.position_ids is not None
        starts = [i for i, p in enumerate(block.position_ids) if p == 0] + [len(block.input_ids)]
        for a, b in itertools.pairwise(starts):
            assert block.position_ids[a:b] == list(range(b - a))
            unpacked.append((block.input_ids[a:b], block.labels[a + 1 : b]))
    # The same samples in the same order, every label kept but each sample's first (never predicted).
    assert unpacked == [(s.input_ids, s.labels[1:]) for s in samples]
    assert all(b.labels[a] == data.IGNORE_INDEX for b in blocks for a, p in enumerate(b.position_ids or []) if p == 0)


def test_collate_keeps_packed_samples_from_attending_to_each_other() -> None:
    block = data.Sample([5, 6, 7, 8, 9], [-100, 6, -100, 8, 9], [0, 1, 0, 1, 2])
    batch = data.collate([block, data.Sample([5, 6], [-100, 6], [0, 1])], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 0, 0]]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1],
    ]
    assert mask[1, 0, 1].int().tolist() == [1, 1, 0, 0, 0] and mask[1, 0, 3].int().tolist() == [0, 0, 0, 1, 0]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_formats_are_detected_from_the_extension(tmp_path: Path, suffix: str) -> None:
    path = tiny.write_dataset(tmp_path / f"train{suffix}", 5)
    examples = data.load_examples(path, spec())
    assert [(e.prompt, e.answer) for e in examples] == [(r["prompt"], r["answer"]) for r in tiny.make_rows(5)]


def test_missing_column_names_the_file_the_column_and_the_columns_present(tmp_path: Path) -> None:
    path = tiny.write_dataset(tmp_path / "train.csv", 5)
    with pytest.raises(InvalidInput) as err:
        data.load_examples(path, spec(answerColumn="response"))
    message = str(err.value)
    assert str(path) in message and "'response'" in message and "dataset.answerColumn" in message
    assert "['prompt', 'answer']" in message


def test_non_text_value_names_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n" + json.dumps({"prompt": "c", "answer": 7}) + "\n")
    with pytest.raises(InvalidInput, match=r"row 2, column 'answer'.*expected text, got int"):
        data.load_examples(path, spec())


def test_empty_and_unreadable_files_are_invalid(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InvalidInput, match="empty"):
        data.load_examples(empty, spec())
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(InvalidInput, match=f"{broken}: cannot read as parquet"):
        data.load_examples(broken, spec())
    with pytest.raises(InvalidInput, match="format from the extension"):
        data.load_examples(tmp_path / "train.txt", spec())


def test_validation_split_is_seeded_and_disjoint() -> None:
    examples = [data.Example(r["prompt"] + str(i), r["answer"]) for i, r in enumerate(tiny.make_rows(50))]
    train, validation = data.split_examples(examples, 0.2, seed=3)
    assert len(validation) == 10 and len(train) == 40
    assert not set(train) & set(validation)
    assert data.split_examples(examples, 0.2, seed=3) == (train, validation)
    assert data.split_examples(examples, 0.2, seed=4) != (train, validation)


def test_a_data_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "p" * 500, "answer": "a"}) + "\n")
    monkeypatch.setenv("KUBETUNE_MAX_DATA_BYTES", "100")
    with pytest.raises(InvalidInput, match=r"train.jsonl: \d+ bytes, more than KUBETUNE_MAX_DATA_BYTES \(100\)"):
        data.read_rows(path, "auto")
    monkeypatch.setenv("KUBETUNE_MAX_DATA_BYTES", "lots")
    with pytest.raises(InvalidInput, match="KUBETUNE_MAX_DATA_BYTES: expected a positive number"):
        data.read_rows(path, "auto")


def test_a_parquet_file_that_decompresses_past_the_limit_is_refused(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # 2 MB of one repeated character: a few KB on disk, 2 MB once decompressed.
    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"prompt": ["x" * 1_000_000, "y" * 1_000_000], "answer": ["a", "b"]}), path,
                   compression="zstd")
    assert path.stat().st_size < 100_000
    monkeypatch.setenv("KUBETUNE_MAX_DATA_BYTES", "1000000")
    with pytest.raises(InvalidInput, match=r"bomb.parquet: decompresses to \d+ bytes, more than"):
        data.read_rows(path, "auto")
    monkeypatch.setenv("KUBETUNE_MAX_DATA_BYTES", "10000000")
    assert len(data.read_rows(path, "auto")) == 2
