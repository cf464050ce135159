"""The preference losses, rewards and log-probabilities against TRL's implementations (TRL is a
test-only dependency): DPOTrainer's own loss on the same model and token ids for dpo and ipo;
CPOTrainer's loss for simpo and for conservative DPO's label smoothing, ORPOTrainer's odds-ratio
term, and CPOTrainer's per-sequence log-probabilities, on fixed inputs."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kubetune_contract.config import PreferenceSpec
from kubetune_trainer import data
from kubetune_trainer import model as model_lib
from kubetune_trainer.preference import Logps, Preference, log1mexp, pair_logps, pair_losses
from kubetune_trainer.steps import forward_logits

pytestmark = pytest.mark.trainer
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
TOLERANCE = 1e-6
ROWS = [
    {"prompt": "capital of peru ?", "chosen": " lima", "rejected": " rome"},
    {"prompt": "reverse : red cat dog", "chosen": " dog cat red", "rejected": " red cat dog"},
    {"prompt": "capital of japan ?", "chosen": " tokyo", "rejected": " japan"},
    {"prompt": "reverse : sun moon", "chosen": " moon sun", "rejected": " sun sun moon"},
]
FP32 = model_lib.resolve_precision("fp32", torch.device("cpu"))


def fixed_logps(seed: int = 0, pairs: int = 16) -> tuple[Logps, Logps]:
    """Policy and reference log-probabilities of ``pairs`` pairs, as a model would give them."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 12, (2, pairs), generator=generator)
    per_token = -torch.rand((4, pairs), generator=generator, dtype=torch.float64) * 3 - 0.01
    policy = Logps(per_token[0] * tokens[0], per_token[1] * tokens[1], tokens[0], tokens[1])
    reference = Logps(per_token[2] * tokens[0], per_token[3] * tokens[1], tokens[0], tokens[1])
    return policy, reference


def trl_self(**values: Any) -> SimpleNamespace:
    """The attributes TRL's loss methods read from their trainer."""
    return SimpleNamespace(**{"accelerator": SimpleNamespace(device=torch.device("cpu")), "alpha": 0.0,
                              "label_smoothing": 0.0, **values})


def near(a: float, b: float) -> bool:
    """Within 1e-6, relative to values above 1 (float32 holds about 7 digits)."""
    return abs(a - b) <= TOLERANCE * max(1.0, abs(b))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a.double(), b.double(), rtol=TOLERANCE, atol=TOLERANCE))


@pytest.mark.parametrize(("beta", "gamma"), [(0.1, 0.5), (2.0, 1.2)])
def test_simpo_equals_trl_cpo_trainer(beta: float, gamma: float) -> None:
    from trl.experimental.cpo import CPOTrainer

    policy, _ = fixed_logps()
    ours = pair_losses("simpo", PreferenceSpec(beta=beta, simpo_gamma=gamma), policy, None)
    mean_chosen, mean_rejected = policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens
    losses, chosen, rejected = CPOTrainer.cpo_loss(trl_self(beta=beta, simpo_gamma=gamma, loss_type="simpo"),
                                                   mean_chosen, mean_rejected)
    assert close(ours.losses, losses) and close(ours.chosen, chosen) and close(ours.rejected, rejected)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_dpo_label_smoothing_equals_trl_conservative_sigmoid(smoothing: float) -> None:
    """Conservative DPO: TRL's sigmoid loss with label smoothing (CPOTrainer's form of it) on the
    log-ratios against the reference."""
    from trl.experimental.cpo import CPOTrainer

    policy, reference = fixed_logps(seed=1)
    ours = pair_losses("dpo", PreferenceSpec(beta=0.3, label_smoothing=smoothing), policy, reference)
    losses, chosen, rejected = CPOTrainer.cpo_loss(
        trl_self(beta=0.3, loss_type="sigmoid", label_smoothing=smoothing),
        policy.chosen - reference.chosen, policy.rejected - reference.rejected)
    assert close(ours.losses, losses) and close(ours.chosen, chosen) and close(ours.rejected, rejected)


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_orpo_odds_ratio_equals_trl_orpo_trainer(lam: float) -> None:
    from trl.experimental.orpo import ORPOTrainer
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    policy, _ = fixed_logps(seed=2)
    ours = pair_losses("orpo", PreferenceSpec(orpo_lambda=lam), policy, None)
    mean_chosen, mean_rejected = policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens
    ratio_losses, chosen, rejected, _, _ = ORPOTrainer.odds_ratio_loss(trl_self(beta=lam), mean_chosen, mean_rejected)
    # TRL's loss is the chosen answers' negative log-likelihood less the mean of these terms.
    assert close(ours.losses, -mean_chosen - ratio_losses)
    assert close(ours.chosen, chosen) and close(ours.rejected, rejected)
    x = -torch.logspace(-8, 2, 50, dtype=torch.float64)
    assert close(log1mexp(x), trl_log1mexp(x))


@pytest.fixture(scope="module")
def trl_dpo(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A DPOTrainer on the tiny backbone with a LoRA adapter whose B matrices are not zero, so the
    policy differs from the reference (the backbone with the adapter disabled)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(assets / "backbone"))
    model = AutoModelForCausalLM.from_pretrained(str(assets / "backbone"), dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=len(ROWS))
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    trainer.model.eval()
    return trainer


def kubetune_batch(trl_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TRL's collated pairs (chosen rows first, then rejected) as data.collate lays them out: labels
    are the token ids where TRL's completion mask is set."""
    labels = trl_inputs["input_ids"].masked_fill(trl_inputs["completion_mask"] == 0, data.IGNORE_INDEX)
    return {"input_ids": trl_inputs["input_ids"], "attention_mask": trl_inputs["attention_mask"], "labels": labels}


@pytest.mark.parametrize(("loss_type", "method", "beta"), [("sigmoid", "dpo", 0.1), ("sigmoid", "dpo", 0.5),
                                                           ("ipo", "ipo", 0.1), ("ipo", "ipo", 0.7)])
def test_dpo_and_ipo_equal_trl_dpo_trainer(trl_dpo: Any, loss_type: str, method: str, beta: float) -> None:
    trl_dpo.beta, trl_dpo.loss_types, trl_dpo.loss_weights = beta, [loss_type], [1.0]
    inputs = next(iter(trl_dpo.get_train_dataloader()))
    trl_dpo._metrics["eval"].clear()  # the model is in eval mode: TRL logs under "eval"
    with torch.no_grad():
        trl_loss = trl_dpo._compute_loss(trl_dpo.model, inputs, return_outputs=False)
    logged = {k: v[-1] for k, v in trl_dpo._metrics["eval"].items()}

    dev = torch.device("cpu")
    preference = Preference(method, PreferenceSpec(beta=beta), trl_dpo.model, dev, adapter=True)
    assert preference.adapter_reference
    batch = kubetune_batch(inputs)
    with torch.no_grad():
        reference = preference.reference(trl_dpo.model, batch, "train", list(range(len(ROWS))), dev, FP32)
        policy = pair_logps(forward_logits(trl_dpo.model, batch, dev, FP32), batch["labels"])
        ours = pair_losses(method, preference.spec, policy, reference)
    assert reference is not None and not close(policy.chosen, reference.chosen), "the adapter changes nothing"
    assert near(float(ours.losses.mean()), float(trl_loss))
    assert near(float(ours.chosen.mean()), logged["rewards/chosen"])
    assert near(float(ours.rejected.mean()), logged["rewards/rejected"])
    assert near(float((ours.chosen - ours.rejected).mean()), logged["rewards/margins"])
    assert float((ours.chosen > ours.rejected).float().mean()) == logged["rewards/accuracies"]
    # the per-sequence log-probabilities of TRL's own forward pass
    assert near(float(policy.chosen.mean()), logged["logps/chosen"])


def test_sequence_logps_equal_trl(trl_dpo: Any) -> None:
    """Summed and per-token-mean log-probabilities of each sequence, on the same logits and labels."""
    from trl.experimental.cpo import CPOTrainer

    batch = kubetune_batch(next(iter(trl_dpo.get_train_dataloader())))
    with torch.no_grad():
        logits = forward_logits(trl_dpo.model, batch, torch.device("cpu"), FP32)
    ours = pair_logps(logits, batch["labels"])
    summed = CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=False)
    averaged = CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    assert close(torch.cat([ours.chosen, ours.rejected]), summed)
    tokens = torch.cat([ours.chosen_tokens, ours.rejected_tokens])
    assert close(torch.cat([ours.chosen, ours.rejected]) / tokens, averaged)
