"""What one GRPO step costs on 1, 8 and 64 GPUs for a 1.5B and a 7B model, on paper.

    python bench/scaling_paper.py            # prints the markdown table of bench/README.md

Every number comes from the constants below (FLOP and byte counts of the step, H100
datasheet rates, stated efficiencies); nothing is measured here. The CPU measurements that
choose the design (gathered weights for generation, one all-gather per round) are in
``bench/distributed.py`` and ``bench/README.md``.

The step (DESIGN.md's loop, mu = 1, beta > 0, ``model.dtype: bfloat16``):

* generation: B*G = 1024 completions (B = 128 prompts of 256 tokens, G = 8), mean length
  512, the longest 1024 (decode steps); every rank decodes its N/W rows on gathered weights;
* reference pass: 2 * P FLOPs per scored token; update: 6 * P per trained token (prompt
  once per group + completion tokens); P = matmul parameters (LM head included, input
  embedding not);
* micro-batches of 8 completions per GPU; FSDP2 all-gathers the weights in every forward
  and again in backward (``reshard_after_forward``) and reduce-scatters gradients after every
  micro-batch; DDP all-reduces gradients once per optimizer step (``no_sync`` before).
"""

from __future__ import annotations

from dataclasses import dataclass

PEAK = 989e12
"""H100 SXM dense bf16 FLOP/s."""
TRAIN_EFFICIENCY = 0.4
"""Fraction of PEAK the reference and update passes reach (typical MFU of eager training)."""
DECODE_EFFICIENCY = 0.3
"""Fraction of PEAK decode matmuls reach with N/W rows per step."""
HBM = 3.35e12
"""H100 memory bandwidth, bytes/s."""
NVLINK = 360e9
"""All-gather / reduce-scatter bus bandwidth inside an 8-GPU NVLink node, bytes/s."""
INTER_NODE = 50e9
"""Per-GPU bandwidth between nodes (one 400 Gb/s NIC per GPU), bytes/s."""
LAUNCH_FLOOR = 1.7e-3
"""Seconds per eager decode step regardless of size: ~15 kernels per layer x 28 layers x
~4 us of launch and Python overhead (what CUDA graphs or vLLM remove)."""

COMPLETIONS, PROMPTS, PROMPT_LEN, MEAN_LEN, DECODE_STEPS = 1024, 128, 256, 512, 1024
MICRO = 8
"""Completions per micro-batch per GPU."""
BYTES = 2
"""bf16 weights and gradients."""


@dataclass(frozen=True)
class Model:
    name: str
    params: float
    """All parameters (what is stored, gathered and reduced)."""
    matmul_params: float
    """Parameters multiplied per token: all but the input-embedding lookup."""
    layers: int
    kv_heads: int
    head_dim: int = 128

    @property
    def kv_bytes_per_token(self) -> float:
        return self.layers * 2 * self.kv_heads * self.head_dim * BYTES


MODELS = [
    Model("1.5B (Qwen2.5-1.5B)", 1.54e9, 1.54e9, 28, 2),  # tied embeddings: the head counts
    Model("7B (Qwen2.5-7B)", 7.62e9, 7.07e9, 28, 4),
]


def collective_seconds(nbytes: float, world: int) -> float:
    """One ring all-gather or reduce-scatter of ``nbytes`` in total over ``world`` GPUs."""
    if world == 1:
        return 0.0
    bandwidth = NVLINK if world <= 8 else INTER_NODE
    return nbytes * (world - 1) / world / bandwidth


def step(model: Model, world: int, strategy: str) -> dict[str, float]:
    rows = COMPLETIONS / world
    trained_tokens = PROMPTS * PROMPT_LEN + COMPLETIONS * MEAN_LEN  # prompts once per group
    # generation: roofline per GPU, plus the eager launch floor per decode step
    decode_flops = 2 * model.matmul_params * rows * MEAN_LEN
    weight_reads = DECODE_STEPS * model.params * BYTES
    kv_reads = rows * (PROMPT_LEN * MEAN_LEN + MEAN_LEN**2 / 2) * model.kv_bytes_per_token
    generation = max(decode_flops / (PEAK * DECODE_EFFICIENCY), (weight_reads + kv_reads) / HBM)
    generation += DECODE_STEPS * LAUNCH_FLOOR
    compute = 8 * model.matmul_params * trained_tokens / world / (PEAK * TRAIN_EFFICIENCY)
    weights = model.params * BYTES
    micro = max(1.0, rows / MICRO)
    if strategy == "ddp":
        gathers, scatters = 0.0, 2 * collective_seconds(weights, world)  # all-reduce = RS + AG
    else:  # one gather for generation; per micro-batch: reference fwd, policy fwd and bwd
        gathers = (1 + 3 * micro) * collective_seconds(weights, world)
        scatters = micro * collective_seconds(weights, world)
    per_gpu_state = (8 if strategy == "ddp" else 8 / world) * model.params  # w, g, AdamW m, v
    return {
        "generation": generation,
        "ref+update compute": compute,
        "all-gathers": gathers,
        "reduce-scatters": scatters,
        "state GB/GPU": per_gpu_state / 1e9,
    }


def main() -> None:
    print(
        "| model | GPUs | strategy | generation s | ref+update s | all-gathers s "
        "| reduce-scatters s | step s (no overlap / overlap) | state GB/GPU | wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for world, strategy in ((1, "ddp"), (8, "ddp"), (8, "fsdp"), (64, "fsdp")):
            s = step(model, world, strategy)
            comm = s["all-gathers"] + s["reduce-scatters"]
            serial = s["generation"] + s["ref+update compute"] + comm
            overlapped = s["generation"] + max(s["ref+update compute"], comm)
            parts = {"generation": s["generation"], "compute": s["ref+update compute"],
                     "communication": comm}  # fmt: skip
            wall = max(parts, key=parts.get)
            print(
                f"| {model.name} | {world} | {strategy} | {s['generation']:.1f} | "
                f"{s['ref+update compute']:.1f} | {s['all-gathers']:.2f} | "
                f"{s['reduce-scatters']:.2f} | {serial:.1f} / {overlapped:.1f} | "
                f"{s['state GB/GPU']:.0f} | {wall} |"
            )


if __name__ == "__main__":
    main()
