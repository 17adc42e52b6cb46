"""The trained model and the model it is held close to.

``Policy`` holds the trained module (and, where a run wraps it, its wrapping) on the
runtime's device, gives the log-probs of a batch's completion tokens, and saves and loads
its weights with strict key checks. ``Reference`` is the frozen model of the KL term
(eq. IV.I): a frozen copy of the policy's starting weights, or a model loaded from
``model.ref_name_or_path``; with ``beta = 0`` there is none at all. Both compute log-probs
through the same function with the same settings; even so a frozen copy's pass can differ
from the policy's by float rounding (its weights do not require grad, and the LM head's
matmul then picks another kernel), so while their weights are equal the reference does not
run at all and the loss takes the policy's own log-probs (``Reference.equals_policy``).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from grpo import distributed, lora
from grpo.config import Config
from grpo.diagnostics import same_weights
from grpo.hf import load_model_and_tokenizer, unwrap
from grpo.logprobs import batch_logp, batched_logp
from grpo.model_options import disable_dropout
from grpo.runtime import Runtime
from grpo.types import Batch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LogpSettings:
    """How completion log-probs are computed, the same for every model of a run."""

    temperature: float = 1.0
    """The sampling temperature: log-probs are of the distribution sampled from."""
    share_prompt: bool = True
    """Run each group's prompt once (``optim.share_prompt``)."""
    bucket: bool = True
    """Run completions of similar length together (``optim.bucket_by_length``)."""
    share_prompt_with_grad: bool = True
    """Share prompts in the training pass too: not under gradient checkpointing, whose
    checkpointed layers drop the KV cache a shared prompt hands to its completions."""

    @classmethod
    def from_config(cls, cfg: Config) -> LogpSettings:
        share = cfg.optim.share_prompt
        return cls(
            cfg.rollout.temperature,
            share,
            cfg.optim.bucket_by_length,
            share and not cfg.model.gradient_checkpointing,
        )


def load_weights(module: torch.nn.Module, directory: str | Path) -> None:
    """Load ``directory/model.safetensors`` (as ``save_pretrained`` writes it) into
    ``module``, strictly: every key must match, except the tied copies (e.g. ``lm_head``
    tied to the embeddings) that ``save_pretrained`` leaves out on purpose."""
    from safetensors.torch import load_file

    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no model.safetensors")
    state = load_file(path, device=str(next(module.parameters()).device))
    missing, unexpected = module.load_state_dict(state, strict=False)
    tied = set(getattr(module, "all_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"{str(path)!r} does not fit the model: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )


class Policy:
    """The trained causal LM on the runtime's device. ``model`` is it as loaded (a PEFT
    model under LoRA; the transformers model is ``base``), ``module`` what the log-prob
    passes call: ``model`` itself in one process, its DDP or FSDP2 wrapping under
    torchrun."""

    def __init__(self, module: torch.nn.Module, runtime: Runtime, settings: LogpSettings):
        self.model = self.module = module.to(runtime.device)
        self.runtime, self.settings = runtime, settings
        self.agree = None  # forward calls agreed between processes (FSDP2), see distribute

    def distribute(self, strategy: str) -> None:
        """Wrap the module for ``torchrun``'s processes (DDP or FSDP2; a no-op in one)."""
        self.module = distributed.wrap(self.model, strategy, self.runtime)
        self.agree = distributed.agreed_calls(self.module, self.runtime)

    def gathered(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The module to generate with: full weights for the block under FSDP2."""
        return distributed.gathered_parameters(self.module)

    @property
    def base(self) -> torch.nn.Module:
        """The transformers model under any wrapper (what ``save_pretrained`` writes)."""
        return unwrap(self.model)

    def logp(self, batch: Batch, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Log-probs (and entropies) ``[n, T]`` of one micro-batch, with gradient."""
        s = self.settings
        with self.runtime.autocast():
            return batch_logp(
                self.module,
                batch,
                s.temperature,
                with_entropy,
                s.share_prompt_with_grad,
                s.bucket,
                self.agree,
            )

    def logp_no_grad(self, batch: Batch, micro_size: int) -> Tensor:
        """Log-probs ``[N, T]`` of a whole batch, micro-batch by micro-batch, no gradient
        (the old-policy pass right after sampling)."""
        return _logp_no_grad(
            self.module, batch, micro_size, self.settings, self.runtime, self.agree
        )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def lora(self) -> bool:
        """Whether only LoRA adapters are trained (``model.lora``, or a PEFT model given)."""
        return lora.is_lora(self.model)

    def save(self, directory: str | Path) -> None:
        """The whole model in ``save_pretrained`` form (under torchrun every process calls
        this; the weights are gathered and rank 0 writes). Under LoRA: the adapters merged
        into the base (``from_pretrained`` loads it without PEFT), and the adapter itself
        in ``directory/adapter`` (rank 0 writes; under FSDP2 from the gathered weights)."""
        if self.lora:
            sharded = distributed.is_sharded(self.module)
            state = distributed.full_state_dict(self.module) if sharded else None
            if self.runtime.is_main:
                lora.save_merged(self.model, directory, state)
                self.model.save_pretrained(Path(directory) / "adapter", state_dict=state)
            self.runtime.barrier()
        elif self.runtime.distributed:
            distributed.save_full(directory, self.module, None, self.runtime)
        else:
            self.base.save_pretrained(directory)

    def save_pretrained(self, directory: str | Path) -> None:
        """The checkpoint form (``checkpoint.save_checkpoint`` calls it): all weights, or
        under LoRA only the adapter (PEFT's files)."""
        (self.model if self.lora else self.base).save_pretrained(directory)

    def load(self, directory: str | Path) -> None:
        """Load what ``save_pretrained`` wrote."""
        if self.lora:
            lora.load_adapter_weights(self.model, directory)
        else:
            load_weights(self.base, directory)


def _logp_no_grad(
    module: torch.nn.Module,
    batch: Batch,
    micro_size: int,
    s: LogpSettings,
    runtime: Runtime,
    agree=None,
) -> Tensor:
    with runtime.autocast():
        return batched_logp(
            module, batch, micro_size, s.temperature, s.share_prompt, s.bucket, agree
        )


class Reference:
    """The frozen model of the KL term: a copy of the policy's starting weights, or a model
    loaded from a path. Never trained; ``reset_to`` makes it the policy's current weights
    (iterative RL, DeepSeekMath 4.2)."""

    def __init__(
        self,
        module: torch.nn.Module,
        runtime: Runtime,
        settings: LogpSettings,
        equals_policy: bool = False,
    ):
        self.module = module.to(runtime.device).eval().requires_grad_(False)
        self.runtime, self.settings = runtime, settings
        self.equals_policy = equals_policy
        """Whether its weights are bitwise the policy's: true from a copy or a reset until
        the policy's next optimizer step (``policy_stepped``)."""
        self.agree = None

    def distribute(self, strategy: str) -> None:
        """Shard the reference like the policy under FSDP2 (DDP leaves it whole)."""
        self.module = distributed.wrap(self.module, strategy, self.runtime, trained=False)
        self.agree = distributed.agreed_calls(self.module, self.runtime)

    @classmethod
    def build(cls, cfg: Config, policy: Policy) -> Reference | lora.AdaptersOffReference | None:
        """None when ``algorithm.beta`` is 0 (no KL term, no model); the model at
        ``model.ref_name_or_path`` when given; the policy with its adapters switched off
        under LoRA (no copy); else a frozen copy of the policy."""
        if cfg.algorithm.beta == 0:
            return None
        if policy.lora and not cfg.model.ref_name_or_path:
            return lora.AdaptersOffReference(policy)
        if cfg.model.ref_name_or_path:
            module, _ = load_model_and_tokenizer(
                cfg.model.ref_name_or_path, DTYPES[cfg.model.dtype]
            )
            if cfg.model.disable_dropout:
                disable_dropout(module)
        else:
            module = copy.deepcopy(policy.base)
        equal = same_weights(module, policy.base)
        return cls(module, policy.runtime, policy.settings, equal)

    def logp(self, batch: Batch, micro_size: int) -> Tensor:
        """Log-probs ``[N, T]`` of a whole batch under the reference, no gradient."""
        return _logp_no_grad(
            self.module, batch, micro_size, self.settings, self.runtime, self.agree
        )

    def reset_to(self, policy: Policy, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copy the policy's current weights into the reference (``optimizer`` is for the
        adapters-off reference, which restarts the adapters' moments)."""
        if policy.lora:
            own = self.base.state_dict()
            with torch.no_grad():  # the reference is a plain model: take the merged weights
                for key, value in lora.merged_state_dict(policy.model).items():
                    own[key].copy_(value)
            return
        self.base.load_state_dict(policy.base.state_dict())
        self.equals_policy = True

    def policy_stepped(self) -> None:
        """The policy's weights have just changed: the reference differs from now on."""
        self.equals_policy = False

    def compare_to(self, policy: Policy) -> None:
        """Find out whether the weights are equal (one pass over them, after loading)."""
        self.equals_policy = same_weights(self.base, policy.base)

    @property
    def base(self) -> torch.nn.Module:
        """The transformers model under any wrapper."""
        return unwrap(self.module)

    def save(self, directory: str | Path) -> None:
        self.base.save_pretrained(directory)

    save_pretrained = save  # what ``checkpoint.save_checkpoint`` calls

    def load(self, directory: str | Path) -> None:
        load_weights(self.base, directory)
