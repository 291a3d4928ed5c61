"""The critic of objectives that read ``values`` (PPO): a transformer with a scalar head.

It is a model of its own, trained beside the policy by the same optimizer (its own learning
rate), placed and wrapped by accelerate like the policy (DDP, FSDP2), so its weights and its
optimizer state go into every checkpoint's ``state/`` and a resume restores both. Its backbone
starts from the recipe's ``critic.path`` -- the SFT policy by default, or a reward model of the
same architecture, as in the PPO papers -- and its head at zero, so the first values are 0.

V(s_t), the value of the state before completion token t, is read off the hidden state at the
same column that scores token t (align/logprobs.py's layout: [left-padded prompt | completion]).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


class ValueModel(torch.nn.Module):
    """``backbone`` (an ``AutoModel``) and ``value_head`` (hidden → 1); forward returns [B, L] values."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size if hasattr(backbone.config, "hidden_size") else backbone.config.n_embd
        self.value_head = torch.nn.Linear(hidden, 1, dtype=next(backbone.parameters()).dtype)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return self.value_head(out.last_hidden_state).squeeze(-1).float()


def load_critic(path: str, dtype, revision: str | None, trust_remote_code: bool, disable_dropout: bool) -> ValueModel:
    """A critic whose backbone is the model at ``path`` (hub id or directory, any head dropped)."""
    from transformers import AutoModel
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the LM head a backbone does not load is expected, not news
    try:
        backbone = AutoModel.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
    critic = ValueModel(backbone)
    if disable_dropout:
        for module in critic.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return critic


def completion_values(
    critic: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
) -> Tensor:
    """[B, T] V(s_t) for each completion token t (0 on padding), with grad."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    position = (attention.long().cumsum(-1) - 1).clamp(min=0)
    T = completion_ids.shape[1]
    values = critic(input_ids=input_ids, attention_mask=attention, position_ids=position)
    return values[:, -(T + 1) : -1] * completion_mask


def save_critic(state_dict: dict[str, Tensor], backbone_config, out: Path) -> None:
    """``out/``: the backbone's config.json and model.safetensors of the whole critic (backbone. and
    value_head. keys), loadable with ``load_saved_critic``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    backbone_config.save_pretrained(out)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(out / "model.safetensors"))


def load_saved_critic(path: str | Path) -> ValueModel:
    """A critic written by ``save_critic`` (a checkpoint's or final/'s ``critic/``)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(path))
    critic = ValueModel(AutoModel.from_config(config))
    critic.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return critic.eval()
