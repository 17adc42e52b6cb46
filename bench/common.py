"""Workloads, model/prompt setup, the shared reward, and the accounting used by ``vs_trl.py``.

Everything both sides must agree on lives here, so that the two child processes build
their run from the same definitions: the model directory, the prompts, the reward
function, and how FLOPs, peak memory and the matmul peak are measured.

Useful FLOPs (per training step), with N the parameter count *excluding the input
embedding* (the tied output head is counted: it is a real ``[d, V]`` matmul per token):

* ``2 * N`` per sampled completion token (the decode forward; prompt prefill not counted),
* ``2 * N`` per token the reference model scores (prompt + completion, no padding),
* ``6 * N`` per token the policy trains on (forward + backward, prompt + completion).

A prompt counts once per group, not once per completion: its G copies are the same
tokens, so the unique work is ``B * P + N * T`` tokens. A trainer that runs the prompt G
times (TRL) does more than this useful work, one that shares it (ours) does not.

Attention's sequence-length term is left out, as in the usual ``6 * N * tokens`` rule; it
is small next to ``N`` at these lengths (at 320 tokens it adds under 10% for d=512).
"""

from __future__ import annotations

import json
import random
import string
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

RESULT_MARKER = "BENCH_RESULT "
"""Prefix of the one stdout line a child process prints its JSON result on."""


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration: model shape, rollout shape and the shared settings."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    prompts_per_step: int
    """B: prompts per step."""
    num_generations: int
    """G: completions per prompt."""
    prompt_tokens: int | None
    """Tokens per generated prompt; None uses the add2 task's prompts (6 tokens each)."""
    max_completion_length: int
    temperature: float = 1.0
    beta: float = 0.04
    learning_rate: float = 1e-6
    num_prompts: int = 512
    """Size of the prompt pool both sides draw from."""
    steps: int = 10
    """Default measured steps (``--steps``)."""
    warmup: int = 2
    """Default warm-up steps excluded from the median (``--warmup``)."""
    arch: str = "llama"
    """``llama`` or ``qwen2`` (``grpo.modeling.build_tiny_model``)."""
    vocab_size: int | None = None
    """Vocabulary padded with filler tokens to this size; None: the 101-token characters."""
    lora_rank: int = 0
    """LoRA adapters of this rank on every attention and MLP projection, on both sides
    (ours ``model.lora``, TRL's ``peft_config``); 0 trains every weight."""


# 25M-parameter Llama shape: 8 layers x (4 * 512^2 attention + 3 * 512 * 1376 SwiGLU).
_LLAMA_25M = dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376)

WORKLOADS: dict[str, Workload] = {
    "tiny": Workload(
        name="tiny",
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        intermediate_size=512,
        max_position_embeddings=256,
        prompts_per_step=16,
        num_generations=8,
        prompt_tokens=None,
        max_completion_length=24,
        steps=10,
        warmup=2,
    ),
    "short": Workload(
        name="short",
        **_LLAMA_25M,
        max_position_embeddings=512,
        prompts_per_step=8,
        num_generations=8,
        prompt_tokens=8,
        max_completion_length=64,
        steps=4,
        warmup=1,
    ),
    "long-prompt": Workload(
        name="long-prompt",
        **_LLAMA_25M,
        max_position_embeddings=512,
        prompts_per_step=4,
        num_generations=16,
        prompt_tokens=256,
        max_completion_length=64,
        steps=4,
        warmup=1,
    ),
    # Qwen2's vocabulary (151,936) on a small body: the output head is 39M of 44M
    # parameters and every pass over N x T positions meets a [N, T, V] logits tensor.
    "big-vocab": Workload(
        name="big-vocab",
        arch="qwen2",
        vocab_size=151_936,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=1376,
        max_position_embeddings=512,
        prompts_per_step=4,
        num_generations=8,
        prompt_tokens=16,
        max_completion_length=256,
        steps=2,
        warmup=1,
    ),
}
WORKLOADS["big-vocab-lora"] = replace(
    WORKLOADS["big-vocab"], name="big-vocab-lora", lora_rank=16, learning_rate=1e-5
)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Where LoRA adapters go in ``lora_rank`` workloads (alpha = 2 * rank, no dropout)."""


def model_sizes(workload: Workload) -> dict:
    """The workload's architecture and sizes, as ``build_tiny_model`` takes them."""
    w = workload
    return {
        "arch": w.arch,
        "hidden_size": w.hidden_size,
        "num_layers": w.num_layers,
        "num_heads": w.num_heads,
        "intermediate_size": w.intermediate_size,
        "max_position_embeddings": w.max_position_embeddings,
    }


def prepare_workdir(workload: Workload, workdir: Path, seed: int) -> dict:
    """Create the model directory and the prompt file both sides load; return their paths."""
    from grpo.hf import load_model_and_tokenizer
    from grpo.modeling import init_model_dir

    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = init_model_dir(
        workdir / "model", vocab_size=workload.vocab_size, seed=seed, **model_sizes(workload)
    )
    model, tokenizer = load_model_and_tokenizer(model_dir)
    prompts = make_prompts(workload, seed)
    lengths = {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    if len(lengths) != 1:
        raise RuntimeError(f"prompts should all have one token length, got {sorted(lengths)}")
    prompt_file = workdir / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {
        "model_dir": str(model_dir),
        "prompt_file": str(prompt_file),
        "prompt_tokens": lengths.pop(),
        "vocab_size": len(tokenizer),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_non_embedding": non_embedding_params(model),
    }


def make_prompts(workload: Workload, seed: int) -> list[str]:
    """add2 problems for ``tiny``; otherwise random lowercase strings of the set length
    (the character tokenizer gives one token per character)."""
    if workload.prompt_tokens is None:
        from grpo.tasks import get_task

        rows = get_task("add2").problems("train", workload.num_prompts, seed)
        return [r["prompt"] for r in rows]
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    return [
        "".join(rng.choice(letters) for _ in range(workload.prompt_tokens))
        for _ in range(workload.num_prompts)
    ]


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters that do matmul work per token: all but the input embedding's lookup
    table. With tied embeddings that table is also the output head (a ``[d, V]`` matmul
    per token), so it is counted once."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding:
        return total
    return total - embedding.numel()


COMPLETION_TOKENS: list[int] = []
"""Completion tokens (EOS included, padding excluded) of each reward call, i.e. each step."""


def bench_reward(prompts: list, completions: list, completion_ids: list, **kwargs) -> list[float]:
    """Cheap, deterministic reward with TRL's signature: the fraction of vowels and odd
    digits in a completion (digits: the filler tokens of ``big-vocab`` decode as ``<v123>``).
    It varies within a group, so advantages are not all zero and no trainer can skip its
    update; it also records the step's completion-token count, identically on both sides.

    >>> bench_reward(["p", "p", "p"], ["abc", "xy", "<v135>"], [[1, 2, 3], [4, 5], [6]])
    [0.3333333333333333, 0.0, 0.5]
    """
    COMPLETION_TOKENS.append(sum(len(ids) for ids in completion_ids))
    return [sum(c in "aeiou13579" for c in text) / max(1, len(text)) for text in completions]


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_gflops(
    sizes: tuple[int, ...] = (256, 512, 1024), repeats: int = 10, precision: str = "fp32"
) -> float:
    """Best square-matmul rate (GFLOP/s) on the current torch thread setting, in fp32 or
    bf16 (the denominator of a bf16 run's utilisation is the bf16 peak).

    The best of several sizes and repeats, so that a moment of contention on a shared
    machine lowers it less (it is the denominator of the utilisation)."""
    best, dtype = 0.0, torch.bfloat16 if precision == "bf16" else torch.float32
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def useful_flops(
    n_params: int,
    prompt_tokens: int,
    completion_tokens: int,
    num_prompts: int,
    with_reference: bool,
) -> float:
    """Useful FLOPs of one step (see the module docstring); prompts all ``prompt_tokens`` long."""
    sequence_tokens = num_prompts * prompt_tokens + completion_tokens
    flops = 2 * n_params * completion_tokens + 6 * n_params * sequence_tokens
    if with_reference:
        flops += 2 * n_params * sequence_tokens
    return flops


def summarise(
    step_s: list[float],
    tokens: list[int],
    phases: dict[str, list[float]],
    warmup: int,
) -> dict:
    """Medians over the steps after the warm-up: s/step, completion tokens/s (each step's
    tokens over its own time, so that one slow step on a shared machine moves it as little
    as it moves s/step), and each phase's seconds."""
    import statistics

    kept_s, kept_tok = step_s[warmup:], tokens[warmup : len(step_s)]
    if not kept_s:
        raise RuntimeError(f"no steps left after {warmup} warm-up steps")
    return {
        "s_per_step": statistics.median(kept_s),
        "best_s_per_step": min(kept_s),
        "tokens_per_s": statistics.median(n / s for n, s in zip(kept_tok, kept_s, strict=True)),
        "completion_tokens_per_step": statistics.mean(kept_tok),
        "phases_s": {k: statistics.median(v[warmup:]) for k, v in phases.items()},
        "all_step_s": step_s,
        "all_tokens": tokens[: len(step_s)],
    }


def workload_dict(workload: Workload) -> dict:
    return asdict(workload)
