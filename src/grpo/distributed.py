"""Data-parallel training over several processes: DDP or FSDP2, the same update as one.

``torchrun`` starts the processes and ``grpo.runtime.Runtime`` joins them; this module
holds what a step needs on top: wrapping the policy (and sharding the reference), the
global statistics that make N processes give one process's update, generation under
sharded weights, and checkpoints through ``torch.distributed.checkpoint``. Every
collective is torch.distributed's own; nothing here reimplements one.

Why N processes equal one (DESIGN.md, "Processes"): every rank holds whole groups. The
loss of rank r is ``sum over its rows / global normaliser`` (``global_normaliser``), so
the ranks' losses sum to the one-process loss of the global batch. DDP and FSDP2
*average* gradients over ranks, so the loss is multiplied by the world size first
(``loss_scale``): averaging then gives the sum, the one-process gradient. Batch-level
advantage statistics (``scale_rewards: batch``) are computed on the gathered global
rewards (``global_group_advantages``).

DDP all-reduces gradients, and FSDP2 gathers weights and reduce-scatters gradients, in
hooks of the wrapped module's forward; so they wrap a ``grpo.logprobs.LogpModule``, whose
forward is the whole log-prob pass (transformer body, then the LM head over chunks of
positions): no process makes ``[N, T, V]`` logits. Checkpoints and ``final/`` take the
state dict of the model inside (``stateful``), under the keys of the model as loaded.
LoRA trains under both: a PEFT model is wrapped the same way.

Generation under FSDP2 (``gathered_parameters``): the decode loop runs on gathered
full weights. Each sharded module is all-gathered once before the loop and resharded
after it, so decoding costs one all-gather of the weights per generation round instead
of one per layer per token, and ranks may stop decoding at different lengths (no
collective runs inside the loop). The price is the full weights' memory on every rank
for the length of generation, what a colocated vLLM engine holds anyway.

Forward calls under FSDP2 are collectives (each layer all-gathers its weights), so every
rank must call the model equally often: ``agreed_calls`` is handed to ``batch_logp``
so that length buckets split into the same number of calls on every rank. DDP
communicates only in backward, so there each rank buckets as it likes.

Shape letters (see ``grpo.types``): B prompts of this rank, G completions per prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grpo.advantages import group_advantages
from grpo.hf import unwrap
from grpo.logprobs import LogpModule
from grpo.losses import Normaliser
from grpo.runtime import Runtime

STRATEGIES = ("ddp", "fsdp")
SHARDED_DIR = "sharded"
"""The ``torch.distributed.checkpoint`` directory of model and optimizer states."""
RANK_FILE = "rank-{rank}.pt"
"""Each rank's own state: sampler, sampling generator, RNG."""


# ---------------------------------------------------------------------- wrapping
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers model: the modules whose class the model
    names in ``_no_split_modules`` (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class in _no_split_modules "
            f"(got {sorted(names)}); FSDP2 shards one unit per decoder layer"
        )
    return layers


def wrap(model: nn.Module, strategy: str, runtime: Runtime, trained: bool = True) -> nn.Module:
    """The module the log-prob passes call: ``model`` itself in one process; over several,
    DDP over a ``LogpModule`` of it, or FSDP2 (``fully_shard`` per decoder layer, then at a
    ``LogpModule`` of it as the root), so that their hooks run around the transformer
    body and the chunked LM head together.

    A frozen model (``trained=False``, the reference) is never DDP-wrapped (it has no
    gradients to average) but is sharded under FSDP2 like the policy, so it costs 1/N of
    its weights per rank.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy = {strategy!r}: expected one of {STRATEGIES}")
    if not runtime.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        root = fully_shard(LogpModule(model), mesh=mesh)
        # FSDP2 makes the first unit to run forward its root; generation and evaluation
        # call the causal LM inside the wrapper, whose layers must not claim that role
        fully_shard.state(root)._lazy_init()
        return root
    if not trained:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # broadcast_buffers=False: buffers (RoPE frequencies) never change, and syncing them
    # at every forward would make forward calls collectives
    return DistributedDataParallel(LogpModule(model), device_ids=ids, broadcast_buffers=False)


def stateful(model: nn.Module) -> nn.Module:
    """The model under DDP and ``LogpModule`` (a PEFT model stays one): the module whose
    state dict a checkpoint holds, under the keys of the model as loaded."""
    while isinstance(model, LogpModule) or isinstance(getattr(model, "module", None), LogpModule):
        model = model.module
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _sharded_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Full weights on every rank for the length of the block (FSDP2), so generation's
    decode loop runs without collectives; resharded on exit. Yields the transformers model
    under every wrapper (generation needs no gradient synchronisation, and the gathered
    weights need no hook; PEFT's adapters stay injected in its layers)."""
    units = _sharded_modules(model)
    if not units:
        yield unwrap(model)
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield unwrap(model)
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def agreed_calls(model: nn.Module, runtime: Runtime) -> Callable[[int], int] | None:
    """For ``batch_logp``: how many forward calls every rank makes, given this rank's
    wish. None (each rank chooses) unless the model is sharded, where forward calls are
    collectives and the ranks take the most any of them needs."""
    if not (runtime.distributed and is_sharded(model)):
        return None

    def agree(calls: int) -> int:
        return int(runtime.all_reduce(torch.tensor([calls]), "max").item())

    return agree


def synced_micro_batches(
    model: nn.Module, count: int
) -> Iterator[contextlib.AbstractContextManager]:
    """One context per micro-batch of an optimizer step: under DDP all but the last skip
    the gradient all-reduce (``no_sync``), which then reduces the accumulated sum once."""
    no_sync = getattr(model, "no_sync", None)
    for i in range(count):
        last = i == count - 1
        yield contextlib.nullcontext() if last or no_sync is None else no_sync()


# ---------------------------------------------------------------------- global statistics
def loss_scale(runtime: Runtime) -> float:
    """What each rank's loss is multiplied by before backward: DDP and FSDP2 average the
    ranks' gradients, and the world size turns that average back into the sum."""
    return float(runtime.world_size)


def global_normaliser(
    mask: torch.Tensor, max_completion_length: int, runtime: Runtime
) -> Normaliser:
    """``Normaliser.from_mask`` of the global batch: completions and real tokens summed
    over ranks. ``mask`` is this rank's ``[N, T]`` completion mask."""
    totals = torch.tensor([float(mask.shape[0]), float(mask.sum())], dtype=torch.float64)
    runtime.all_reduce(totals)
    return Normaliser(float(totals[0]), float(totals[1]), int(max_completion_length))


def global_group_advantages(
    rewards: torch.Tensor, scale: str, eps: float, runtime: Runtime
) -> torch.Tensor:
    """``group_advantages`` of the global batch, this rank's rows: with ``scale="batch"``
    the std is the global batch's (REINFORCE++). Rewards ``[B, G]`` of every rank are
    gathered (a few floats each) and the one-process computation runs on all of them, so
    the result is bit-for-bit what one process computes."""
    if not runtime.distributed or scale != "batch":
        return group_advantages(rewards, scale, eps)  # [B, G], per-group: local is global
    parts = runtime.gather_objects(rewards.cpu())
    adv = group_advantages(torch.cat(parts), scale, eps)  # [W*B, G]
    start = sum(p.shape[0] for p in parts[: runtime.rank])
    return adv[start : start + rewards.shape[0]].to(rewards.device)  # [B, G]


def fewest(count: int, runtime: Runtime) -> int:
    """The smallest ``count`` of any rank. Dynamic sampling refills until every rank holds
    its B/W informative groups, and every rank then trains on the same number of groups,
    so all ranks run the same generation rounds and the same update."""
    return int(runtime.all_reduce(torch.tensor([count]), "min").item())


def anywhere(flag: bool, runtime: Runtime) -> bool:
    """Whether ``flag`` holds on any rank: an optimizer step is skipped (no learning signal)
    only where it is skipped on every rank, since the others' backward is a collective."""
    return bool(runtime.all_reduce(torch.tensor([int(flag)]), "max").item())


def global_sum(value: float, runtime: Runtime) -> float:
    """A number summed over ranks (a loss: each rank's is its share of the global one)."""
    if not runtime.distributed:
        return value
    return float(runtime.all_reduce(torch.tensor([value], dtype=torch.float64)).item())


def same_weights(a: nn.Module, b: nn.Module, runtime: Runtime) -> bool:
    """Whether two models, sharded alike or whole, hold bitwise-equal weights on every rank
    (each rank compares its own shards)."""
    sa, sb = stateful(a).state_dict(), stateful(b).state_dict()

    def local(x: torch.Tensor) -> torch.Tensor:
        return x.to_local() if hasattr(x, "to_local") else x

    equal = sa.keys() == sb.keys() and all(
        torch.equal(local(x), local(sb[k])) for k, x in sa.items()
    )
    return fewest(int(equal), runtime) == 1


SUMMED_METRICS = ("loss", "tokens_per_s", "dynamic_sampling/groups_kept")
"""Metrics that add up over ranks: each rank's loss is its share of the global loss."""
SLOWEST_METRICS = ("completions/max_length", "step_time")
"""Metrics whose global value is the largest rank's (with every ``time/`` and ``memory/``)."""


def global_metrics(
    metrics: dict[str, float], runtime: Runtime, weight: float = 1.0
) -> dict[str, float]:
    """One step's metrics over all ranks: means weighted by ``weight`` (a rank's tokens,
    or 1 where ranks hold equal numbers of completions), sums for ``SUMMED_METRICS``,
    maxima for ``SLOWEST_METRICS``, times and memory. The identity in one process."""
    if not runtime.distributed:
        return metrics
    parts = runtime.gather_objects((metrics, weight))
    total = sum(w for _, w in parts) or 1.0
    out = {}
    for k in metrics:
        values = [m[k] for m, _ in parts]
        if k in SUMMED_METRICS:
            out[k] = sum(values)
        elif k in SLOWEST_METRICS or k.startswith(("time/", "memory/")):
            out[k] = max(values)
        else:
            out[k] = sum(v * w for v, (_, w) in zip(values, parts, strict=True)) / total
    return out


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0: no clipping) and return it, before
    clipping. Under FSDP2 each rank holds gradient shards, whose norms are combined over
    ranks; one process gets ``torch.nn.utils.clip_grad_norm_``'s numbers."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    full = getattr(norm, "full_tensor", None)
    norm = full() if full is not None else norm
    torch.nn.utils.clip_grads_with_norm_(params, max_norm or float("inf"), norm)
    return float(norm)


# ---------------------------------------------------------------------- checkpoints
def save_sharded(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict[str, Any],
    runtime: Runtime,
    reference: nn.Module | None = None,
) -> None:
    """Model and optimizer (and a ``reference`` that moved, iterative RL) through
    ``torch.distributed.checkpoint`` (each rank writes its shards under FSDP2; under DDP the
    replicated tensors once), plus this rank's own state (``rank-R.pt``); returns when every
    rank has written (a barrier). ``directory`` is the same path on every rank, on a
    filesystem they all see."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    dcp.save(_dcp_state(model, optimizer, reference), checkpoint_id=directory / SHARDED_DIR)
    torch.save(rank_state, directory / RANK_FILE.format(rank=runtime.rank))
    runtime.barrier()


def _dcp_state(model, optimizer, reference) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_state, optim_state = get_state_dict(stateful(model), optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if reference is not None:
        state["reference"] = get_model_state_dict(stateful(reference))
    return state


def load_sharded(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    reference: nn.Module | None = None,
) -> dict[str, Any]:
    """Restore what ``save_sharded`` wrote, on the same world size; return this rank's state.
    Give ``reference`` exactly when it was saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    directory = Path(directory)
    mine = directory / RANK_FILE.format(rank=runtime.rank)
    if not mine.is_file() or (directory / RANK_FILE.format(rank=runtime.world_size)).exists():
        saved = len(list(directory.glob(RANK_FILE.format(rank="*"))))
        raise ValueError(
            f"checkpoint {str(directory)!r} was written by {saved} processes; this run has "
            f"world size {runtime.world_size}: resume on the same number of processes"
        )
    state = _dcp_state(model, optimizer, reference)
    saved = dcp.FileSystemReader(directory / SHARDED_DIR).read_metadata().state_dict_metadata
    # moments that a LoRA restart dropped (lora.merge_and_restart) were not saved: a fresh
    # optimizer's placeholders for them are left out, so they stay absent after loading
    moments = state["optimizer"]["state"]
    held = {k.rsplit(".", 1)[0] for k in saved if k.startswith("optimizer.state.")}
    for fqn in [f for f in moments if f"optimizer.state.{f}" not in held]:
        del moments[fqn]
    dcp.load(state, checkpoint_id=directory / SHARDED_DIR)
    set_state_dict(
        stateful(model),
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
    if reference is not None:
        set_model_state_dict(stateful(reference), state["reference"])
    return torch.load(mine, weights_only=True)  # tensors and plain values only


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0, in CPU memory (empty on other ranks); every
    rank must call it (under FSDP2 it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(stateful(model), options=options)


def save_full(directory: str | Path, model: nn.Module, tokenizer, runtime: Runtime) -> None:
    """``directory`` as a full ``save_pretrained`` model (weights gathered to rank 0,
    which alone writes), loadable by ``from_pretrained``; every rank calls it."""
    state = full_state_dict(model)
    if runtime.is_main:
        unwrap(model).save_pretrained(directory, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    runtime.barrier()
