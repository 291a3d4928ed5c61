"""``align rm`` on a synthetic preference set whose true reward is known.

Texts are 8 words from a small vocabulary; the true reward counts "good" words minus "bad" words,
and the chosen text of each pair has the higher true reward. A tiny BERT (built from a config,
WordLevel tokenizer trained here, saved and loaded back through from_pretrained) must rank
held-out pairs correctly > 90 % of the time, and the saved model must work as the
``reward_model`` reward. A run stopped by SIGTERM and resumed must end bit-identical to one that
was not.
"""

from __future__ import annotations

import functools
import json
import random
import signal
from pathlib import Path

import pytest
import torch
from helpers import stop_at
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PreTrainedTokenizerFast,
)

import rewards
from align import cli
from align.jobs import rm
from align.metrics_log import read_metrics

GOOD = ["great", "good", "excellent", "wonderful", "superb"]
BAD = ["bad", "awful", "terrible", "poor", "boring"]
NEUTRAL = ["the", "movie", "plot", "actor", "scene", "was", "film", "story", "music", "and", "a", "it"]
PROMPTS = ["review:", "my opinion:", "verdict:"]


def true_reward(text: str) -> int:
    words = text.split()
    return sum(w in GOOD for w in words) - sum(w in BAD for w in words)


def random_text(rng: random.Random, n: int = 8) -> str:
    pool = rng.choice([GOOD + NEUTRAL, BAD + NEUTRAL, GOOD + BAD + NEUTRAL])
    return " ".join(rng.choice(pool) for _ in range(n))


def make_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = random_text(rng), random_text(rng)
        if true_reward(a) == true_reward(b):
            continue
        chosen, rejected = (a, b) if true_reward(a) > true_reward(b) else (b, a)
        rows.append({"question": rng.choice(PROMPTS), "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def build_base(out: Path) -> Path:
    """A tiny BERT encoder (no head) and a WordLevel tokenizer, saved to ``out``."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = GOOD + BAD + NEUTRAL + PROMPTS
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=64,
    ).save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.token_to_id("[PAD]"),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rm")
    base = build_base(root / "base")
    data = write_jsonl(root / "pairs.jsonl", make_pairs(800, seed=0))
    recipe = root / "rm.yaml"
    recipe.write_text(
        f"description: synthetic good-minus-bad reward\nmodel: {base}\n"
        f"data:\n  path: {data}\n  prompt_column: question\n  eval_fraction: 0.2\n  separator: ' |'\n"
        f"train:\n  epochs: 2\n  batch_size: 16\n  lr: 2.0e-3\n  device: cpu\n"
        f"output_dir: {root / 'out'}\n"
    )
    rc = cli.main(["rm", str(recipe), "train.seed=0"])
    assert rc == 0
    return {"root": root, "out": root / "out", "metrics": json.loads((root / "out" / "metrics.json").read_text())}


def test_rm_reaches_high_held_out_accuracy(trained):
    m = trained["metrics"]
    assert m["n_eval"] == 160 and m["n_train"] == 640
    assert m["eval_accuracy"] > 0.9, m
    assert m["eval_accuracy_before"] < 0.8  # it learned: the untrained head is near chance
    assert m["history"][-1]["eval_loss"] < m["eval_loss_before"]
    out = trained["out"]
    assert (out / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    assert json.loads((out / "align_rm.json").read_text())["separator"] == " |"


def test_saved_model_is_a_reward(trained):
    out = trained["out"]
    reward = rewards.build("reward_model", model=str(out), device="cpu", batch_size=3)
    assert reward.separator == " |"  # read back from align_rm.json
    rng = random.Random(123)
    texts = [" " + random_text(rng) for _ in range(40)]
    prompts = [PROMPTS[i % 3] for i in range(40)]
    scores = reward(prompts, texts)
    # independent forward pass of the saved model on the same texts
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1
    with torch.no_grad():
        for p, t, s in zip(prompts[:5], texts[:5], scores[:5]):
            assert float(model(**tok(p + " |" + t, return_tensors="pt")).logits[0, 0]) == pytest.approx(s, abs=1e-4)
    # higher true reward, higher learned reward (rank agreement over pairs that differ)
    truth = [true_reward(t) for t in texts]
    agree = total = 0
    for i in range(40):
        for j in range(i + 1, 40):
            if truth[i] != truth[j]:
                total += 1
                agree += (scores[i] > scores[j]) == (truth[i] > truth[j])
    assert agree / total > 0.85
    # empty completions and composites work too
    combined = rewards.build_combined([{"name": "reward_model", "model": str(out)}, "sentiment"], device="cpu")
    assert combined.names == ["reward_model", "sentiment"]
    assert len(combined(["review:"] * 2, ["", " great great"])) == 2


def test_rm_rejects_multi_logit_models(tmp_path, trained):
    tok = AutoTokenizer.from_pretrained(trained["out"])
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=16,
        num_labels=3,
    )
    from transformers import BertForSequenceClassification

    BertForSequenceClassification(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has 3 output labels"):
        rewards.build("reward_model", model=str(tmp_path))


def test_rm_recipe_errors_exit_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "good": "b", "rejected": "c"}])
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(f"model: {tmp_path}\ndata:\n  path: {data}\n")
    assert cli.main(["rm", str(recipe)]) == 2
    assert "no column(s) ['chosen']" in capsys.readouterr().err
    assert cli.main(["rm", str(recipe), "train.epoch=3"]) == 2
    assert "'train.epoch': unknown key" in capsys.readouterr().err
    assert cli.main(["rm", "data.path=x.jsonl"]) == 2
    assert "model" in capsys.readouterr().err
    nulls = write_jsonl(tmp_path / "nulls.jsonl", [{"prompt": None, "chosen": 1, "rejected": "c"}])
    assert cli.main(["rm", str(recipe), f"data.path={nulls}"]) == 2  # not trained on as "None" and "1"
    assert "line 1: column 'prompt' is NoneType, expected text" in capsys.readouterr().err
    assert cli.main(["rm", str(recipe), f"data.path={nulls}", "train.device=banana"]) == 2
    assert "field 'train.device': expected a torch device such as cpu, cuda or cuda:1" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4)
    assert cli.main(["rm", str(recipe), f"data.path={good}", f"model={tmp_path / 'no_model'}"]) == 2
    assert f"model: cannot load a model config from '{tmp_path / 'no_model'}'" in capsys.readouterr().err


# -- interrupted and resumed: the same run ---------------------------------------------------------


def same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def logged(run: Path) -> list[dict]:
    """metrics.jsonl without its timings (the only values two runs may disagree on)."""
    return [{k: v for k, v in r.items() if k != "step_s"} for r in read_metrics(run)]


def test_rm_stopped_by_sigterm_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    base = build_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(240, seed=1))
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(
        f"model: {base}\ndata:\n  path: {data}\n  eval_fraction: 0.2\n  prompt_column: question\n"
        "train:\n  epochs: 2\n  batch_size: 16\n  lr: 2.0e-3\n  warmup_steps: 3\n  device: cpu\n"
        "save_every: 5\nkeep_last: 2\n"
    )  # 192 training pairs: 12 steps an epoch, 24 in all
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert cli.main(["rm", str(recipe), f"output_dir={straight}"]) == 0

    train = rm.train_reward_model
    for step in (7, 17):  # mid-epoch 1 (between checkpoints), then mid-epoch 2
        monkeypatch.setattr(rm, "train_reward_model", functools.partial(train, on_step=stop_at(step)))
        assert cli.main(["rm", str(recipe), f"output_dir={cut}", "resume=latest"]) == 128 + signal.SIGTERM
        assert f"stopped by SIGTERM at step {step}" in capsys.readouterr().out
        assert (cut / "checkpoints" / f"step-{step:06d}" / "model" / "model.safetensors").is_file()
        assert not (cut / "model.safetensors").exists() and not (cut / ".lock").exists()
    monkeypatch.setattr(rm, "train_reward_model", train)
    assert cli.main(["rm", str(recipe), f"output_dir={cut}", "resume=latest"]) == 0

    same_weights(straight, cut)
    assert logged(cut) == logged(straight)  # every step once, the same values
    assert [r["step"] for r in logged(cut)] == list(range(1, 25))
    done, again = (json.loads((d / "metrics.json").read_text()) for d in (straight, cut))
    for key in ("history", "eval_accuracy", "eval_accuracy_before", "steps"):
        assert done[key] == again[key], key
    assert [h["epoch"] for h in done["history"]] == [1, 2] and done["eval_accuracy"] > 0.7
    assert rewards.build("reward_model", model=str(cut), device="cpu")(["review:"], [" great"])

    # a run directory belongs to one run, and a resume continues the same run
    capsys.readouterr()
    assert cli.main(["rm", str(recipe), f"output_dir={cut}"]) == 2
    assert "resume=latest, or replace it with overwrite=true" in capsys.readouterr().err
    assert cli.main(["rm", str(recipe), f"output_dir={cut}", "resume=latest", "train.lr=1e-3"]) == 2
    assert "was trained with other train.lr" in capsys.readouterr().err
