"""The summarisation-with-entailment recipe: synthetic corpus, gold judgement, NLI model, recipes, report.

Labels and gold verdicts are checked against the documents' facts directly; the NLI model is
trained for a few hundred steps on a small corpus and must beat chance on held-out documents;
the end-to-end smoke runs the whole `align summarize` path on toy sizes (2 RL steps).
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_recipe
from align.jobs import summarize as S
from align.metrics_log import read_metrics
from align.recipe import Recipe
from rewards.entailment import sentence_spans

SMALL = S.CorpusSizes(sft=64, eval=8, nli_train=60, nli_eval=20, statements_per_doc=6, unfaithful_share=0.5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is as fast as two, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- corpus and gold judgement ----------------------------------------------------------------


def test_documents_are_deterministic_and_state_their_facts():
    docs = S.generate_documents(200, seed=0)
    assert [d.text for d in docs] == [d.text for d in S.generate_documents(200, seed=0)]
    assert [d.text for d in docs] != [d.text for d in S.generate_documents(200, seed=1)]
    assert {d.type for d in docs} == set(S.TYPES)
    for doc in docs:
        assert 3 <= len(doc.facts) <= 6 and next(iter(doc.facts)) == doc.entity.kind.name
        assert doc.text.startswith(doc.name + " ")
        for value in doc.facts.values():
            assert value in doc.text
        assert len(sentence_spans(doc.text)) == len(doc.facts)


def test_reference_summaries_parse_back_to_facts_of_their_document():
    rng = random.Random(0)
    for doc in S.generate_documents(300, seed=3):
        ref = S.reference_summary(doc, rng)
        doc_type, name, claims = S.parse_summary(ref)
        assert (doc_type, name) == (doc.type, doc.name)
        assert claims == {k: doc.facts[k] for k in claims} and 2 <= len(claims) <= 3
        assert S.summary_text(doc_type, name, claims) == ref  # round trip
        assert S.gold_judgement(doc, ref) == "faithful"
        assert S.gold_judgement(doc, " " + ref) == "faithful"  # completions start with a space


def test_gold_judgement_catches_each_kind_of_error():
    doc = S.Document("city", "Zorblat", {"country": "Varnia", "population": "40,000", "mayor": "Ilsa Korm"})
    assert S.gold_judgement(doc, "Zorblat is a city in Varnia, with 40,000 inhabitants.") == "faithful"
    assert S.gold_judgement(doc, "Zorblat is a city in Ostrel, with 40,000 inhabitants.") == "contradicted"
    assert S.gold_judgement(doc, "Zorblat is a city in Varnia, whose mayor is Bram Osk.") == "contradicted"
    assert S.gold_judgement(doc, "Zorblat is a city in Varnia, founded in 1650.") == "unsupported"
    assert S.gold_judgement(doc, "Velmor is a city in Varnia.") == "unsupported"
    assert S.gold_judgement(doc, "Zorblat is a city in Varnia, with 40,000 inhabitants") == "unparsed"
    assert S.gold_judgement(doc, "Zorblat is a city in Varnia, founded in 1650, founded in 1650.") == "unparsed"
    assert S.gold_judgement(doc, "Varnia in city a is Zorblat.") == "unparsed"


def test_statement_labels_hold_by_construction():
    rng = random.Random(1)
    counts: dict[tuple[int, str], int] = {}
    for doc in S.generate_documents(300, seed=5):
        for st in S.make_statements(doc, 6, rng):
            counts[st.label, st.kind] = counts.get((st.label, st.kind), 0) + 1
            same_entity = st.name == doc.name
            stated = {k: v for k, v in st.claims.items() if k in doc.facts}
            wrong = [k for k, v in stated.items() if doc.facts[k] != v]
            if st.label == S.ENTAILMENT:
                assert same_entity and not wrong and len(stated) == len(st.claims), st
            elif st.label == S.CONTRADICTION:
                assert same_entity and wrong == [st.changed] and len(stated) == len(st.claims), st
            else:
                assert st.kind in ("absent", "other_entity", "word_salad"), st
                if st.kind == "absent":
                    assert same_entity and st.changed not in doc.facts and st.changed in st.claims
                elif st.kind == "other_entity":
                    assert not same_entity and st.name not in doc.text
            if st.form == "summary":
                expected = {
                    S.ENTAILMENT: "faithful",
                    S.CONTRADICTION: "contradicted",
                    S.NEUTRAL: "unparsed" if st.kind == "word_salad" else "unsupported",
                }[st.label]
                assert S.gold_judgement(doc, st.text) == expected, st
                if st.kind != "word_salad":
                    assert S.parse_summary(st.text)[2] == st.claims
    # every label is made, with every neutral kind
    for key in [(S.ENTAILMENT, "restated"), (S.CONTRADICTION, "value_swap"), (S.NEUTRAL, "absent"),
                (S.NEUTRAL, "other_entity"), (S.NEUTRAL, "word_salad")]:  # fmt: skip
        assert counts.get(key, 0) > 20, counts


def test_unfaithful_sft_targets_are_unfaithful():
    rng = random.Random(2)
    verdicts = [S.gold_judgement(d, S.unfaithful_summary(d, rng)) for d in S.generate_documents(300, seed=7)]
    assert set(verdicts) == {"contradicted", "unsupported"}


def test_corpus_files(tmp_path):
    S.write_corpus(tmp_path, seed=0, sizes=SMALL)
    sft, train, evals = (_read(tmp_path / f"{n}.jsonl") for n in ("sft", "train", "eval"))
    assert len(sft) == len(train) == 64 and len(evals) == 8
    assert [r["document"] for r in sft] == [r["document"] for r in train]
    assert all(r["completion"].startswith(" ") and not r["completion"].startswith("  ") for r in sft)
    # the targets: references where faithful, about unfaithful_share of them not
    unfaithful = [r["completion"].strip() != r["reference"] for r in sft]
    assert 0.25 < sum(unfaithful) / len(sft) < 0.75
    for row in evals:
        doc = S.document_from_json(row["facts"])
        assert doc.text == row["document"] and row["prompt"] == S.PROMPT_TEMPLATE.format(document=row["document"])
        assert S.gold_judgement(doc, row["reference"]) == "faithful"
    nli = _read(tmp_path / "nli_train.jsonl")
    assert len(nli) == 60 * 6 and set(nli[0]) == {"premise", "hypothesis", "label", "kind", "form"}
    shares = [sum(r["label"] == label for r in nli) / len(nli) for label in range(3)]
    assert all(abs(s - 1 / 3) < 0.02 for s in shares), shares
    assert len(_read(tmp_path / "nli_eval.jsonl")) == 20 * 6
    # held-out documents are other documents than the training ones
    assert not {r["document"] for r in evals} & {r["document"] for r in sft}
    # same seed, same files
    again = tmp_path / "again"
    S.write_corpus(again, seed=0, sizes=SMALL)
    for name in ("sft", "eval", "nli_train"):
        assert (again / f"{name}.jsonl").read_bytes() == (tmp_path / f"{name}.jsonl").read_bytes()


# -- NLI model ------------------------------------------------------------------------------


def test_token_in_premise_marks_hypothesis_words_found_in_the_premise(tmp_path):
    tok = S.train_nli_tokenizer(["Zorblat is a city in Varnia.", "Velmor"], tmp_path)
    enc = tok(["Zorblat is a city in Varnia."], ["Velmor is a city in Varnia."], return_tensors="pt")
    target, mask = S.token_in_premise(enc, tok.sep_token_id)
    words = tok.convert_ids_to_tokens(enc["input_ids"][0])
    found = {w: bool(t) for w, t, m in zip(words, target[0].tolist(), mask[0].tolist()) if m}
    assert found == {"Velmor": False, "is": True, "a": True, "city": True, "in": True, "Varnia": True, ".": True}


@pytest.fixture(scope="module")
def nli(tmp_path_factory) -> dict:
    """A tiny NLI model trained for 300 steps on 800 documents' statements (~15 s)."""
    root = tmp_path_factory.mktemp("nli")
    sizes = S.CorpusSizes(sft=8, eval=4, nli_train=800, nli_eval=100, statements_per_doc=6)
    S.write_corpus(root / "data", seed=0, sizes=sizes)
    train_rows, eval_rows = _read(root / "data" / "nli_train.jsonl"), _read(root / "data" / "nli_eval.jsonl")
    tokenizer = S.train_nli_tokenizer(S.corpus_texts(root / "data"), root / "model")
    cfg = S.NLITrainConfig(epochs=2, batch_size=32, lr=1e-3)
    metrics = S.train_nli(train_rows, eval_rows, tokenizer, root / "model", cfg)
    return {"dir": root / "model", "metrics": metrics, "eval_rows": eval_rows}


def test_short_nli_training_beats_chance_on_held_out_documents(nli):
    m = nli["metrics"]
    assert m["eval"]["n"] == 600 and m["steps"] == 2 * 4800 // 32
    assert m["eval_accuracy"] > 0.5, m["eval"]  # chance is 1/3 (labels are balanced)
    assert m["eval"]["by_label"]["ENTAILMENT"] > 0.5, m["eval"]  # the class the reward reads
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]
    assert json.loads((nli["dir"] / "metrics.json").read_text())["eval_accuracy"] == m["eval_accuracy"]


def test_saved_nli_model_is_the_entailment_reward(nli):
    import rewards

    reward = rewards.build("entailment", model=str(nli["dir"]), premise_column="document", device="cpu")
    assert reward.model.config.id2label[reward.entail_id] == "ENTAILMENT"
    rows = [r for r in nli["eval_rows"] if r["kind"] in ("restated", "value_swap")][:120]
    scores = reward([""] * len(rows), [r["hypothesis"] for r in rows], document=[r["premise"] for r in rows])
    entailed = [s for s, r in zip(scores, rows) if r["label"] == S.ENTAILMENT]
    contradicted = [s for s, r in zip(scores, rows) if r["label"] == S.CONTRADICTION]
    assert sum(entailed) / len(entailed) > sum(contradicted) / len(contradicted) + 0.2


def test_nli_training_stopped_by_sigterm_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """The pipeline's NLI stage, stopped by SIGTERM mid-epoch, leaves a checkpoint and no model;
    the next run continues it to the weights and metrics of a run that was never stopped."""
    from align.jobs.summarize import pipeline

    sizes = S.CorpusSizes(sft=8, eval=4, nli_train=40, nli_eval=10, statements_per_doc=6)  # 240 rows
    data = tmp_path / "data"
    S.write_corpus(data, seed=0, sizes=sizes)
    cfg = S.NLITrainConfig(epochs=2, batch_size=32, warmup_steps=4, hidden=32, layers=1, save_every=3)
    straight = tmp_path / "straight"  # 8 steps an epoch, 16 in all
    tokenizer = S.train_nli_tokenizer(S.corpus_texts(data), straight)
    done = S.train_nli(_read(data / "nli_train.jsonl"), _read(data / "nli_eval.jsonl"), tokenizer, straight, cfg)

    def stop_at_five(step: int, record: dict) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(pipeline, "train_nli", functools.partial(S.train_nli, on_step=stop_at_five))
    target, run = tmp_path / "nli_model", tmp_path / "nli_model_run"
    with pytest.raises(KeyboardInterrupt):
        pipeline.ensure_nli_model(target, data, S.Setup(sizes=sizes, nli=cfg))
    assert not target.exists() and not list(tmp_path.glob(".nli_model.tmp-*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000005"]  # keep_last 1
    monkeypatch.setattr(pipeline, "train_nli", S.train_nli)
    pipeline.ensure_nli_model(target, data, S.Setup(sizes=sizes, nli=cfg))

    saved, resumed = load_file(straight / "model.safetensors"), load_file(target / "model.safetensors")
    assert saved.keys() == resumed.keys() and not any("match_head" in k for k in saved)
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)
    timeless = [[{k: v for k, v in r.items() if k != "step_s"} for r in read_metrics(d)] for d in (straight, run)]
    assert timeless[0] == timeless[1] and [r["step"] for r in timeless[0]] == list(range(1, 17))
    again = json.loads((target / "metrics.json").read_text())
    assert again["history"] == done["history"] and again["eval_accuracy"] == done["eval_accuracy"]


# -- recipes and the end-to-end path --------------------------------------------------------------


def test_recipes_validate_and_agree():
    rl = load_recipe(Recipe, S.RL_RECIPE)
    sft = load_recipe(Recipe, S.SFT_RECIPE)
    assert rl.prepare == "summarize" and rl.objective.name == "rloo" and rl.objective.k >= 2
    assert rl.objective.beta and rl.objective.beta > 0
    (component,) = rl.reward
    assert component.name == "entailment" and component.options["premise_column"] == "document"
    assert Path(component.options["model"]) == Path(rl.model.path).parent / "nli_model" == S.nli_model_dir(rl)
    assert rl.data.prompt_template == sft.data.prompt_template == S.PROMPT_TEMPLATE
    assert Path(rl.data.train).parent == Path(sft.data.train).parent == Path(rl.model.path).parent / "data"
    assert sft.objective.name == "sft" and not sft.objective.online and sft.prepare is None
    assert Path(sft.model.path) == Path(rl.model.path).parent / "base_model"
    assert not rl.output.report  # the trainer's generic report has no document column


def test_align_summarize_end_to_end_on_toy_sizes(tmp_path, monkeypatch):
    root = tmp_path / "assets"
    overrides = [
        f"model.path={root / 'sft_model'}",
        f"data.train={root / 'data' / 'train.jsonl'}",
        f"reward=[{{name: entailment, options: {{model: {root / 'nli_model'}, premise_column: document}}}}]",
        f"output.dir={tmp_path / 'run'}",
        "train.steps=2",
        "train.batch_size=2",
        "objective.k=2",
        "generation.max_new_tokens=8",
    ]
    recipe = load_recipe(Recipe, S.RL_RECIPE, overrides)
    setup = S.Setup(
        sizes=SMALL,
        policy=S.PolicySize(n_layer=1, n_embd=32, n_head=2),
        nli=S.NLITrainConfig(epochs=1, hidden=32, layers=1),
        sft_overrides=("train.steps=3", "train.batch_size=4"),
    )
    out = S.run_summarize(recipe, setup)
    assert out["summary"]["steps"] == 2
    for name in ("data", "base_model", "nli_model", "sft_model"):
        assert (root / name).is_dir()
    assert not list(root.glob(".*tmp*"))  # nothing half-built left behind
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    keys = {k for k, _, _ in S.REPORT_METRICS}
    assert keys <= set(report["before"]) and keys <= set(report["after"])
    assert report["before"]["kl_k1"] == 0.0  # "before" is the reference itself
    assert report["n_eval"] == 8 and len(report["samples"]) == 8
    assert 0 <= report["after"]["entailment_rate"] <= 1 and report["after"]["length_tokens"] > 0
    rates = [report["after"][f"gold_{v}_rate"] for v in ("faithful", "contradicted", "unsupported", "unparsed")]
    assert sum(rates) == pytest.approx(1.0)
    assert "nli_eval_accuracy" in report
    assert "entailment rate" in (tmp_path / "run" / "report.md").read_text()
    # a second run reuses every prepared piece
    stamp = (root / "sft_model" / "config.json").stat().st_mtime_ns
    S.prepare_summarize(recipe, setup)
    assert (root / "sft_model" / "config.json").stat().st_mtime_ns == stamp


def test_align_train_prepares_the_summarize_assets_first(monkeypatch, tmp_path):
    from align.jobs import train as train_job
    from align.jobs.summarize import pipeline

    class Prepared(Exception):
        pass

    seen = []

    def fake_prepare(recipe, setup=None):
        seen.append(recipe.model.path)
        raise Prepared

    monkeypatch.setattr(pipeline, "prepare_summarize", fake_prepare)
    recipe = load_recipe(Recipe, S.RL_RECIPE, [f"model.path={tmp_path / 'sft_model'}"])
    with pytest.raises(Prepared):
        train_job.run(recipe)
    assert seen == [str(tmp_path / "sft_model")]
