"""The corpus grammar: invented names, fact slots, documents, summaries and NLI statements."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

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


def _fact(name: str, pool: str, predicate: str, fragment: str) -> Slot:
    """A fact the entity is the subject of: "{S} was founded in {v}." / "{name} was founded in {v}."."""
    return Slot(name, pool, f"{{S}} {predicate}.", f"{{name}} {predicate}.", fragment)


def _attribute(name: str, pool: str, attribute: str, fragment: str) -> Slot:
    """An attribute the entity has: "{P} mayor is {v}." / "The mayor of {name} is {v}."."""
    return Slot(name, pool, f"{{P}} {attribute} is {{v}}.", f"The {attribute} of {{name}} is {{v}}.", fragment)


# Each entity type's kind fact: (type, slot, pool, its clause: sentence, statement and summary clause).
_KINDS = (
    ("city", "country", "country", "{name} is a city in {v}"),
    ("company", "base", "town", "{name} is a company based in {v}"),
    ("person", "occupation", "occupation", "{name} is a {v}"),
)
# The extra facts that may follow it, by type, in document order.
_EXTRAS: tuple[tuple[str, Slot], ...] = (
    ("city", _fact("population", "population", "has {v} inhabitants", "with {v} inhabitants")),
    ("city", _attribute("mayor", "person", "mayor", "whose mayor is {v}")),
    ("city", _fact("founded", "year", "was founded in {v}", "founded in {v}")),
    ("city", _fact("river", "river", "lies on the {v} river", "on the {v} river")),
    ("city", _attribute("industry", "industry", "main industry", "known for {v}")),
    ("city", _fact("landmark", "landmark", "is famous for its {v}", "famous for its {v}")),
    ("company", _fact("founded", "year", "was founded in {v}", "founded in {v}")),
    ("company", _attribute("ceo", "person", "chief executive", "led by {v}")),
    ("company", _fact("product", "product", "makes {v}", "which makes {v}")),
    ("company", _fact("employees", "employees", "employs {v} people", "with {v} employees")),
    ("company", _attribute("rival", "company", "main rival", "whose rival is {v}")),
    ("person", _fact("country", "country", "comes from {v}", "from {v}")),
    ("person", _fact("born", "year", "was born in {v}", "born in {v}")),
    ("person", _fact("home", "town", "lives in {v}", "who lives in {v}")),
    ("person", _fact("prize", "prize", "won the {v}", "who won the {v}")),
    ("person", _fact("spouse", "person", "is married to {v}", "married to {v}")),
    ("person", _fact("instrument", "instrument", "plays the {v}", "who plays the {v}")),
)
TYPES: dict[str, EntityType] = {
    name: EntityType(name, _kind(slot, pool, clause), tuple(extra for t, extra in _EXTRAS if t == name))
    for name, slot, pool, clause in _KINDS
}

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
