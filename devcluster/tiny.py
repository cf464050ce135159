"""Tiny local test assets, built without any download: a Llama-architecture backbone, a tokenizer
trained on the dataset text, and a small instruction dataset whose answers can be learned.

The backbone starts from random weights and is pre-trained for a second or two on a generic copy
task over the vocabulary ("a b c : a b c"), so that, like a real base model, it has useful
embeddings and attention for LoRA to adapt: a LoRA fine-tune on the instruction data then brings
the eval loss from ~6 to ~1.5 in 200 steps. (On purely random weights LoRA barely learns.)

    python -m devcluster.tiny --out DIR     # DIR/backbone/, DIR/data/train.jsonl, DIR/data/validation.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "star"]
CAPITALS = {
    "france": "paris", "italy": "rome", "spain": "madrid", "japan": "tokyo", "egypt": "cairo",
    "peru": "lima", "kenya": "nairobi", "chile": "santiago", "norway": "oslo", "greece": "athens",
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|> {{ m['content'] }} "
    "{% elif m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% else %}<|assistant|> {{ m['content'] }}{{ eos_token }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` prompt/answer rows: reverse three words, or name a capital (fixed mapping)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.5:
            words = rng.sample(WORDS, 3)
            rows.append({"prompt": "reverse : " + " ".join(words), "answer": " ".join(reversed(words))})
        else:
            country = rng.choice(sorted(CAPITALS))
            rows.append({"prompt": f"capital of {country} ?", "answer": CAPITALS[country]})
    return rows


def write_dataset(path: str | Path, n: int = 64, seed: int = 0) -> Path:
    """Write ``n`` rows to ``path``; the format follows the extension (.jsonl, .csv, .parquet)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n, seed)
    if path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["prompt", "answer"])
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_preference_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` prompt/chosen/rejected rows of the same two tasks: the chosen answer is the right one;
    the rejected one repeats the words in their order, or names another country's capital."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.5:
            words = rng.sample(WORDS, 3)
            rows.append({"prompt": "reverse : " + " ".join(words), "chosen": " ".join(reversed(words)),
                         "rejected": " ".join(words)})
        else:
            country = rng.choice(sorted(CAPITALS))
            wrong = rng.choice(sorted(v for k, v in CAPITALS.items() if k != country))
            rows.append({"prompt": f"capital of {country} ?", "chosen": CAPITALS[country], "rejected": wrong})
    return rows


def make_conversation_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows with a ``messages`` column: a system prompt, then two user/assistant turns of the tasks."""
    rows = make_rows(2 * n, seed)
    return [{"messages": [{"role": "system", "content": "you are a helpful assistant ."},
                          {"role": "user", "content": a["prompt"]}, {"role": "assistant", "content": a["answer"]},
                          {"role": "user", "content": b["prompt"]}, {"role": "assistant", "content": b["answer"]}]}
            for a, b in zip(rows[::2], rows[1::2], strict=True)]


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """JSON lines of ``rows``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus() -> Iterable[str]:
    """Every word the dataset and the default prompt format can contain."""
    yield " ".join(WORDS)
    yield " ".join(f"capital of {c} ? {p}" for c, p in CAPITALS.items())
    yield "reverse : ### Instruction: Response: system you are a helpful assistant ."


def build_tokenizer(out_dir: str | Path) -> Path:
    """A word-level tokenizer trained on :func:`corpus`, with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def pretrain(model: Any, tokenizer: Any, steps: int, seed: int = 0) -> float:
    """Full training on "w1 .. wn : w1 .. wn" copy sequences of the vocabulary; returns the last loss."""
    import torch

    rng = random.Random(seed)
    words = WORDS + sorted(CAPITALS) + sorted(CAPITALS.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        texts = []
        for _ in range(16):
            chosen = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
            texts.append(f"{chosen} : {chosen}")
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def build_tiny_backbone(
    out_dir: str | Path,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    pretrain_steps: int = 300,
) -> Path:
    """Save a tiny (pre-trained, see the module docstring) Llama model and its tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if pretrain_steps:
        pretrain(model, tokenizer, pretrain_steps, seed)
    model.save_pretrained(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args()
    build_tiny_backbone(args.out / "backbone")
    write_dataset(args.out / "data" / "train.jsonl", args.rows, seed=0)
    write_dataset(args.out / "data" / "validation.jsonl", max(8, args.rows // 8), seed=1)
    print(args.out)


if __name__ == "__main__":
    main()
