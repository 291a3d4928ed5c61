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
    root/nli_model_run/         its training run (checkpoints, metrics.jsonl): a stopped build continues from it
    root/sft_model/             the SFT policy (the RL recipe's model.path)
"""

from __future__ import annotations

from align.jobs.summarize.corpus import (  # noqa: F401 -- the job's public names, one import away
    CorpusSizes,
    corpus_texts,
    document_from_json,
    document_to_json,
    gold_judgement,
    nli_rows,
    parse_summary,
    write_corpus,
)
from align.jobs.summarize.grammar import (  # noqa: F401 -- the job's public names, one import away
    CONTRADICTION,
    COUNTRIES,
    EMPLOYEES,
    ENTAILMENT,
    ENTITY_NAMES,
    FEMALE_NAMES,
    INDUSTRIES,
    INSTRUMENTS,
    LABELS,
    LANDMARKS,
    MALE_NAMES,
    NEUTRAL,
    OCCUPATIONS,
    PEOPLE,
    POOLS,
    POPULATIONS,
    PRIZES,
    PRODUCTS,
    PROMPT_TEMPLATE,
    RIVERS,
    SURNAMES,
    TOWNS,
    TYPES,
    YEARS,
    Document,
    EntityType,
    Slot,
    Statement,
    generate_documents,
    make_document,
    make_statement,
    make_statements,
    reference_summary,
    statement_text,
    summary_text,
    unfaithful_summary,
)
from align.jobs.summarize.nli import (  # noqa: F401 -- the job's public names, one import away
    MAX_LENGTH,
    NLITrainConfig,
    build_nli_model,
    nli_accuracy,
    token_in_premise,
    train_nli,
    train_nli_tokenizer,
    train_policy_tokenizer,
    vocabulary_texts,
)
from align.jobs.summarize.pipeline import (  # noqa: F401 -- the job's public names, one import away
    RL_RECIPE,
    SFT_RECIPE,
    PolicySize,
    Setup,
    ensure_base_model,
    ensure_corpus,
    ensure_nli_model,
    ensure_sft_model,
    nli_model_dir,
    prepare_summarize,
    torch_threads,
)
from align.jobs.summarize.report import (  # noqa: F401 -- the job's public names, one import away
    GOLD_VERDICTS,
    REPORT_METRICS,
    evaluate_summaries,
    main,
    run_summarize,
    score_summaries,
    write_summarize_report,
)
