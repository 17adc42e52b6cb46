"""Two processes (gloo) give one process's update: DDP and FSDP2, every loss type.

A fixed global batch of 4 groups is split over 2 ranks, 2 whole groups each; the update
(reference log-probs, advantages with the batch std, loss over micro-batches, clipping,
one SGD step) must give the weights that one process gets from the whole batch. Rank 0
holds groups of even lengths and rank 1 groups of very uneven ones, so length buckets cut
rank 1's micro-batches into more forward calls than rank 0's, and each group's prompt
runs apart from its completions (several forward calls before one backward). The
log-prob passes run the chunked LM head on every rank: no LM head module is ever called.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ranks import run_ranks

from grpo.advantages import expand_to_tokens
from grpo.algorithms import build_algorithm
from grpo.algorithms.objective import policy_loss
from grpo.config import Config
from grpo.distributed import (
    agreed_calls,
    clip_grad_norm,
    full_state_dict,
    global_group_advantages,
    global_normaliser,
    load_sharded,
    loss_scale,
    save_full,
    save_sharded,
    synced_micro_batches,
    wrap,
)
from grpo.hf import unwrap
from grpo.logprobs import batch_logp, batched_logp
from grpo.losses import LOSS_TYPES
from grpo.modeling import init_model_dir
from grpo.runtime import Runtime
from grpo.types import Batch

B, G, P, T = 4, 4, 4, 64
MICRO = 4  # rows per micro-batch: one group; 2 micro-batches per rank, 4 in one process
LENGTHS = [
    [64, 64, 62, 64],  # rank 0: even lengths, one forward call per micro-batch
    [63, 64, 64, 61],
    [64, 2, 3, 1],  # rank 1: buckets split these into two calls each
    [1, 64, 2, 3],
]


def global_batch() -> tuple[Batch, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(7, 60, (B * G, P + T), generator=gen)  # [N, P + T]
    attention = torch.ones(B * G, P + T, dtype=torch.long)  # [N, P + T]
    for b in range(B):
        ids[b * G : (b + 1) * G, :P] = ids[b * G, :P]  # one prompt per group
        attention[b * G : (b + 1) * G, : b % 2] = 0  # odd groups' prompts are left-padded
    lengths = torch.tensor(LENGTHS).flatten()  # [N]
    completion = (torch.arange(T) < lengths[:, None]).float()  # [N, T]
    attention[:, P:] = completion.long()
    batch = Batch(
        input_ids=ids,
        attention_mask=attention,
        completion_mask=completion,
        advantages=torch.zeros(B * G, T),
        group_ids=torch.arange(B).repeat_interleave(G),
    )
    rewards = torch.rand(B, G, generator=gen).round(decimals=1)  # [B, G]
    return batch, rewards


def config(loss_type: str) -> Config:
    return Config.model_validate(
        {
            "rollout": {"max_completion_length": T, "num_generations": G, "prompts_per_step": B},
            "algorithm": {"loss_type": loss_type, "scale_rewards": "batch", "beta": 0.04},
            "optim": {"max_grad_norm": 0.1, "share_prompt": True, "bucket_by_length": True},
        }
    )


def head_calls(*models) -> list[int]:
    """A counter of calls to the models' output layers: a log-prob pass that made
    ``[N, T, V]`` logits would call one, the chunked head (``head_logp``) never does."""
    calls = []
    for model in models:
        head = unwrap(model).get_output_embeddings()
        head.register_forward_hook(lambda module, args, out: calls.append(out.shape[-1]))
    return calls


def one_update(model_dir, ref_dir, strategy: str, loss_type: str) -> dict:
    """One optimizer step on this rank's share of ``global_batch()``; the full weights,
    and the calls that the log-prob passes made to an LM head module."""
    from transformers import AutoModelForCausalLM

    runtime = Runtime.from_settings("cpu")
    cfg, (batch, rewards) = config(loss_type), global_batch()
    per_rank = B // runtime.world_size
    groups = slice(runtime.rank * per_rank, (runtime.rank + 1) * per_rank)
    local = batch.rows(slice(groups.start * G, groups.stop * G))
    rewards = rewards[groups]  # [B/W, G]

    policy = wrap(AutoModelForCausalLM.from_pretrained(model_dir), strategy, runtime)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval().requires_grad_(False)
    ref = wrap(ref, strategy, runtime, trained=False)
    calls = head_calls(policy, ref)
    local.ref_logp = batched_logp(ref, local, MICRO, 1.0, agree=agreed_calls(ref, runtime))
    adv = global_group_advantages(rewards, "batch", cfg.algorithm.advantage_eps, runtime)
    local.advantages = expand_to_tokens(adv, local.completion_mask)  # [N, T]
    norm = global_normaliser(local.completion_mask, T, runtime)

    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    algorithm = build_algorithm(cfg, runtime, None)
    micro = list(local.micro_batches(MICRO))
    agree = agreed_calls(policy, runtime)
    for mb, sync in zip(micro, synced_micro_batches(policy, len(micro)), strict=True):
        with sync:
            logp, entropy = batch_logp(policy, mb, 1.0, True, agree=agree)  # [n, T] each
            out = policy_loss(logp, entropy, mb, algorithm, cfg.algorithm, norm)
            (out.loss * loss_scale(runtime)).backward()
    grad_norm = clip_grad_norm(policy, cfg.optim.max_grad_norm)
    optimizer.step()
    return {"weights": full_state_dict(policy), "grad_norm": grad_norm, "head_calls": calls}


def checkpoint_round_trip(model_dir, out_dir, strategy: str) -> dict:
    """Train one AdamW step, save (sharded, and ``final/`` in full), train another step,
    then restore the checkpoint into a fresh model and optimizer."""
    from transformers import AutoModelForCausalLM

    runtime = Runtime.from_settings("cpu")
    cfg, (batch, rewards) = config("token_mean"), global_batch()
    local = batch.rows(slice(runtime.rank * 8, (runtime.rank + 1) * 8))  # 2 groups
    adv = global_group_advantages(
        rewards[runtime.rank * 2 : (runtime.rank + 1) * 2], "group", 1e-4, runtime
    )
    local.advantages = expand_to_tokens(adv, local.completion_mask)  # [N, T]

    def fresh():
        model = wrap(AutoModelForCausalLM.from_pretrained(model_dir), strategy, runtime)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(model, optimizer):
        norm = global_normaliser(local.completion_mask, T, runtime)
        logp, _ = batch_logp(model, local, 1.0, agree=agreed_calls(model, runtime))  # [n, T]
        out = policy_loss(
            logp, None, local, build_algorithm(cfg, runtime, None), cfg.algorithm, norm
        )
        (out.loss * loss_scale(runtime)).backward()
        optimizer.step()
        optimizer.zero_grad()

    directory = Path(out_dir) / strategy
    directory.mkdir(parents=True, exist_ok=True)
    model, optimizer = fresh()
    step(model, optimizer)
    save_sharded(directory, model, optimizer, {"rank": runtime.rank}, runtime)
    save_full(directory / "final", model, None, runtime)
    saved = snapshot(model)
    step(model, optimizer)
    after_two = snapshot(model)
    model, optimizer = fresh()
    own = load_sharded(directory, model, optimizer, runtime)
    restored = snapshot(model)
    step(model, optimizer)
    return {
        "saved": saved,
        "restored": restored,
        "own": own,
        "after_two": after_two,
        "resumed_two": snapshot(model),
    }


def snapshot(model) -> dict[str, torch.Tensor]:
    """The full weights as they are now (a one-process state dict shares their storage)."""
    return {k: v.clone() for k, v in full_state_dict(model).items()}


def all_updates(model_dir, ref_dir, out_dir) -> dict:
    updates = {
        (strategy, loss_type): one_update(model_dir, ref_dir, strategy, loss_type)
        for strategy in ("ddp", "fsdp")
        for loss_type in LOSS_TYPES
    }
    checkpoints = {s: checkpoint_round_trip(model_dir, out_dir, s) for s in ("ddp", "fsdp")}
    return {"updates": updates, "checkpoints": checkpoints}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from conftest import TINY

    root = tmp_path_factory.mktemp("dist")
    return init_model_dir(root / "policy", **TINY), init_model_dir(root / "ref", seed=1, **TINY)


@pytest.fixture(scope="module")
def two_processes(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    return run_ranks(all_updates, 2, out, *dirs, out / "checkpoints"), out / "checkpoints"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_processes_update_like_one(dirs, two_processes, strategy, loss_type):
    from transformers import AutoModelForCausalLM

    one = one_update(*dirs, "ddp", loss_type)  # world size 1: no wrapping at all
    two = two_processes[0][0]["updates"][(strategy, loss_type)]
    start = AutoModelForCausalLM.from_pretrained(dirs[0]).state_dict()
    assert one["grad_norm"] > 0.1  # the clip is active: the global norm matters
    # no [N, T, V] logits on any rank either: the wrapped passes ran the chunked head
    per_rank = [r["updates"][(strategy, loss_type)]["head_calls"] for r in two_processes[0]]
    assert one["head_calls"] == [] and per_rank == [[], []]
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-6)
    assert two["weights"].keys() == one["weights"].keys()
    for name, w in one["weights"].items():
        # the update itself (w - start), to 1e-6: the weights' own size hides nothing
        torch.testing.assert_close(
            two["weights"][name] - start[name], w - start[name], rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_restores_weights_optimizer_and_rank_state(two_processes, strategy):
    from transformers import AutoModelForCausalLM

    ranks, directory = two_processes
    got = ranks[0]["checkpoints"][strategy]
    assert [r["checkpoints"][strategy]["own"] for r in ranks] == [{"rank": 0}, {"rank": 1}]
    for name, w in got["saved"].items():
        torch.testing.assert_close(got["restored"][name], w, rtol=0, atol=0)
        # the optimizer's moments came back too: the next AdamW step is the same step
        torch.testing.assert_close(got["resumed_two"][name], got["after_two"][name])
    final = AutoModelForCausalLM.from_pretrained(directory / strategy / "final").state_dict()
    assert final.keys() == got["saved"].keys()
    for name, w in got["saved"].items():
        torch.testing.assert_close(final[name], w, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("world_size", "overrides", "match"),
    [
        (3, [], r"rollout.prompts_per_step = 4: expected a multiple of the 3 processes"),
        (2, ["optim.num_minibatches=4"], r"times optim.num_minibatches = 4"),
        (2, ["distributed.world_size=4"], r"distributed.world_size = 4: the run was launched on 2"),
        (2, ["algorithm.name=ppo"], r"algorithm.name = 'ppo'"),
    ],
)
def test_a_launch_that_cannot_split_the_batch_stops_first(world_size, overrides, match):
    from grpo.config import ConfigError, build_config

    cfg = build_config(overrides=["rollout.prompts_per_step=4", *overrides])
    with pytest.raises(ConfigError, match=match):
        cfg.distributed.check(world_size, cfg)


def test_split_to_halves_the_largest_sets_until_the_agreed_count():
    from grpo.logprobs import split_to

    # sets of 4 and 1 rows, 4 calls agreed: 4 -> 2 + 2, then the first 2 -> 1 + 1
    got = split_to([torch.tensor([0, 1, 2, 3]), torch.tensor([4])], 4)
    assert [c.tolist() for c in got] == [[0], [1], [2, 3], [4]]
    with pytest.raises(ValueError, match="cannot split 2 sets of single rows into 3"):
        split_to([torch.tensor([0]), torch.tensor([1])], 3)
