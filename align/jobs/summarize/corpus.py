"""Gold faithfulness (a completion parsed with the corpus grammar and checked against the
document's facts) and the corpus files written under ``root/data``."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from align.jobs.quickstart.corpus import read_jsonl, write_jsonl
from align.jobs.summarize.grammar import (
    POOLS,
    PROMPT_TEMPLATE,
    TYPES,
    Document,
    make_document,
    make_statements,
    reference_summary,
    unfaithful_summary,
)

# ---------------------------------------------------------------------------------------------
# Gold faithfulness: parse a completion with the corpus grammar and check it against the facts
# ---------------------------------------------------------------------------------------------


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{name\}|\{v\})", template)
    regex = "".join("(?P<name>.+?)" if p == "{name}" else "(?P<v>.+?)" if p == "{v}" else re.escape(p) for p in parts)
    return re.compile(regex + r"\Z")


_KIND_PATTERNS = {t: _pattern(e.kind.fragment) for t, e in TYPES.items()}
_FRAGMENT_PATTERNS = {t: [(s.name, _pattern(s.fragment)) for s in e.extras] for t, e in TYPES.items()}


def parse_summary(text: str) -> tuple[str, str, dict[str, str]] | None:
    """(type, name, claims) of a summary written in the corpus grammar, else None."""
    text = text.strip()
    if not text.endswith("."):
        return None
    pieces = text[:-1].split(", ")
    for doc_type, pattern in _KIND_PATTERNS.items():
        m = pattern.match(pieces[0])
        if not m or m["v"] not in POOLS[TYPES[doc_type].kind.pool]:
            continue
        claims = {TYPES[doc_type].kind.name: m["v"]}
        for piece in pieces[1:]:
            found = next(((slot, p.match(piece)) for slot, p in _FRAGMENT_PATTERNS[doc_type] if p.match(piece)), None)
            if found is None or found[0] in claims:
                return None
            claims[found[0]] = found[1]["v"]
        return doc_type, m["name"], claims
    return None


def gold_judgement(doc: Document, completion: str) -> str:
    """``faithful`` (every claim is a fact of the document), ``contradicted`` (some claim has
    another value than the document's), ``unsupported`` (another entity or type, or a fact the
    document does not state) or ``unparsed`` (not a sentence of the summary grammar)."""
    parsed = parse_summary(completion)
    if parsed is None:
        return "unparsed"
    doc_type, name, claims = parsed
    if doc_type != doc.type or name != doc.name:
        return "unsupported"
    if any(slot in doc.facts and doc.facts[slot] != value for slot, value in claims.items()):
        return "contradicted"
    if any(slot not in doc.facts for slot in claims):
        return "unsupported"
    return "faithful"


def document_from_json(data: str | dict) -> Document:
    row = json.loads(data) if isinstance(data, str) else data
    return Document(row["type"], row["name"], dict(row["facts"]), bool(row.get("female", False)))


def document_to_json(doc: Document) -> str:
    return json.dumps({"type": doc.type, "name": doc.name, "facts": doc.facts, "female": doc.female})


# ---------------------------------------------------------------------------------------------
# Corpus files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSizes:
    sft: int = 4000  # documents for SFT (their prompts also serve RL)
    eval: int = 200  # held-out documents for the report
    nli_train: int = 3000  # documents for NLI training (statements_per_doc each)
    nli_eval: int = 300  # documents for held-out NLI accuracy
    statements_per_doc: int = 6
    unfaithful_share: float = 0.3  # SFT targets with a wrong or invented fact


# independent random streams, so changing one size leaves the other files as they were
_STREAMS = {"sft": 1, "eval": 2, "nli_train": 3, "nli_eval": 4}


def _stream(seed: int, name: str) -> random.Random:
    return random.Random(seed * 1_000_003 + _STREAMS[name])


def nli_rows(docs: list[Document], per_doc: int, rng: random.Random) -> list[dict]:
    rows = []
    for doc in docs:
        premise = doc.text
        for s in make_statements(doc, per_doc, rng):
            rows.append({"premise": premise, "hypothesis": s.text, "label": s.label, "kind": s.kind, "form": s.form})
    rng.shuffle(rows)
    return rows


def write_corpus(data_dir: Path, seed: int = 0, sizes: CorpusSizes | None = None) -> None:
    """The corpus files of the module docstring, deterministic for ``seed``."""
    sizes = sizes or CorpusSizes()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = _stream(seed, "sft")
    sft_rows, train_rows = [], []
    for doc in [make_document(rng) for _ in range(sizes.sft)]:
        reference = reference_summary(doc, rng)
        target = unfaithful_summary(doc, rng) if rng.random() < sizes.unfaithful_share else reference
        sft_rows.append({"document": doc.text, "reference": reference, "completion": " " + target})
        train_rows.append({"document": doc.text, "reference": reference})
    rng = _stream(seed, "eval")
    eval_rows = []
    for doc in [make_document(rng) for _ in range(sizes.eval)]:
        eval_rows.append(
            {
                "document": doc.text,
                "reference": reference_summary(doc, rng),
                "prompt": PROMPT_TEMPLATE.format(document=doc.text),
                "facts": document_to_json(doc),
            }
        )
    rng = _stream(seed, "nli_train")
    nli_train = nli_rows([make_document(rng) for _ in range(sizes.nli_train)], sizes.statements_per_doc, rng)
    rng = _stream(seed, "nli_eval")
    nli_eval = nli_rows([make_document(rng) for _ in range(sizes.nli_eval)], sizes.statements_per_doc, rng)
    for name, rows in [
        ("sft", sft_rows),
        ("train", train_rows),
        ("eval", eval_rows),
        ("nli_train", nli_train),
        ("nli_eval", nli_eval),
    ]:
        write_jsonl(data_dir / f"{name}.jsonl", rows)


def corpus_texts(data_dir: Path) -> list[str]:
    """Every text of the corpus (documents, summaries, statements): what the tokenizers learn."""
    texts: list[str] = []
    for row in read_jsonl(Path(data_dir) / "sft.jsonl"):
        texts += [PROMPT_TEMPLATE.format(document=row["document"]) + row["completion"], row["reference"]]
    for row in read_jsonl(Path(data_dir) / "nli_train.jsonl"):
        texts.append(row["hypothesis"])
    return texts
