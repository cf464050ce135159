"""The judge metric: an OpenAI-compatible chat-completions endpoint scores each answer against the
reference (0 to 10), as H2O LLM Studio's GPT metric does.

The protocol is the maintained openai client's, with its timeout and retries (evaluation.judge).
The API key comes from KUBETUNE_JUDGE_API_KEY (the operator sets it from evaluation.judge.secretRef)
and appears nowhere else. Any failure (no answer in time, an error status, a reply that is not a
score) makes the whole metric unavailable with the reason: a partial average would mislead, and the
run still succeeds.
"""

from __future__ import annotations

import os
import re

from kubetune_contract.config import JUDGE_API_KEY_ENV, JudgeSpec

SCORE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\.?\s*$")


class JudgeUnavailable(Exception):
    """The judge could not score the answers; the message says why (no secrets in it)."""


def scores(spec: JudgeSpec, prompts: list[str], references: list[str], answers: list[str]) -> list[float]:
    """The judge's score of each answer, 0 to 10."""
    import openai

    client = openai.OpenAI(base_url=spec.url, api_key=os.environ.get(JUDGE_API_KEY_ENV) or "unset",
                           timeout=float(spec.timeout_seconds), max_retries=spec.max_retries)
    out = []
    try:
        for i, (prompt, reference, answer) in enumerate(zip(prompts, references, answers, strict=True)):
            text = spec.prompt.replace("{prompt}", prompt).replace("{reference}", reference).replace("{answer}", answer)
            reply = client.chat.completions.create(
                model=spec.model, messages=[{"role": "user", "content": text}], temperature=0, max_tokens=16,
            )
            content = (reply.choices[0].message.content or "") if reply.choices else ""
            match = SCORE.match(content)
            if not match or not 0 <= float(match.group(1)) <= 10:
                raise JudgeUnavailable(f"sample {i}: the judge's reply {content[:40]!r} is not a score from 0 to 10")
            out.append(float(match.group(1)))
    except openai.APITimeoutError:
        raise JudgeUnavailable(f"{spec.url} did not answer within {spec.timeout_seconds}s "
                               f"({spec.max_retries} retries)") from None
    except openai.APIStatusError as err:
        raise JudgeUnavailable(f"{spec.url} answered HTTP {err.status_code}") from None
    except openai.APIConnectionError as err:
        raise JudgeUnavailable(f"cannot reach {spec.url}: {type(err.__cause__ or err).__name__}") from None
    except openai.OpenAIError as err:
        raise JudgeUnavailable(f"{spec.url}: {type(err).__name__}") from None
    return out
