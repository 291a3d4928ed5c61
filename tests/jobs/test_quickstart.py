"""The offline quickstart assets: corpus, tokenizer, tiny GPT-2, and their atomic, idempotent build."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.jobs.quickstart import corpus as quickstart


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """relative path -> (mtime_ns, bytes) for every file under root."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """The real quickstart build (default sizes), shared by the tests of this module."""
    return quickstart.ensure_quickstart_assets(tmp_path_factory.mktemp("quickstart"))


def test_reviews_are_deterministic_and_sentiment_is_mixed():
    reviews = quickstart.generate_reviews(2000, seed=0)
    assert reviews == quickstart.generate_reviews(2000, seed=0)
    assert reviews != quickstart.generate_reviews(2000, seed=1)
    scores = quickstart.vader_compound(reviews)
    positive = sum(s > 0.05 for s in scores) / len(scores)
    negative = sum(s < -0.05 for s in scores) / len(scores)
    assert positive > 0.2 and negative > 0.2
    assert abs(statistics.mean(scores)) < 0.1  # an SFT policy starts near 0: RL has room to move


def test_corpus_files_follow_the_documented_conventions(assets):
    assert set(quickstart.CORPUS_FILES) <= set(assets)
    sft = _read(assets["sft"])
    assert len(sft) == 4000 and set(sft[0]) == {"prompt", "completion"}
    for row in sft:
        assert 2 <= len(row["prompt"].split(" ")) <= 4 and not row["prompt"].endswith(" ")
        assert row["completion"].startswith(" ") and not row["completion"].startswith("  ")
        assert row["completion"].endswith(" .") and len(row["completion"].split()) >= 3
    # a prompt stops before any sentiment-bearing word: the policy decides the sentiment
    assert set(quickstart.vader_compound({r["prompt"] for r in sft})) == {0.0}

    assert [r["prompt"] for r in _read(assets["prompts"])] == [r["prompt"] for r in sft]
    assert len(_read(assets["eval_prompts"])) == 200
    demos = _read(assets["demos"])
    assert [(d["prompt"], d["demonstration"]) for d in demos] == [(r["prompt"], r["completion"]) for r in sft]

    pairs = _read(assets["pairs"])
    assert len(pairs) > 1000 and set(pairs[0]) == {"prompt", "chosen", "rejected"}
    reviews = {r["prompt"] + r["completion"] for r in sft}
    chosen = [p["prompt"] + p["chosen"] for p in pairs]
    rejected = [p["prompt"] + p["rejected"] for p in pairs]
    assert set(chosen) | set(rejected) <= reviews
    for c, r in zip(quickstart.vader_compound(chosen), quickstart.vader_compound(rejected)):
        assert c > r


def test_tokenizer_round_trips_and_special_ids_agree(assets):
    model_dir = assets["base_model"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert tok.padding_side == "left" and len(tok) == 512

    for row in _read(assets["sft"])[:500]:
        text = row["prompt"] + row["completion"]
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id  # <s> is prepended, byte-level BPE is lossless
        assert tok.decode(ids, skip_special_tokens=True) == text
        # tokenizing prompt and completion apart gives the same ids as tokenizing the review
        assert ids == tok(row["prompt"]).input_ids + tok(row["completion"], add_special_tokens=False).input_ids
        assert 3 <= len(tok(row["completion"], add_special_tokens=False).input_ids) <= 32

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for cfg in (model.config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
            tok.bos_token_id,
            tok.eos_token_id,
            tok.pad_token_id,
        )
    assert model.config.vocab_size == len(tok)


def test_tiny_model_loads_offline_and_generates_with_left_padding(tiny_model_dir):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = ["the plot", "i thought the acting was"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch.input_ids[0, 0] == tok.pad_token_id and batch.attention_mask[0, 0] == 0
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=6)
        alone = model.generate(**tok(prompts[:1], return_tensors="pt"), do_sample=False, max_new_tokens=6)
    assert out.shape[0] == 2 and out.shape[1] <= batch.input_ids.shape[1] + 6
    # left padding is invisible to generation: the padded row continues as the lone prompt does
    n_pad = int((batch.attention_mask[0] == 0).sum())
    assert out[0, n_pad : n_pad + alone.shape[1]].tolist() == alone[0].tolist()


def test_second_call_reuses_the_assets(assets):
    root = assets["base_model"].parent
    before = _snapshot(root)
    again = quickstart.ensure_quickstart_assets(root)
    assert again == assets
    assert _snapshot(root) == before  # same bytes, same mtimes: nothing was rebuilt
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_same_seed_builds_identical_files(assets, tmp_path):
    root = assets["base_model"].parent
    quickstart.ensure_quickstart_assets(tmp_path)
    first = {k: v[1] for k, v in _snapshot(root).items()}
    second = {k: v[1] for k, v in _snapshot(tmp_path).items()}
    assert first.keys() == second.keys() and first == second


def test_crash_mid_build_leaves_no_final_directory(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(quickstart, "build_tiny_model", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quickstart.ensure_quickstart_assets(tmp_path)
    assert not (tmp_path / "base_model").exists()  # the tokenizer was written, but only to a temp dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the complete corpus is kept

    monkeypatch.setattr(quickstart, "vader_compound", crash)  # fails after sft.jsonl is written
    with pytest.raises(RuntimeError):
        quickstart.build_corpus(tmp_path / "other", n_train=50, n_eval=5)
    assert list((tmp_path / "other").iterdir()) == []

    monkeypatch.undo()
    paths = quickstart.ensure_quickstart_assets(tmp_path)
    assert (paths["base_model"] / "model.safetensors").is_file()


def test_a_concurrent_winner_is_kept(tmp_path):
    """Two processes of one launch may build at once: the loser's rename fails and is ignored."""
    target = tmp_path / "asset"

    def build(tmp: Path) -> None:
        (tmp / "mine.txt").write_text("loser")
        target.mkdir()
        (target / "theirs.txt").write_text("winner")

    assert quickstart.atomic_dir(target, build) == target
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["asset"]


def test_test_helpers_build_small_files(tiny_data_files, tiny_model_dir):
    assert _read(tiny_data_files["pairs"]) and _read(tiny_data_files["sft"])
    assert 300 <= len(AutoTokenizer.from_pretrained(tiny_model_dir)) <= 500


def test_a_signal_during_the_sft_stage_is_one_line_and_its_exit_code(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the quickstart fine-tunes its policy: the trainer saves and stops, the stage
    says so in one line, `align` exits 130 (128 + SIGINT), and no policy directory is published."""
    import align.jobs.train as train_job
    import align.trainer
    from align.cli import main
    from align.jobs.quickstart.pipeline import sft_once
    from align.signals import RunStopped

    monkeypatch.setattr(align.trainer, "train", lambda recipe: {"stopped_by": "SIGINT", "steps": 3})
    sft_model = tmp_path / "sft_model"
    with pytest.raises(RunStopped) as caught:
        sft_once("quickstart_sft", [f"output.dir={tmp_path / 'sft_run'}"], sft_model, lambda message: None)
    assert caught.value.exit_code == 130 and "stopped by SIGINT during the supervised fine-tuning" in str(caught.value)
    assert not sft_model.exists()

    def stopped_job(args):
        raise caught.value

    monkeypatch.setattr(train_job, "main", stopped_job)
    capsys.readouterr()
    assert main(["train", "quickstart"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("align train: stopped by SIGINT during the supervised fine-tuning")


def test_the_quickstart_learns_with_the_vllm_engine_as_with_the_native_one(tmp_path, monkeypatch):
    """`align train quickstart generation.engine=vllm` runs to the end on the CPU, and its reward
    rises as the native engine's does, over the same four seeds each: every run's gain (mean reward
    of the last 6 of 24 steps minus the first 6) is clearly positive, and the two engines' mean gains
    agree within 0.1.

    Why four seeds and a fixed bound: the two engines draw different samples (vLLM's sampler is not
    align's keyed one), so they agree in distribution, not run by run, and a run's gain varies by
    ~0.05 from seed to seed (0.31–0.45 here) -- and with the CPU's rounding, by ~0.01 run to run on
    one seed. The difference of two 4-run means then has a spread of ~0.035, so 0.1 fails an engine
    that learns at half the native rate every time and a sound one about once in 200 runs (two
    seeds against a bound scaled by their own spread failed on a change of rounding alone).

    The four vLLM runs share one fresh interpreter, as a user's `align train` has: late in this
    suite's long-lived process (after the vLLM engine and server tests and the studies), a vLLM
    engine built fresh from disk gave prompt log-probs up to 2.5 nats off the transformers model's
    and learned at half the rate -- a process-state defect of vLLM's CPU path that is not traced yet
    (benchmarks/README.md, "vLLM in a long-lived process")."""
    import subprocess
    import sys

    from align.cli import main

    monkeypatch.chdir(tmp_path)
    short = ["train.steps=24", "output.report=false", "output.save_model=false"]
    seeds = (0, 1, 2, 3)

    def argv(engine: str, seed: int) -> list[str]:
        run = f"output.dir=runs/{engine}{seed}"
        return ["train", "quickstart", f"generation.engine={engine}", f"train.seed={seed}", run]

    for seed in seeds:
        assert main([*argv("native", seed), *short]) == 0
    vllm_runs = [[*argv("vllm", seed), *short] for seed in seeds]
    script = f"import sys; from align.cli import main; sys.exit(max(main(a) for a in {vllm_runs!r}))"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    gains = {}
    for engine in ("native", "vllm"):
        for seed in seeds:
            rewards = [r["reward_mean"] for r in _read(tmp_path / "runs" / f"{engine}{seed}" / "metrics.jsonl")]
            assert len(rewards) == 24
            gains[engine, seed] = statistics.mean(rewards[-6:]) - statistics.mean(rewards[:6])
    runs = ", ".join(f"{engine} {seed}: {gain:.3f}" for (engine, seed), gain in gains.items())  # untruncated
    assert min(gains.values()) > 0.1, runs  # every run learned, on either engine
    native = statistics.mean(gains["native", s] for s in seeds)
    vllm = statistics.mean(gains["vllm", s] for s in seeds)
    assert abs(vllm - native) <= 0.1, f"mean gain native {native:.3f}, vllm {vllm:.3f}; {runs}"
