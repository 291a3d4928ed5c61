"""The objective entry every recipe shares -- train (``objective``), compare, overopt and bandit
(``objectives[i]``) -- and the run quantities the core supplies to the options an objective
declares (``losses.base.Objective.run_inputs`` / ``run_defaults``), never by an option's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

import losses
from align.config import Strict

# what a run supplies to the options an objective declares (``losses.base.RunQuantity``), said in
# the error that refuses a declared ``run_inputs`` option given in the recipe
RUN_QUANTITY_SOURCES: dict[str, str] = {
    "reward_weights": "each component's weight from the reward section (reward[i].weight)",
    "max_new_tokens": "the generation budget (generation.max_new_tokens)",
    "k": "the samples per prompt (objective.k)",
}


def takes_beta(name: Any) -> bool:
    """The objective ``name`` has a KL coefficient option (False for an unknown name)."""
    return isinstance(name, str) and name in losses.REGISTRY and "beta" in losses.options(name)


def objective_mapping(value: Any) -> Any:
    """An objective entry as a mapping of its fields: ``dpo`` is ``{name: dpo}``; keys that are no
    field of the entry are options of the objective (``{name: dpo, average_logprobs: true}``); a β
    given as ``options.beta`` moves to ``beta``, its one home. Anything else is left to validation."""
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, dict):
        return value
    value = dict(value)
    extra = {k: value.pop(k) for k in list(value) if k not in ObjectiveConfig.model_fields}
    options = value.get("options") or {}
    if not isinstance(options, dict):
        return value  # the options field says what it expected
    name = value.get("name", ObjectiveConfig.model_fields["name"].default)
    if extra and isinstance(name, str) and name in losses.REGISTRY:
        unknown = sorted(set(extra) - set(losses.options(name)))
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown}: expected entry keys {sorted(ObjectiveConfig.model_fields)} "
                f"or options of {name!r} {sorted(losses.options(name))}"
            )
    options = {**options, **extra}
    if "beta" in options:
        given = options.pop("beta")
        if value.get("beta") is not None and value["beta"] != given:
            raise ValueError(
                f"options.beta: β is given twice ({given} and beta: {value['beta']}); give it once, as beta"
            )
        value["beta"] = given
    value["options"] = options
    return value


class ObjectiveConfig(Strict):
    """The one objective entry of every recipe: train (``objective``), compare and overopt
    (``objectives[i]``), bandit (``objectives[i]``). After validation β lives in ``beta`` alone:
    given there or as ``options.beta`` (moved), else the objective's default (a bandit recipe's
    ``beta`` for its entries); None only for an objective with no KL coefficient."""

    name: str = Field("rloo", description="a name in losses.REGISTRY")
    label: str | None = Field(
        None, description="the objective's name in reports and run directories (default: derived from name and β)"
    )
    k: int = Field(4, ge=1, description="completions sampled per prompt (online objectives; bandit: the recipe's k)")
    beta: float | None = Field(
        None, ge=0, description="KL coefficient, also accepted as options.beta (default: the objective's)"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="the objective's options for losses.build (also accepted as flat keys)"
    )
    mode: Literal["auto", "online", "offline"] = Field(
        "auto",
        description="train, compare, overopt: online samples from the policy; offline: a fixed pair/row file "
        "(auto: the objective's kind)",
    )
    data: Literal["auto", "policy", "sampler"] | None = Field(
        None,
        description="bandit only: policy: fresh samples of the policy; sampler: pairs from `sampler`, used "
        "without importance weights; auto: online objectives the policy, offline-capable ones the sampler's pairs",
    )
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="compare, overopt only: this run's changes to the base train section (replay, updates_per_batch)",
    )
    generation: dict[str, Any] = Field(
        default_factory=dict,
        description="compare, overopt only: this run's changes to the base generation section (importance_correction)",
    )

    @model_validator(mode="before")
    @classmethod
    def gather(cls, value: Any) -> Any:
        return objective_mapping(value)

    @field_validator("name")
    @classmethod
    def known(cls, name: str) -> str:
        if name not in losses.REGISTRY:
            raise ValueError(f"expected one of {sorted(losses.REGISTRY)}")
        return name

    @model_validator(mode="after")
    def check_options(self) -> ObjectiveConfig:
        if self.beta is not None and not takes_beta(self.name):
            raise ValueError(f"{self.name!r} takes no beta")
        if self.beta is None and takes_beta(self.name):
            default = losses.options(self.name)["beta"]
            if isinstance(default, (int, float)):  # readers find β here, never in the objective's defaults
                self.beta = float(default)
        self.build()  # unknown options, then the objective's own checks, before any model loads
        return self

    @property
    def needs(self) -> tuple[str, ...]:
        """The batch fields the objective declares it reads (``losses.Objective.needs``)."""
        return losses.REGISTRY[self.name].needs

    @property
    def online(self) -> bool:
        return self.mode == "online" or (self.mode == "auto" and losses.REGISTRY[self.name].online)

    @property
    def effective_beta(self) -> float | None:
        """β as the study reports read it: the same as ``beta``."""
        return self.beta

    @property
    def run_name(self) -> str:
        """A study run's name: the label, else NAME_betaBETA (NAME for an objective with no β)."""
        if self.label:
            return self.label
        return self.name if self.beta is None else f"{self.name}_beta{self.beta:g}"

    def objective_section(self) -> dict:
        """The entry as a training recipe's objective section (a study run's)."""
        return self.model_dump(mode="json", exclude={"label", "train", "generation"}, exclude_none=True)

    def refuse(self, where: str, unread: Mapping[str, str]) -> None:
        """One line naming the first field of ``unread`` (field -> why) that this entry sets though
        its recipe kind does not read it: a field silently ignored would look like it took effect."""
        for name, why in unread.items():
            if getattr(self, name) not in (None, {}, "auto"):
                raise ValueError(f"{where}.{name}: {why}; remove it")

    def build(self, run: Mapping[str, Any] | None = None) -> losses.Objective:
        """The objective with its options and β, and the run quantities it declares it takes
        (``run_inputs`` always, ``run_defaults`` where the option is unset) from ``run``, what the
        caller's run knows (``Recipe.run_quantities``); a quantity ``run`` lacks is left to the objective."""
        opts = dict(self.options)
        if self.beta is not None:
            opts["beta"] = self.beta
        run = run or {}
        declared = losses.REGISTRY[self.name]
        for option, quantity in declared.run_inputs.items():
            if run.get(quantity) is not None:
                opts[option] = run[quantity]
        for option, quantity in declared.run_defaults.items():
            if opts.get(option) is None and run.get(quantity) is not None:
                opts[option] = run[quantity]
        return losses.build(self.name, **opts)
