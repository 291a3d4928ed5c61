"""Step 0 against TRL on every shape of the grid (benchmarks/grid.py): RLOO gradients, DPO losses.

    .venv/bin/python benchmarks/step0_grid.py [--shapes NAME,NAME] [--tolerance REL]

The speed work is checked for accuracy on the same shapes it is timed on. Per shape:

- RLOO: ``step0_rloo.check`` -- one step of align's RLOO and of TRL's RLOOTrainer on the same
  completions (TRL's generation replaced by align's), every parameter's gradient as it reaches the
  optimizer and both gradient norms before clipping, within ``--tolerance`` (max |Δ| / max |g|);
  the grid's prompts (~4, ~32 or ~128 tokens, unevenly left-padded) and new-token counts.
- DPO: ``vs_trl_dpo.step0_check`` -- align's loss on the first pairs against TRL's DPOTrainer
  (``sigmoid`` against align's summed log-probs, ``sigmoid_norm`` against ``average_logprobs``),
  with a reference of the same shape from another seed, on identical token ids.

Prints one line per check and a table; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_assets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import grid
    import step0_rloo
    import vs_trl_dpo

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(grid.SHAPES), help="comma-separated shape names (default: all)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="RLOO: max |Δgrad| / max |grad| allowed")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in grid.SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; expected some of {list(grid.SHAPES)}")
    assets = ensure_assets()
    rows: dict[str, dict[str, str]] = {}
    for name in names:
        shape = grid.SHAPES[name]
        model, reference = grid.model(name), grid.model(name, seed=1)
        prompt_file = grid.prompts(shape["prompt"], assets["prompts"])
        ok, rel = step0_rloo.check(
            name, model, prompt_file, grid.new_tokens(name), args.tolerance, max_prompt_tokens=grid.MAX_PROMPT_TOKENS
        )
        rows[name] = {"rloo": f"{rel:.1e}" + ("" if ok else " DIFFERS")}
        paths = {name: model, f"{name}_ref": reference, "pairs": assets["pairs"]}
        with tempfile.TemporaryDirectory() as tmp:
            for loss_type, average in (("sigmoid", False), ("sigmoid_norm", True)):
                line, diff, agree = vs_trl_dpo.step0_check(paths, name, loss_type, average, Path(tmp))
                print(f"{name}: DPO {loss_type}: {line}")
                rows[name][loss_type] = f"{diff:.1e}" + ("" if agree else " DIFFERS")
    print("\n| shape | RLOO: max Δgrad / max grad | DPO sigmoid: Δloss | DPO sigmoid_norm: Δloss |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['rloo']} | {row['sigmoid']} | {row['sigmoid_norm']} |")
    failed = [name for name, row in rows.items() if any("DIFFERS" in v for v in row.values())]
    if failed:
        print(f"differs from TRL on: {', '.join(failed)}")
        return 1
    print(f"all {len(rows)} shapes equal to TRL at step 0 (RLOO within {args.tolerance:g}; DPO within 1e-5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
