"""Preference rows and conversations: reading, checking, tokenizing and masking, on the tiny
backbone's tokenizer and chat template (no model is loaded)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from devcluster import tiny
from kubetune_contract.config import DatasetSpec
from kubetune_trainer import data
from kubetune_trainer.__main__ import main
from kubetune_trainer.errors import InvalidInput
from tests.support.trainer import tiny_config

pytestmark = pytest.mark.trainer

CONVERSATION = (("system", "you are a helpful assistant ."), ("user", "capital of peru ?"), ("assistant", "lima"),
                ("user", "reverse : red cat dog"), ("assistant", "dog cat red"))


@pytest.fixture(scope="module")
def tokenizer(assets: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(assets / "backbone"))


def spec(**values: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"train": "train.jsonl", "maxLength": 64, **values})


def trained_runs(sample: data.Sample) -> list[list[int]]:
    """The runs of consecutive tokens the loss is taken on."""
    runs: list[list[int]] = []
    previous_trained = False
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        trained = label != data.IGNORE_INDEX
        assert not trained or label == token
        if trained and not previous_trained:
            runs.append([])
        if trained:
            runs[-1].append(token)
        previous_trained = trained
    return runs


def test_conversation_loss_covers_exactly_the_assistant_turns(tokenizer: Any) -> None:
    example = data.conversation_example(CONVERSATION, "train.jsonl: row 1")
    sample = data.tokenize_counted([example], spec(messagesColumn="messages"), tokenizer).samples[0]
    # The whole conversation is the chat template's rendering of it.
    rendered = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in CONVERSATION], tokenize=False)
    assert sample.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # The template writes an assistant turn as "<|assistant|> {content}{eos} " after the generation
    # prompt "<|assistant|> ": the trained runs are each answer and its EOS, nothing else.
    answers = [content for role, content in CONVERSATION if role == "assistant"]
    assert trained_runs(sample) == [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                                    for a in answers]
    # maskPrompt false: every token counts
    unmasked = data.tokenize_counted([example], spec(messagesColumn="messages", maskPrompt=False), tokenizer)
    assert unmasked.samples[0].labels[1:] == unmasked.samples[0].input_ids[1:]


def test_conversations_are_read_from_jsonl_parquet_and_csv(tmp_path: Path) -> None:
    rows = tiny.make_conversation_rows(3)
    jsonl = tiny.write_rows(tmp_path / "c.jsonl", rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "c.csv").write_text("messages\n" + "".join(
        '"' + json.dumps(r["messages"]).replace('"', '""') + '"\n' for r in rows))
    loaded = [data.load_examples(path, spec(messagesColumn="messages"))
              for path in (jsonl, tmp_path / "c.parquet", tmp_path / "c.csv")]
    assert [e.turns for e in loaded[0]] == [e.turns for e in loaded[1]] == [e.turns for e in loaded[2]]
    first = loaded[0][0]
    assert first.turns is not None and len(first.turns) == 5 and first.system == "you are a helpful assistant ."
    assert (first.prompt, first.answer) == (first.turns[3][1], first.turns[4][1])


@pytest.mark.parametrize(("messages", "wanted"), [
    ([{"role": "assistant", "content": "lima"}], "message 1 is assistant, expected user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 2 is user, expected assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
     "message 3 is system, expected user"),
    ([{"role": "user", "content": "capital of peru ?"}], "must end with the assistant's turn"),
    ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"role": "user"}], "message 1 is not a {role, content} object"),
    ("capital of peru ?", "expected a non-empty list"),
], ids=["assistant-first", "two-users", "late-system", "no-answer", "unknown-role", "no-content", "text"])
def test_a_conversation_out_of_order_names_its_row(messages: Any, wanted: str, tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tiny.write_rows(tmp_path / "c.jsonl", [good, {"messages": messages}])
    with pytest.raises(InvalidInput) as raised:
        data.load_examples(path, spec(messagesColumn="messages"))
    assert f"{path}: row 2" in str(raised.value) and wanted in str(raised.value)


def test_a_template_that_cannot_render_names_the_row(tokenizer: Any, tmp_path: Path) -> None:
    strict = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('this template has no system role') }}{% endif %}"
                            "{{ m['content'] }} {% endfor %}")
    examples = data.load_examples(tiny.write_rows(tmp_path / "c.jsonl", tiny.make_conversation_rows(2)),
                                  spec(messagesColumn="messages"))
    with pytest.raises(InvalidInput) as raised:
        data.tokenize_counted(examples, spec(messagesColumn="messages"), strict)
    assert f"{tmp_path / 'c.jsonl'}: row 1" in str(raised.value) and "no system role" in str(raised.value)
    with pytest.raises(InvalidInput, match="messages need the tokenizer's chat template"):
        data.tokenize_counted(examples, spec(messagesColumn="messages", template="plain"), tokenizer)


def test_preference_rows_skip_equal_or_empty_answers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"prompt": "capital of peru ?", "chosen": "lima", "rejected": "rome"},
            {"prompt": "capital of peru ?", "chosen": "lima", "rejected": "lima"},
            {"prompt": "capital of peru ?", "chosen": " ", "rejected": "rome"},
            {"prompt": "capital of peru ?", "chosen": "lima", "rejected": ""}]
    path = tiny.write_rows(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        pairs = data.load_pairs(path, spec())
    assert pairs.skipped == 3 and [p.rejected for p in pairs.examples] == ["rome"]
    assert "3 of 4 rows skipped" in caplog.text
    tiny.write_rows(path, rows[1:])
    with pytest.raises(InvalidInput, match="no usable preference pair: in all 3 rows"):
        data.load_pairs(path, spec())


def test_preference_answers_as_text_or_messages_tokenize_alike(tokenizer: Any) -> None:
    as_text = data.PreferenceExample("capital of peru ?", "lima", "rome", "you are a helpful assistant .")
    as_messages = data.PreferenceExample(
        (("system", "you are a helpful assistant ."), ("user", "capital of peru ?")),
        (("assistant", "lima"),), (("assistant", "rome"),))
    text, messages = (data.tokenize_pairs([e], spec(), tokenizer).samples[0] for e in (as_text, as_messages))
    assert text == messages
    prompt = [label == data.IGNORE_INDEX for label in text.chosen.labels]
    # both answers share the prompt's tokens; the loss is on each answer and its EOS only
    assert text.chosen.input_ids[: prompt.index(False)] == text.rejected.input_ids[: prompt.index(False)]
    assert trained_runs(text.chosen) == [tokenizer("lima", add_special_tokens=False)["input_ids"]
                                         + [tokenizer.eos_token_id]]
    assert as_messages.as_example().answer == "lima"


def test_a_long_pair_keeps_its_answers_and_loses_the_start_of_its_prompt(tokenizer: Any) -> None:
    words = " ".join(["red", "cat", "dog", "sun"] * 10)
    example = data.PreferenceExample(f"reverse : {words} moon", "moon sun dog", "red cat")
    full = data.tokenize_pairs([example], spec(maxLength=64), tokenizer)
    cut = data.tokenize_pairs([example], spec(maxLength=20), tokenizer)
    assert (full.truncated, cut.truncated) == (0, 1) and cut.lengths == full.lengths
    pair, whole = cut.samples[0], full.samples[0]
    assert len(pair.chosen.input_ids) == 20 and pair.chosen.input_ids[0] == tokenizer.bos_token_id
    assert trained_runs(pair.chosen) == trained_runs(whole.chosen)
    assert trained_runs(pair.rejected) == trained_runs(whole.rejected)
    # the prompt's end stays: the chat template's generation prompt and the last words
    kept = len(pair.chosen.input_ids) - len(trained_runs(pair.chosen)[0])
    assert pair.chosen.input_ids[1:kept] == whole.chosen.input_ids[: len(whole.chosen.input_ids)
                                                                   - len(trained_runs(whole.chosen)[0])][-(kept - 1):]


def test_a_missing_chosen_column_exits_3_before_the_model_loads(assets: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from kubetune_trainer import model as model_lib

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model_lib, "load_model", refuse)
    train = tiny.write_rows(tmp_path / "p.jsonl", [{"prompt": "a", "good": "b", "rejected": "c"}])
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(tiny_config(assets, tmp_path / "out", dataset={"train": str(train)},
                                             training={"method": "dpo"})))
    assert main(["--config", str(config)]) == 3
    error = next(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert str(train) in error and "'chosen'" in error and "dataset.chosenColumn" in error


def test_preference_rows_take_a_system_prompt_from_their_column(tmp_path: Path) -> None:
    path = tiny.write_rows(tmp_path / "p.jsonl", [
        {"prompt": "capital of peru ?", "chosen": "lima", "rejected": "rome", "sys": "be brief ."},
        {"prompt": "capital of peru ?", "chosen": "lima", "rejected": "rome", "sys": ""}])
    pairs = data.load_pairs(path, spec(systemColumn="sys", systemPrompt="you are a helpful assistant ."))
    assert [p.system for p in pairs.examples] == ["be brief .", "you are a helpful assistant ."]
    tiny.write_rows(path, [{"prompt": "a", "chosen": "b", "rejected": "c", "sys": 3}])
    with pytest.raises(InvalidInput, match=r"column 'sys' \(dataset\.systemColumn\): expected text"):
        data.load_pairs(path, spec(systemColumn="sys"))
