"""The recipe's ``generation`` section: how completions are sampled, by which rollout engine
(``native`` or ``vllm``, with the vLLM engine's settings), and the importance correction of the
engine/trainer mismatch (losses/correction.py). Part of the schema in align/recipe.py."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from align.config import Strict

# set where the server starts (align vllm-serve's flags of the same names), not in the trainer's recipe
SERVER_OWNED = (
    "dtype",
    "gpu_memory_utilization",
    "max_model_len",
    "tensor_parallel_size",
    "enforce_eager",
    "cpu_kvcache_gib",
)


class VLLMConfig(Strict):
    """The vLLM engine's settings (TRL's ``vllm_*``); read only with ``generation.engine: vllm``."""

    mode: Literal["colocate", "server"] = Field(
        "colocate",
        description="colocate: an engine inside each training process; server: a vLLM server started by "
        "`align vllm-serve` on other devices (TRL's vllm_mode)",
    )
    server_host: str = Field("127.0.0.1", min_length=1, description="server mode: the server's host")
    server_port: int = Field(8000, gt=0, lt=65536, description="server mode: the server's port")
    server_timeout: float = Field(
        240.0, gt=0, description="server mode: seconds to wait for the server to answer, at start and per request"
    )
    weights_dir: str | None = Field(
        None,
        description="server mode, weights by file: where the trainer writes the weights the server reloads, "
        "a directory both see (default: /dev/shm on this machine)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the engine's weights and activations (auto: model.dtype)"
    )
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="the fraction of device memory the engine takes beside training (TRL's default)"
    )
    max_model_len: int | None = Field(
        None, gt=0, description="prompt + completion tokens (default: data.max_prompt_tokens + max_new_tokens)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine spans (the colocated engine: 1)")
    enable_sleep_mode: bool = Field(False, description="GPU: release the engine's KV cache and weights while training")
    enforce_eager: bool | None = Field(None, description="no CUDA graphs / compilation (default: true on CPU)")
    cpu_kvcache_gib: int = Field(1, gt=0, description="vLLM's CPU build: the KV cache size (VLLM_CPU_KVCACHE_SPACE)")

    @model_validator(mode="after")
    def server_settings(self) -> VLLMConfig:
        if self.mode == "server":
            # a value other than the default (a dumped recipe, e.g. a run's recipe.yaml, names them all)
            owned = [n for n in SERVER_OWNED if getattr(self, n) != type(self).model_fields[n].default]
            if owned:
                flag = owned[0].replace("_", "-")
                raise ValueError(
                    f"{owned[0]}: in mode: server the server's own setting (align vllm-serve --{flag}); remove it"
                )
            if self.enable_sleep_mode:
                raise ValueError("enable_sleep_mode: the colocated engine's; a server keeps its own devices")
        elif self.weights_dir is not None:
            raise ValueError("weights_dir: read in mode: server only; remove it")
        return self


class CorrectionConfig(Strict):
    """Importance weights π_old/π_engine on each policy-gradient term (losses/correction.py)."""

    mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none"] = Field(
        "sequence_mask", description="per token or per sequence; truncate (TIS) or mask (MIS); none: off"
    )
    clip_max: float = Field(3.0, gt=0, description="C_max: weights above it are truncated to it or masked")
    clip_min: float | None = Field(None, ge=0, description="C_min: weights below it are raised to it or masked")

    @model_validator(mode="after")
    def ordered(self) -> CorrectionConfig:
        if self.clip_min is not None and self.clip_min > self.clip_max:
            raise ValueError(f"clip_min ({self.clip_min}) > clip_max ({self.clip_max})")
        return self


class GenerationConfig(Strict):
    engine: Literal["native", "vllm"] = Field(
        "native",
        description="native: align's keyed decode loop on the training weights; vllm: vLLM, colocated or a "
        "server (vllm.mode)",
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    importance_correction: CorrectionConfig | None = Field(
        None,
        description="sampler-mismatch weights (default: sequence_mask, C_max 3 with engine vllm, as TRL; none "
        "with native, which samples from the trained weights)",
    )
    max_new_tokens: int = Field(32, gt=0)
    min_new_tokens: int = Field(0, ge=0, description="EOS is masked out before this many tokens")
    temperature: float = Field(1.0, gt=0, description="log-probs for the loss use the same temperature")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    stop_strings: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="a completion ends after the first one (non-empty strings)"
    )
    batch_size: int | None = Field(None, gt=0, description="prompts per generate call (default: the whole step)")

    @model_validator(mode="after")
    def lengths(self) -> GenerationConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) > max_new_tokens ({self.max_new_tokens})")
        return self
