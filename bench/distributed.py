"""Generation under FSDP2 on CPU: what gathering the full weights for the decode loop
costs, against the decode itself and against all-gathering every layer at every token.

    python bench/distributed.py --config short                          # 1 process
    torchrun --standalone --nproc_per_node=2 bench/distributed.py --config short

Each process builds the workload's model (``bench/common.py``), shards it the way
training does (``grpo.distributed.wrap``, ``fully_shard`` per decoder layer and at the
root) and generates G completions for its share of the B prompts with the torch engine:

* ``gather_s``: all-gather every sharded unit's weights (``gathered_parameters`` entry),
* ``decode_s``: ``TorchEngine.generate`` on the gathered weights (no collective inside),
* ``reshard_s``: freeing the gathered weights on exit,
* ``sharded_step_s`` / ``gathered_step_s``: one no-grad forward of a one-token decode
  batch ``[B*G/W, 1]`` with sharded weights (each layer all-gathers, as a per-layer
  decode would at every token) and with gathered ones; their difference times the decode
  steps is what per-layer all-gathers would have added to the round.

Rank 0 prints one ``BENCH_RESULT {...}`` line (medians over ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULT_MARKER, WORKLOADS, make_prompts, model_sizes

from grpo.distributed import gathered_parameters, wrap
from grpo.modeling import build_char_tokenizer, build_tiny_model
from grpo.rollout.torch_engine import TorchEngine
from grpo.runtime import Runtime
from grpo.types import SamplingParams


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@torch.no_grad()
def one_round(model, engine, prompts, sampling, generator, step_ids) -> dict[str, float]:
    """One generation round on gathered weights, with its parts timed."""
    out = {"sharded_step_s": timed(lambda: model(input_ids=step_ids))[0]}
    context = gathered_parameters(model)
    out["gather_s"], gathered = timed(context.__enter__)
    out["decode_s"], rollout = timed(
        lambda: engine.generate(gathered, prompts, sampling, generator)
    )
    out["decode_steps"] = float(rollout.completion_ids.shape[1])
    out["gathered_step_s"] = timed(lambda: gathered(input_ids=step_ids))[0]
    out["reshard_s"] = timed(lambda: context.__exit__(None, None, None))[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="short", choices=sorted(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    w = WORKLOADS[args.config]
    runtime = Runtime.from_settings("cpu")
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=args.seed, **model_sizes(w))
    params_total = sum(p.numel() for p in model.parameters())
    model = wrap(model, "fsdp", runtime)
    per_rank = w.prompts_per_step // runtime.world_size
    prompts = [
        tok(p, add_special_tokens=False)["input_ids"]
        for p in make_prompts(w, args.seed)[runtime.rank * per_rank : (runtime.rank + 1) * per_rank]
    ]
    sampling = SamplingParams(
        num_generations=w.num_generations,
        max_completion_length=w.max_completion_length,
        eos_token_ids=(tok.eos_token_id,),
        pad_token_id=tok.pad_token_id,
    )
    rows = per_rank * w.num_generations
    step_ids = torch.randint(7, 60, (rows, 1))  # [B*G/W, 1] one decode step's tokens
    runs = []
    for r in range(args.repeats):
        runtime.barrier()
        generator = torch.Generator().manual_seed(args.seed + r)
        runs.append(one_round(model, TorchEngine(), prompts, sampling, generator, step_ids))
    results = {k: [run[k] for run in runs] for k in runs[0]}
    med = {k: statistics.median(v) for k, v in results.items()}
    per_layer_extra = (med["sharded_step_s"] - med["gathered_step_s"]) * med["decode_steps"]
    out = {
        "config": w.name,
        "world_size": runtime.world_size,
        "params": params_total,
        "prompts_per_rank": per_rank,
        "rows_per_rank": rows,
        **{k: round(v, 4) for k, v in med.items()},
        "gather_over_decode": round((med["gather_s"] + med["reshard_s"]) / med["decode_s"], 4),
        "per_layer_allgather_extra_s": round(per_layer_extra, 4),
    }
    if runtime.is_main:
        print(RESULT_MARKER + json.dumps(out))
    runtime.close()


if __name__ == "__main__":
    main()
