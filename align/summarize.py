"""Summarisation with a textual-entailment reward (Roit et al. 2023), end to end and offline.

``align summarize`` builds everything it needs from code, then trains and reports:

1. **Corpus.** Short documents of invented facts about invented entities (cities, companies,
   people): "Zorblat is a city in Varnia. It has 40,000 inhabitants. Its mayor is Ilsa Korm."
   (3-6 sentences, deterministic by seed), each with a faithful one-sentence reference summary
   ("Zorblat is a city in Varnia, with 40,000 inhabitants.").
2. **NLI model.** A tiny BERT (``AutoModelForSequenceClassification``, labels ENTAILMENT /
   NEUTRAL / CONTRADICTION) with its own word-level tokenizer, trained on (document,
   statement) pairs whose label holds by construction: *entailed* statements restate facts of
   the document, *contradicted* ones change exactly one fact's value (another value of the same
   slot; a swap with another person the document names needs two person slots, which no bundled
   type has), *neutral* ones assert a fact the document does
   not mention, name another entity, or are word salad. Statements come both as single facts
   and in the summary form the policy writes. Saved with ``save_pretrained``, so
   ``rewards.build("entailment", model=DIR)`` loads it like any hub NLI model. A first-layer
   attention initialised to match identical words and an auxiliary per-token loss ("does this
   hypothesis word occur in the premise?") let it learn in a minute what a standard init takes
   thousands of steps to start on. It judges which facts a statement asserts, not their word
   order: scrambled statements mostly pass as entailed, which the gold rate below would expose.
3. **Policy.** A tiny GPT-2 with a tokenizer trained on the corpus, supervised-fine-tuned
   (``recipes/summarize/sft.yaml``) on (document, summary) rows of which a share is
   deliberately unfaithful (one fact changed, or an invented fact added): the SFT policy writes
   summary-shaped sentences that are sometimes wrong.
4. **RL.** ``recipes/summarize/entailment_rloo.yaml``: RLOO with the ``entailment`` reward,
   premise = the document, hypothesis = the completion, KL to the SFT policy.
5. **Report.** On held-out documents, SFT policy (before) against RL policy (after):
   entailment rate (share of completions with P(entailment) > 0.5 under the NLI model), mean
   P(entailment), ROUGE-L against the reference, length, KL, and a *gold* faithfulness rate
   that parses each completion with the corpus grammar and checks every claimed fact against the
   document, independent of the NLI model (so reward hacking would show). Written to the run
   directory as ``report.json`` and ``report.md``.

Layout under ``root`` (the directory holding the RL recipe's ``model.path``; by default
``.cache/summarize``), each piece built only if missing and published atomically::

    root/data/sft.jsonl         document, reference, completion   (completion: " " + summary, some unfaithful)
    root/data/train.jsonl       document, reference               (RL prompts)
    root/data/eval.jsonl        document, reference, prompt, facts (held-out documents; facts as JSON)
    root/data/nli_train.jsonl   premise, hypothesis, label, form, changed
    root/data/nli_eval.jsonl    the same, from other documents
    root/base_model/            untrained tiny GPT-2 + tokenizer
    root/nli_model/             trained NLI classifier + tokenizer + metrics.json
    root/sft_model/             the SFT policy (the RL recipe's model.path)
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.quickstart import _atomic_dir, _read_jsonl, _write_jsonl, save_quietly

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "summarize"
RL_RECIPE = RECIPES / "entailment_rloo.yaml"
SFT_RECIPE = RECIPES / "sft.yaml"
PROMPT_TEMPLATE = "{document}\n\nSummary:"

# ---------------------------------------------------------------------------------------------
# Vocabulary: invented names and the values each fact slot takes
# ---------------------------------------------------------------------------------------------

# fmt: off
_SYLLABLES = ["zor", "blat", "vel", "trix", "mor", "dan", "kel", "vin", "ras", "tor", "pel", "quin",
              "bra", "lom", "sef", "nar", "gul", "dex", "fia", "ron", "tam", "wex"]
_TOWN_SUFFIXES = ["holm", "ford", "wick", "stad", "mere", "gate"]
FEMALE_NAMES = ["Ilsa", "Mara", "Tova", "Wenna", "Orla", "Signe", "Nadia", "Petra", "Lune", "Ysolde"]
MALE_NAMES = ["Arvid", "Bram", "Emil", "Gorm", "Josef", "Kasimir", "Olek", "Ruben", "Teodor", "Vidar"]
SURNAMES = ["Korm", "Vantis", "Delmar", "Osk", "Ferrow", "Quill", "Marsh", "Tobel", "Rynn", "Halvar",
            "Steen", "Corvo", "Albrek", "Nyland", "Pasko", "Umber"]
COUNTRIES = ["Varnia", "Ostrel", "Quenmark", "Dravonia", "Felmoria", "Kastova", "Luneth", "Morvane",
             "Pellucia", "Tarsk", "Zembria", "Hollin"]
YEARS = [str(y) for y in range(1620, 1990, 15)]
POPULATIONS = ["8,000", "12,000", "25,000", "40,000", "65,000", "90,000", "150,000", "300,000",
               "480,000", "750,000"]
EMPLOYEES = ["40", "120", "350", "800", "1,500", "4,000", "9,000"]
RIVERS = ["Olm", "Serra", "Tavel", "Krina", "Duvel", "Amber", "Nesk", "Orrin", "Palla", "Wend"]
INDUSTRIES = ["fishing", "mining", "weaving", "shipbuilding", "tourism", "farming", "glassmaking", "printing"]
LANDMARKS = ["old bridge", "clock tower", "harbour", "stone castle", "botanical garden", "opera house",
             "salt mines", "spring festival"]
PRODUCTS = ["bicycles", "solar panels", "toys", "tea", "shoes", "maps", "pianos", "boats", "lamps", "soap"]
OCCUPATIONS = ["painter", "chemist", "composer", "architect", "poet", "astronomer", "sculptor", "engineer"]
PRIZES = ["Orlan Prize", "Vesk Medal", "Tamber Award", "Golden Quill", "Silver Compass", "Ardent Prize"]
INSTRUMENTS = ["violin", "cello", "harp", "flute", "drums", "piano", "oboe", "lute"]
# fmt: on


def _entity_names() -> list[str]:
    return [(a + b).capitalize() for a in _SYLLABLES for b in _SYLLABLES if a != b]


def _town_names() -> list[str]:
    return [s.capitalize() + suffix for s in _SYLLABLES for suffix in _TOWN_SUFFIXES]


def _people() -> list[str]:
    return [f"{first} {last}" for first in FEMALE_NAMES + MALE_NAMES for last in SURNAMES]


ENTITY_NAMES = _entity_names()
TOWNS = _town_names()
PEOPLE = _people()
POOLS: dict[str, list[str]] = {
    "country": COUNTRIES,
    "town": TOWNS,
    "person": PEOPLE,
    "company": ENTITY_NAMES,
    "year": YEARS,
    "population": POPULATIONS,
    "employees": EMPLOYEES,
    "river": RIVERS,
    "industry": INDUSTRIES,
    "landmark": LANDMARKS,
    "product": PRODUCTS,
    "occupation": OCCUPATIONS,
    "prize": PRIZES,
    "instrument": INSTRUMENTS,
}


@dataclass(frozen=True)
class Slot:
    """One kind of fact and the three ways it is written.

    ``sentence``: in a document, after the first sentence (``{S}`` subject pronoun, ``{P}``
    possessive); ``statement``: on its own (``{name}``); ``fragment``: a clause of a summary.
    ``pool`` names the list of values in :data:`POOLS`.
    """

    name: str
    pool: str
    sentence: str
    statement: str
    fragment: str


@dataclass(frozen=True)
class EntityType:
    """An entity type: its first ("kind") sentence and the optional facts that may follow it."""

    name: str
    kind: Slot  # sentence == statement == fragment-with-name: "{name} is a city in {v}"
    extras: tuple[Slot, ...]

    def slot(self, name: str) -> Slot:
        return self.kind if name == self.kind.name else next(s for s in self.extras if s.name == name)


def _kind(name: str, pool: str, clause: str) -> Slot:
    return Slot(name, pool, clause + ".", clause + ".", clause)


# fmt: off
TYPES: dict[str, EntityType] = {
    "city": EntityType(
        "city",
        _kind("country", "country", "{name} is a city in {v}"),
        (
            Slot("population", "population", "{S} has {v} inhabitants.", "{name} has {v} inhabitants.",
                 "with {v} inhabitants"),
            Slot("mayor", "person", "{P} mayor is {v}.", "The mayor of {name} is {v}.", "whose mayor is {v}"),
            Slot("founded", "year", "{S} was founded in {v}.", "{name} was founded in {v}.", "founded in {v}"),
            Slot("river", "river", "{S} lies on the {v} river.", "{name} lies on the {v} river.",
                 "on the {v} river"),
            Slot("industry", "industry", "{P} main industry is {v}.", "The main industry of {name} is {v}.",
                 "known for {v}"),
            Slot("landmark", "landmark", "{S} is famous for its {v}.", "{name} is famous for its {v}.",
                 "famous for its {v}"),
        ),
    ),
    "company": EntityType(
        "company",
        _kind("base", "town", "{name} is a company based in {v}"),
        (
            Slot("founded", "year", "{S} was founded in {v}.", "{name} was founded in {v}.", "founded in {v}"),
            Slot("ceo", "person", "{P} chief executive is {v}.", "The chief executive of {name} is {v}.",
                 "led by {v}"),
            Slot("product", "product", "{S} makes {v}.", "{name} makes {v}.", "which makes {v}"),
            Slot("employees", "employees", "{S} employs {v} people.", "{name} employs {v} people.",
                 "with {v} employees"),
            Slot("rival", "company", "{P} main rival is {v}.", "The main rival of {name} is {v}.",
                 "whose rival is {v}"),
        ),
    ),
    "person": EntityType(
        "person",
        _kind("occupation", "occupation", "{name} is a {v}"),
        (
            Slot("country", "country", "{S} comes from {v}.", "{name} comes from {v}.", "from {v}"),
            Slot("born", "year", "{S} was born in {v}.", "{name} was born in {v}.", "born in {v}"),
            Slot("home", "town", "{S} lives in {v}.", "{name} lives in {v}.", "who lives in {v}"),
            Slot("prize", "prize", "{S} won the {v}.", "{name} won the {v}.", "who won the {v}"),
            Slot("spouse", "person", "{S} is married to {v}.", "{name} is married to {v}.", "married to {v}"),
            Slot("instrument", "instrument", "{S} plays the {v}.", "{name} plays the {v}.", "who plays the {v}"),
        ),
    ),
}
# fmt: on
# Labels of the NLI model, in id order (config.id2label).
LABELS = ("ENTAILMENT", "NEUTRAL", "CONTRADICTION")
ENTAILMENT, NEUTRAL, CONTRADICTION = range(3)


# ---------------------------------------------------------------------------------------------
# Documents, summaries and statements
# ---------------------------------------------------------------------------------------------


@dataclass
class Document:
    """An entity and its facts (slot -> value, the kind slot first, in document order)."""

    type: str
    name: str
    facts: dict[str, str]
    female: bool = False

    @property
    def entity(self) -> EntityType:
        return TYPES[self.type]

    @property
    def text(self) -> str:
        subject, possessive = ("She", "Her") if self.female else ("He", "His")
        if self.type != "person":
            subject, possessive = "It", "Its"
        sentences = []
        for slot_name, value in self.facts.items():
            slot = self.entity.slot(slot_name)
            sentences.append(slot.sentence.format(name=self.name, v=value, S=subject, P=possessive))
        return " ".join(sentences)

    def absent_slots(self) -> list[str]:
        return [s.name for s in self.entity.extras if s.name not in self.facts]

    def persons(self) -> list[str]:
        """The people the document names (values of person slots, and the entity if a person)."""
        named = [v for k, v in self.facts.items() if self.entity.slot(k).pool == "person"]
        return named + ([self.name] if self.type == "person" else [])


def summary_text(doc_type: str, name: str, claims: dict[str, str]) -> str:
    """A one-sentence summary: the kind clause, then a clause per extra fact, comma-separated.

    ``claims`` holds the kind slot and the extra slots, in order (the kind slot first).
    """
    entity = TYPES[doc_type]
    parts = [entity.kind.fragment.format(name=name, v=claims[entity.kind.name])]
    parts += [entity.slot(k).fragment.format(v=v) for k, v in claims.items() if k != entity.kind.name]
    return ", ".join(parts) + "."


def statement_text(doc_type: str, name: str, slot: str, value: str) -> str:
    return TYPES[doc_type].slot(slot).statement.format(name=name, v=value)


def _other_value(rng: random.Random, pool: str, current: str, avoid: Sequence[str] = ()) -> str:
    choices = [v for v in POOLS[pool] if v != current and v not in avoid]
    return rng.choice(choices)


def make_document(rng: random.Random) -> Document:
    """A random entity with its kind fact and 2-5 extra facts (3-6 sentences)."""
    doc_type = rng.choice(list(TYPES))
    entity = TYPES[doc_type]
    female = rng.random() < 0.5
    if doc_type == "person":
        first = rng.choice(FEMALE_NAMES if female else MALE_NAMES)
        name = f"{first} {rng.choice(SURNAMES)}"
    else:
        name = rng.choice(ENTITY_NAMES)
    n_extra = rng.randint(2, min(5, len(entity.extras)))
    extras = rng.sample(entity.extras, n_extra)
    facts = {entity.kind.name: rng.choice(POOLS[entity.kind.pool])}
    used_people = {name}
    for slot in extras:
        value = rng.choice([v for v in POOLS[slot.pool] if v not in used_people and v != name])
        if slot.pool == "person":
            used_people.add(value)
        facts[slot.name] = value
    return Document(doc_type, name, facts, female)


def generate_documents(n: int, seed: int = 0) -> list[Document]:
    """``n`` documents, deterministic for ``seed``."""
    rng = random.Random(seed)
    return [make_document(rng) for _ in range(n)]


def reference_summary(doc: Document, rng: random.Random) -> str:
    """A faithful one-sentence summary: the kind fact plus one or two of the document's facts."""
    kind = doc.entity.kind.name
    extras = [k for k in doc.facts if k != kind]
    chosen = rng.sample(extras, rng.choice([1, 2]) if len(extras) > 1 else 1)
    chosen = [k for k in doc.facts if k in chosen]  # document order
    return summary_text(doc.type, doc.name, {kind: doc.facts[kind], **{k: doc.facts[k] for k in chosen}})


@dataclass
class Statement:
    """A hypothesis about a document with its label, true by construction.

    ``claims``: slot -> value the statement asserts about ``name``; ``changed``: the slot whose
    value differs from the document's (contradiction), or that the document lacks (neutral,
    ``absent``); ``form``: ``fact`` (one slot) or ``summary``; ``kind``: how it was made.
    """

    text: str
    label: int
    name: str
    claims: dict[str, str]
    form: str
    kind: str
    changed: str | None = None


def _claim_slots(doc: Document, rng: random.Random, form: str) -> list[str]:
    """Slots of the document a statement talks about (kind first for summaries)."""
    kind = doc.entity.kind.name
    if form == "fact":
        return [rng.choice(list(doc.facts))]
    extras = [k for k in doc.facts if k != kind]
    chosen = rng.sample(extras, min(len(extras), rng.choice([1, 1, 2])))
    return [kind] + [k for k in doc.facts if k in chosen]


def _render(doc: Document, name: str, claims: dict[str, str], form: str) -> str:
    if form == "fact":
        ((slot, value),) = claims.items()
        return statement_text(doc.type, name, slot, value)
    return summary_text(doc.type, name, claims)


def make_statement(doc: Document, label: int, rng: random.Random, form: str | None = None) -> Statement:
    """A statement about ``doc`` with the given label (see the module docstring for the kinds)."""
    form = form or rng.choice(["fact", "summary"])
    slots = _claim_slots(doc, rng, form)
    claims = {k: doc.facts[k] for k in slots}
    if label == ENTAILMENT:
        return Statement(_render(doc, doc.name, claims, form), label, doc.name, claims, form, "restated")
    if label == CONTRADICTION:
        changed = rng.choice(slots)
        pool = doc.entity.slot(changed).pool
        others = [p for p in doc.persons() if p not in (claims[changed], doc.name)] if pool == "person" else []
        if others and rng.random() < 0.5:  # an entity swap: another person of the same document
            claims[changed], kind = rng.choice(others), "entity_swap"
        else:
            claims[changed], kind = _other_value(rng, pool, claims[changed], avoid=[doc.name]), "value_swap"
        return Statement(_render(doc, doc.name, claims, form), label, doc.name, claims, form, kind, changed)
    # neutral: a fact the document does not state, a different entity, or no proposition at all
    absent = doc.absent_slots()
    choice = rng.random()
    if absent and choice < 0.6:
        changed = rng.choice(absent)
        value = rng.choice(POOLS[doc.entity.slot(changed).pool])
        if form == "fact":
            claims = {changed: value}
        else:
            claims = {**claims, changed: value}
        return Statement(_render(doc, doc.name, claims, form), label, doc.name, claims, form, "absent", changed)
    if choice < 0.88:
        pool = PEOPLE if doc.type == "person" else ENTITY_NAMES
        other = rng.choice([n for n in pool if n != doc.name and n not in doc.facts.values()])
        return Statement(_render(doc, other, claims, form), label, other, claims, form, "other_entity", "name")
    words = _render(doc, doc.name, claims, form).rstrip(".").split(" ")
    shuffled = words[:]
    while shuffled == words:
        rng.shuffle(shuffled)
    return Statement(" ".join(shuffled) + ".", label, doc.name, claims, form, "word_salad")


def make_statements(doc: Document, n: int, rng: random.Random) -> list[Statement]:
    """``n`` statements about ``doc`` with labels cycling entailment, neutral, contradiction."""
    start = rng.randrange(3)
    return [make_statement(doc, (start + i) % 3, rng) for i in range(n)]


def unfaithful_summary(doc: Document, rng: random.Random) -> str:
    """A summary-shaped sentence with one wrong fact or one invented fact (SFT noise)."""
    label = NEUTRAL if doc.absent_slots() and rng.random() < 0.5 else CONTRADICTION
    while True:
        statement = make_statement(doc, label, rng, form="summary")
        if statement.kind in ("value_swap", "entity_swap", "absent"):
            return statement.text


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
        _write_jsonl(data_dir / f"{name}.jsonl", rows)


def corpus_texts(data_dir: Path) -> list[str]:
    """Every text of the corpus (documents, summaries, statements): what the tokenizers learn."""
    texts: list[str] = []
    for row in _read_jsonl(Path(data_dir) / "sft.jsonl"):
        texts += [PROMPT_TEMPLATE.format(document=row["document"]) + row["completion"], row["reference"]]
    for row in _read_jsonl(Path(data_dir) / "nli_train.jsonl"):
        texts.append(row["hypothesis"])
    return texts


# ---------------------------------------------------------------------------------------------
# Tokenizers and models
# ---------------------------------------------------------------------------------------------

MAX_LENGTH = 256  # NLI tokens: a document plus a statement is under 100 words and punctuation


def train_policy_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 1024):
    """The quickstart's byte-level BPE (``<s>`` prepended, ``</s>`` = EOS), sized for documents."""
    from align.quickstart import train_tokenizer

    tokenizer = train_tokenizer(texts, out_dir, vocab_size)
    tokenizer.model_max_length = MAX_LENGTH
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def vocabulary_texts() -> list[str]:
    """Every word the corpus grammar can produce (templates and slot values), for the NLI vocabulary."""
    texts = [v for pool in POOLS.values() for v in pool] + FEMALE_NAMES + MALE_NAMES + SURNAMES
    for entity in TYPES.values():
        for slot in (entity.kind, *entity.extras):
            texts += [slot.sentence, slot.statement, slot.fragment]
    return texts + ["He She It His Her Its Summary :"]


def train_nli_tokenizer(texts: list[str], out_dir: Path):
    """A word-level tokenizer (words and punctuation) with BERT's pair layout:
    ``[CLS] premise [SEP] hypothesis [SEP]``, token type ids 0 / 1; saved so
    ``AutoTokenizer.from_pretrained(out_dir)`` loads it (fast, with character offsets, as the
    entailment reward's windowing needs).

    One token per word makes "does this hypothesis word occur in the premise" a comparison of
    token ids; every word of the grammar is in the vocabulary, so ``[UNK]`` only stands for a word
    the corpus never uses (a policy's misspelling), which no premise contains.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts) + vocabulary_texts(), trainers.WordLevelTrainer(special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        model_max_length=MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def build_nli_model(
    tokenizer,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    match_init: float = 10.0,
    position_init_scale: float = 0.2,
):
    """A randomly initialised tiny BERT classifier with the three NLI labels named in its config.

    Initialisation helps it find the premise-hypothesis alignment fast (from a standard init a
    tiny BERT sits at chance for thousands of steps on this task): in the first layer the key
    projection starts equal to the query projection, both scaled by ``match_init``, so a token
    attends to the other occurrences of the same word from the start; position embeddings start
    ``position_init_scale`` times smaller, so the word, not the position, dominates that match.
    Training is free to undo both.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=MAX_LENGTH,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    with torch.no_grad():
        attention = model.bert.encoder.layer[0].attention.self
        attention.query.weight.mul_(match_init)
        attention.key.weight.copy_(attention.query.weight)
        model.bert.embeddings.position_embeddings.weight.mul_(position_init_scale)
    return model


@dataclass
class NLITrainConfig:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    match_init: float = 10.0  # see build_nli_model
    position_init_scale: float = 0.2
    # weight of the auxiliary loss: from each hypothesis token's last hidden state, predict
    # whether the same token occurs in the premise (a per-token signal the label alone lacks)
    match_loss: float = 3.0
    time_limit_s: float | None = None  # stop early (after a batch) when training takes longer


def token_in_premise(enc, sep_token_id: int) -> tuple[Any, Any]:
    """(target, mask) [B, T]: whether each hypothesis token also occurs in the premise; the mask
    selects the hypothesis tokens (segment B, without its [SEP])."""
    ids, types, attn = enc["input_ids"], enc["token_type_ids"], enc["attention_mask"].bool()
    premise = (types == 0) & attn
    hypothesis = (types == 1) & attn & (ids != sep_token_id)
    target = ((ids[:, :, None] == ids[:, None, :]) & premise[:, None, :]).any(-1)
    return target.float(), hypothesis


def _nli_batches(tokenizer, rows: list[dict], batch_size: int):
    import torch

    for lo in range(0, len(rows), batch_size):
        batch = rows[lo : lo + batch_size]
        enc = tokenizer(
            [r["premise"] for r in batch],
            [r["hypothesis"] for r in batch],
            padding=True,
            truncation="only_first",
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        yield enc, torch.tensor([r["label"] for r in batch])


def nli_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 128) -> dict[str, Any]:
    """Held-out accuracy, overall, per gold label and per way the statement was made."""
    import torch

    model.eval()
    predictions: list[int] = []
    with torch.no_grad():
        for enc, _ in _nli_batches(tokenizer, rows, batch_size):
            predictions += model(**enc).logits.argmax(-1).tolist()
    correct = [int(p == r["label"]) for p, r in zip(predictions, rows)]
    by_label = {LABELS[label]: _mean([c for c, r in zip(correct, rows) if r["label"] == label]) for label in range(3)}
    kinds = sorted({r["kind"] for r in rows})
    by_kind = {k: _mean([c for c, r in zip(correct, rows) if r["kind"] == k]) for k in kinds}
    return {"accuracy": _mean(correct), "n": len(rows), "by_label": by_label, "by_kind": by_kind}


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def train_nli(
    train_rows: list[dict], eval_rows: list[dict], tokenizer, out_dir: Path, cfg: NLITrainConfig | None = None
) -> dict[str, Any]:
    """Train the tiny NLI classifier with cross-entropy, save it with its tokenizer and
    ``metrics.json`` (held-out accuracy) to ``out_dir``; returns the metrics."""
    import torch

    cfg = cfg or NLITrainConfig()
    start = time.perf_counter()
    model = build_nli_model(
        tokenizer, cfg.hidden, cfg.layers, cfg.heads, cfg.seed, cfg.match_init, cfg.position_init_scale
    )
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        match_head = torch.nn.Linear(cfg.hidden, 1)  # auxiliary, not saved
    params = [*model.parameters(), *match_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(train_rows) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    def lr_factor(step: int) -> float:  # linear warm-up, then linear decay to 0
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (total - step) / max(1, total - cfg.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(cfg.seed)
    step, history, stopped = 0, [], False
    for epoch in range(cfg.epochs):
        rows = train_rows[:]
        rng.shuffle(rows)
        losses, hits = [], []
        for enc, labels in _nli_batches(tokenizer, rows, cfg.batch_size):
            out = model(**enc, output_hidden_states=cfg.match_loss > 0)
            logits = out.logits
            loss = torch.nn.functional.cross_entropy(logits, labels)
            if cfg.match_loss > 0:
                target, mask = token_in_premise(enc, tokenizer.sep_token_id)
                match_logits = match_head(out.hidden_states[-1]).squeeze(-1)
                bce = torch.nn.functional.binary_cross_entropy_with_logits(match_logits, target, reduction="none")
                loss = loss + cfg.match_loss * (bce * mask).sum() / mask.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            hits.append(float((logits.argmax(-1) == labels).float().mean()))
            if cfg.time_limit_s is not None and time.perf_counter() - start > cfg.time_limit_s:
                stopped = True
                break
        history.append({"epoch": epoch + 1, "step": step, "train_loss": _mean(losses), "train_accuracy": _mean(hits)})
        if stopped:
            break
    held_out = nli_accuracy(model, tokenizer, eval_rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_quietly(model, tokenizer, out_dir)
    metrics = {
        "eval_accuracy": held_out["accuracy"],
        "eval": held_out,
        "n_train": len(train_rows),
        "steps": step,
        "stopped_early": stopped,
        "history": history,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# ---------------------------------------------------------------------------------------------
# The pipeline: each piece built only if missing, in a temp dir renamed into place
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySize:
    """The tiny GPT-2 policy: a prompt is at most ~50 tokens and a summary ~30."""

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    vocab_size: int = 1024


@dataclass(frozen=True)
class Setup:
    """Everything ``prepare_summarize`` builds besides what the recipes say (sizes, NLI training)."""

    seed: int = 0
    sizes: CorpusSizes = field(default_factory=CorpusSizes)
    policy: PolicySize = field(default_factory=PolicySize)
    nli: NLITrainConfig = field(default_factory=NLITrainConfig)
    sft_overrides: tuple[str, ...] = ()  # key=value overrides of recipes/summarize/sft.yaml
    # torch CPU threads while building, training and evaluating (None: torch's default). These
    # models are tiny: one thread is about as fast as two on an idle machine, and several times
    # faster when other jobs share the cores (threads that wait on each other stall).
    threads: int | None = 1


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch CPU threads, then restore the previous setting."""
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _log(message: str) -> None:
    print(f"align summarize: {message}", file=sys.stderr, flush=True)


def ensure_corpus(root: Path, setup: Setup) -> Path:
    """``root/data`` (the corpus files of the module docstring)."""
    target = Path(root) / "data"
    if not target.is_dir():
        _log(f"writing the synthetic corpus to {target}")
    return _atomic_dir(target, lambda d: write_corpus(d, setup.seed, setup.sizes))


def ensure_base_model(root: Path, data_dir: Path, setup: Setup) -> Path:
    """``root/base_model``: the untrained tiny GPT-2 and its tokenizer (quickstart's builders)."""
    from align.quickstart import build_tiny_model

    size = setup.policy

    def build(out: Path) -> None:
        tokenizer = train_policy_tokenizer(corpus_texts(data_dir), out, size.vocab_size)
        tokenizer.model_max_length = size.n_positions
        build_tiny_model(
            tokenizer,
            out,
            n_layer=size.n_layer,
            n_embd=size.n_embd,
            n_head=size.n_head,
            n_positions=size.n_positions,
            seed=setup.seed,
        )

    return _atomic_dir(Path(root) / "base_model", build)


def nli_model_dir(recipe) -> Path:
    """Where the recipe's entailment reward loads its model from (``root/nli_model`` if it has none)."""
    for component in recipe.reward:
        if component.name == "entailment" and "model" in component.options:
            return Path(component.options["model"])
    return Path(recipe.model.path).parent / "nli_model"


def ensure_nli_model(target: Path, data_dir: Path, setup: Setup) -> Path:
    """``target`` (by default ``root/nli_model``): the trained NLI classifier, its tokenizer and
    ``metrics.json``."""
    target = Path(target)
    if target.is_dir():
        return target

    def build(out: Path) -> None:
        train_rows = _read_jsonl(Path(data_dir) / "nli_train.jsonl")
        eval_rows = _read_jsonl(Path(data_dir) / "nli_eval.jsonl")
        _log(f"training the NLI model on {len(train_rows)} statements into {target}")
        tokenizer = train_nli_tokenizer(corpus_texts(data_dir), out)
        metrics = train_nli(train_rows, eval_rows, tokenizer, out, setup.nli)
        _log(
            f"NLI held-out accuracy {metrics['eval_accuracy']:.3f} on {metrics['eval']['n']} statements "
            f"({metrics['seconds']:.0f} s)"
        )

    return _atomic_dir(target, build)


def ensure_sft_model(sft_model: Path, base_model: Path, data_dir: Path, setup: Setup) -> Path:
    """The SFT policy, trained by ``recipes/summarize/sft.yaml`` through the trainer (``align sft``)."""
    from align.quickstart_pipeline import sft_once

    sft_model = Path(sft_model)
    overrides = [
        f"model.path={base_model}",
        f"data.train={Path(data_dir) / 'sft.jsonl'}",
        f"output.dir={sft_model.parent / 'sft_run'}",
        *setup.sft_overrides,
    ]
    return sft_once(SFT_RECIPE, overrides, sft_model, _log)


def prepare_summarize(recipe, setup: Setup | None = None) -> dict[str, Path]:
    """Build what the RL recipe needs under the directory holding its ``model.path``.

    Returns ``root``, ``data``, ``base_model``, ``nli_model`` and ``sft_model``. The NLI model
    is built where the recipe's entailment reward loads it from (its ``model`` option).
    """
    setup = setup or Setup(seed=recipe.train.seed)
    sft_model = Path(recipe.model.path)
    root = sft_model.parent
    with torch_threads(setup.threads):
        data_dir = ensure_corpus(root, setup)
        base = ensure_base_model(root, data_dir, setup)
        nli = ensure_nli_model(nli_model_dir(recipe), data_dir, setup)
        sft = ensure_sft_model(sft_model, base, data_dir, setup)
    return {"root": root, "data": data_dir, "base_model": base, "nli_model": nli, "sft_model": sft}


# ---------------------------------------------------------------------------------------------
# The report: SFT policy (before) against RL policy (after) on held-out documents
# ---------------------------------------------------------------------------------------------

REPORT_METRICS = (
    ("entailment_rate", "entailment rate", "{:.3f}"),
    ("entailment_prob", "mean P(entail)", "{:.3f}"),
    ("gold_faithful_rate", "gold faithful", "{:.3f}"),
    ("gold_contradicted_rate", "gold contradicted", "{:.3f}"),
    ("gold_unsupported_rate", "gold unsupported", "{:.3f}"),
    ("gold_unparsed_rate", "gold unparsed", "{:.3f}"),
    ("false_entailment_rate", "NLI entailed, gold not", "{:.3f}"),
    ("rougeL", "ROUGE-L", "{:.3f}"),
    ("length_tokens", "length (tokens)", "{:.1f}"),
    ("length_words", "length (words)", "{:.1f}"),
    ("kl_k1", "KL k1", "{:.3f}"),
    ("kl_k3", "KL k3", "{:.3f}"),
)


def score_summaries(
    documents: list[Document], texts: list[str], references: list[str], nli_model: str | Path
) -> dict[str, Any]:
    """Per-sample NLI, gold and ROUGE-L scores of ``texts`` (one per document) and their means."""
    import rewards

    nli = rewards.build("entailment", model=str(nli_model), premise_column="document", device="cpu")
    premises = [d.text for d in documents]
    probs = nli(["" for _ in texts], texts, document=premises)
    rouge = rewards.build("rouge", rouge_type="rougeL")(["" for _ in texts], texts, reference=references)
    gold = [gold_judgement(d, t) for d, t in zip(documents, texts)]
    out = {
        "entailment_rate": _mean([float(p > 0.5) for p in probs]),
        "entailment_prob": _mean(probs),
        "rougeL": _mean(rouge),
        "length_words": _mean([len(t.split()) for t in texts]),
    }
    for verdict in ("faithful", "contradicted", "unsupported", "unparsed"):
        out[f"gold_{verdict}_rate"] = _mean([float(g == verdict) for g in gold])
    # where the reward and the truth disagree: the room a policy has to hack the NLI model
    out["false_entailment_rate"] = _mean([float(p > 0.5 and g != "faithful") for p, g in zip(probs, gold)])
    out["per_sample"] = {"entailment_prob": probs, "rougeL": rouge, "gold": gold}
    return out


def evaluate_summaries(
    recipe, policy_dir: str | Path, reference_dir: str | Path, eval_rows: list[dict], nli_model: str | Path
) -> dict[str, dict]:
    """Sample one summary per held-out document from the reference (SFT) policy and from
    ``policy_dir`` with the recipe's generation settings (align.report.evaluate_policy, which
    also gives the KL to the reference) and score both."""
    import torch

    from align.models import load_models
    from align.report import evaluate_policy

    device = torch.device("cpu")
    loaded = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"path": str(policy_dir)}), "reference": str(reference_dir)}
    )
    models = load_models(loaded, device, need_reference=True)
    models.policy.eval()
    prompts = [r["prompt"] for r in eval_rows]
    documents = [document_from_json(r["facts"]) for r in eval_rows]
    references = [r["reference"] for r in eval_rows]
    out = {}
    for name, model in (("before", models.reference), ("after", models.policy)):
        sampled = evaluate_policy(loaded, models, model, prompts, None, device)
        scores = score_summaries(documents, sampled["texts"], references, nli_model)
        out[name] = {
            **{k: v for k, v in scores.items() if k != "per_sample"},
            "length_tokens": sampled["length"],
            "kl_k1": sampled["kl_k1"],
            "kl_k3": sampled["kl_k3"],
            "texts": sampled["texts"],
            "per_sample": scores["per_sample"],
        }
    return out


def write_summarize_report(run_dir: Path, results: dict[str, dict], eval_rows: list[dict], extra: dict) -> dict:
    """report.json and report.md in ``run_dir``, a table on the terminal; returns report.json's content."""
    from rich.console import Console
    from rich.table import Table

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    headline = {name: {k: results[name][k] for k, _, _ in REPORT_METRICS} for name in ("before", "after")}
    samples = []
    for i, row in enumerate(eval_rows[:12]):
        sample = {"document": row["document"], "reference": row["reference"]}
        for name in ("before", "after"):
            per = results[name]["per_sample"]
            sample[name] = {
                "text": results[name]["texts"][i],
                "entailment_prob": per["entailment_prob"][i],
                "gold": per["gold"][i],
            }
        samples.append(sample)
    report = {**headline, "n_eval": len(eval_rows), **extra, "samples": samples}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))

    title = f"summarisation with an entailment reward: SFT (before) vs RL (after), {len(eval_rows)} held-out documents"
    table = Table(title=title)
    for col in ("metric", "before", "after"):
        table.add_column(col)
    lines = [f"# {title}", "", "| metric | before | after |", "|---|---|---|"]
    for key, label, fmt in REPORT_METRICS:
        cells = [fmt.format(headline["before"][key]), fmt.format(headline["after"][key])]
        table.add_row(label, *cells)
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "entailment rate: share of summaries with P(entailment) > 0.5 under the NLI model (premise = the "
        "document); gold: each summary parsed with the corpus grammar and checked against the document's "
        "facts, independent of the NLI model; NLI entailed, gold not: share of summaries the reward "
        "passes that are not faithful; ROUGE-L against the reference summary; KL to the SFT policy.",
    ]
    if "nli_eval_accuracy" in extra:
        lines.append(f"NLI model held-out accuracy: {extra['nli_eval_accuracy']:.3f}.")
    lines += ["", "## Samples", ""]
    for s in samples:
        lines.append(f"- **{s['document']}**")
        lines.append(f"  - reference: `{s['reference']}`")
        for name in ("before", "after"):
            b = s[name]
            lines.append(f"  - {name}: `{b['text'].strip()}` (P(entail) {b['entailment_prob']:.2f}, gold {b['gold']})")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    console = Console()
    console.print(table)
    for s in samples[:3]:
        console.print(f"[bold]{s['document']}[/bold]")
        for name in ("before", "after"):
            console.print(f"  {name}: {s[name]['text'].strip()!r} ({s[name]['gold']})")
    return report


def run_summarize(recipe, setup: Setup | None = None, eval_limit: int | None = None) -> dict:
    """Prepare (if needed), RL-train with ``recipe``, then write the before/after report."""
    from align.trainer import train

    setup = setup or Setup(seed=recipe.train.seed)
    start = time.perf_counter()
    assets = prepare_summarize(recipe, setup)
    prepared_s = time.perf_counter() - start
    rl_start = time.perf_counter()
    with torch_threads(setup.threads):
        summary = train(recipe.model_copy(update={"prepare": None}))
    rl_s = time.perf_counter() - rl_start
    if summary.get("stopped_by"):
        _log(f"stopped by {summary['stopped_by']} at step {summary['steps']}; no report")
        return {"summary": summary}
    eval_rows = _read_jsonl(assets["data"] / "eval.jsonl")[:eval_limit]
    with torch_threads(setup.threads):
        results = evaluate_summaries(recipe, summary["final_model"], recipe.model.path, eval_rows, assets["nli_model"])
    nli_metrics_file = Path(assets["nli_model"]) / "metrics.json"
    extra: dict[str, Any] = {"rl_steps": summary["steps"], "prepare_s": round(prepared_s, 1), "rl_s": round(rl_s, 1)}
    if nli_metrics_file.is_file():
        extra["nli_eval_accuracy"] = json.loads(nli_metrics_file.read_text())["eval_accuracy"]
    extra["seconds"] = round(time.perf_counter() - start, 1)
    report = write_summarize_report(Path(recipe.output.dir), results, eval_rows, extra)
    return {"summary": summary, "report": report}


def main(args) -> int:
    """``align summarize [RECIPE] [key=value ...]``: prepare, RL-train and report."""
    from align.config import load_recipe
    from align.recipe import Recipe

    recipe = load_recipe(Recipe, args.recipe or RL_RECIPE, list(args.overrides))
    if recipe.prepare not in (None, "summarize"):
        _log(f"recipe prepares {recipe.prepare!r}, not summarize")
        return 2
    out = run_summarize(recipe)
    if "report" not in out:
        return 1
    print(f"align summarize: report in {Path(recipe.output.dir) / 'report.md'}")
    return 0
