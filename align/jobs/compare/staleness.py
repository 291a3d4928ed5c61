"""The staleness axis of ``align compare``: every online objective trained on samples of weights N
optimizer steps old (``train.async: {max_staleness: N, mode: fixed}``), with and without the
importance correction π_old/π_sampler, and what the lag cost each one in gold at matched KL.

``staleness: {max_staleness: [0, 1, 2, 4], corrections: [none, sequence_mask]}`` turns each objective
entry into one run per (N, correction): ``NAME_sN`` uncorrected (``importance_correction: none``, so
the async default does not apply) and ``NAME_sN_MODE`` corrected, for the objectives that take a
correction (``corrects_sampler``) and N > 0 only -- at N = 0 the sampler is the trained policy, so
N = 0 is one uncorrected run whatever ``corrections`` lists (the baseline every N is compared with).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

import losses
from align.config import Strict
from align.objective import ObjectiveConfig

CorrectionMode = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
CLOSE = 0.2  # "≈ on-policy": within 20 % of the on-policy run's gain in reward − β·KL


class StalenessAxis(Strict):
    max_staleness: list[int] = Field(
        [0, 1, 2, 4], min_length=1, description="each objective trains once per N (train.async, mode fixed)"
    )
    corrections: list[CorrectionMode] = Field(
        ["none", "sequence_mask"],
        min_length=1,
        description="generation.importance_correction modes per N > 0 (objectives that take one; none: uncorrected)",
    )


def expand(entries: list[Any], axis: StalenessAxis) -> list[dict]:
    """The online objective entries, one per (N, correction) of the axis, labelled ``RUN_sN[_MODE]``;
    offline entries as they are."""
    out = []
    for raw in entries:
        entry = ObjectiveConfig.model_validate(raw)
        if not entry.online:  # a direct-alignment run trains on a fixed set: no samples to be stale
            out.append(raw)
            continue
        takes = losses.REGISTRY[entry.name].corrects_sampler
        base = entry.model_dump(mode="json", exclude_none=True)
        for n in sorted(set(axis.max_staleness)):
            modes = ["none"] if n == 0 or not takes else list(dict.fromkeys(axis.corrections))
            for mode in modes:
                out.append(
                    {
                        **base,
                        "label": f"{entry.run_name}_s{n}" + ("" if mode == "none" else f"_{mode}"),
                        "train": {**entry.train, "async": {"max_staleness": n, "mode": "fixed"}},
                        "generation": {**entry.generation, "importance_correction": {"mode": mode}},
                    }
                )
    return out


def staleness_of(summary: dict) -> tuple[int, str] | None:
    """(N, correction mode) of a summarised run of the axis; None for a run outside it."""
    async_ = summary["train"].get("async")
    if not async_:
        return None
    mode = (summary.get("generation", {}).get("importance_correction") or {}).get("mode", "none")
    return int(async_["max_staleness"]), mode


def staleness_report(objectives: dict[str, dict], initial: dict, gold_at_kl) -> tuple[dict, list[dict]]:
    """Per objective family (the runs of one objective): gold at the family's matched KL and
    reward − β·KL for each (N, correction); and the CoPG claim judged on these runs."""
    families: dict[str, dict[tuple[int, str], str]] = {}
    for name, o in objectives.items():
        key = staleness_of(o)
        if key is not None:
            families.setdefault(o["objective"]["name"], {})[key] = name
    table: dict[str, Any] = {}
    for family, runs in families.items():
        kl = min(max(objectives[n]["kl"]) for n in runs.values())
        table[family] = {
            "matched_kl": kl,
            "runs": {
                name: {
                    "staleness": n,
                    "correction": mode,
                    "gold_at_matched_kl": gold_at_kl(objectives[name], kl),
                    "regularised": objectives[name]["regularised"],
                    "tokens_per_s": objectives[name]["cost"]["tokens_per_s"],
                }
                for (n, mode), name in sorted(runs.items())
            },
        }
    return table, [stale_claim(table, initial)] if table else []


def stale_claim(table: dict, initial: dict) -> dict[str, Any]:
    """CoPG learns from samples of older weights about as it does on-policy (no weights needed);
    RLOO and vanilla PG, their KL penalty and advantages fixed at sampling, do not -- judged at the
    largest staleness every family ran, uncorrected, on reward − β·KL gained from step 0."""
    claim = "CoPG: on samples N steps stale ~ on-policy, while uncorrected RLOO and vanilla PG are not"
    J0 = initial["reward"]
    parts, close = [], {}
    for family in ("copg", "rloo", "vanilla_pg"):
        runs = {(r["staleness"], r["correction"]): r for r in table.get(family, {}).get("runs", {}).values()}
        stale = [n for n, mode in runs if mode == "none" and n > 0]
        if (0, "none") not in runs or not stale:
            continue
        n = max(stale)
        fresh, lagged = runs[(0, "none")]["regularised"], runs[(n, "none")]["regularised"]
        close[family] = abs(lagged - fresh) <= CLOSE * abs(fresh - J0)
        where = "within" if close[family] else "outside"
        parts.append(f"{family} {fresh:.3f} at N = 0 vs {lagged:.3f} at N = {n} ({where} {CLOSE:.0%} of the gain)")
    if "copg" not in close or len(close) < 2:
        line = f"{claim}: not measured (needs copg and rloo or vanilla_pg on the staleness axis)"
        return {"claim": claim, "reproduces": None, "line": line}
    holds = close["copg"] and not any(v for k, v in close.items() if k != "copg")
    line = (
        f"{claim}: {'reproduces' if holds else 'does not reproduce'} here -- reward − β·KL from {J0:.3f} "
        "at step 0: " + "; ".join(parts)
    )
    return {"claim": claim, "reproduces": holds, "line": line}


def staleness_lines(table: dict) -> list[str]:
    """One line per objective: what each staleness (and correction) cost in gold at matched KL."""
    lines = []
    for family, entry in table.items():
        runs = entry["runs"].values()
        base = next((r["gold_at_matched_kl"] for r in runs if r["staleness"] == 0), float("nan"))
        cells = [
            f"N={r['staleness']}{'' if r['correction'] == 'none' else ' ' + r['correction']} "
            f"{r['gold_at_matched_kl']:.3f} ({r['gold_at_matched_kl'] - base:+.3f})"
            for r in runs
        ]
        lines.append(f"{family}: gold at KL {entry['matched_kl']:.3f}: " + ", ".join(cells))
    return lines
