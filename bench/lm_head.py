"""One policy pass (forward + backward of the log-probs) with the chunked LM head against
the full-logits path it replaced, on the same model and batch.

    python bench/lm_head.py --config short        # V = 101: the head must cost nothing more
    python bench/lm_head.py --config big-vocab    # V = 151,936: memory is the point

``full``: ``model(...).logits`` for the completion positions, then ``token_logp`` and
(no grad) ``token_entropy``, as the policy pass did before the chunked head.
``chunked``: ``grpo.logprobs.completion_logp`` (hidden states, head over chunks of
positions, recomputed in backward). Each mode runs in its own child process (peak RSS is
per process), ``--repeats`` passes after one warm-up; the table gives the best and median
seconds per pass and the peak RSS, and the two modes' log-probs must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULT_MARKER, WORKLOADS, model_sizes, peak_rss_mb


def _batch(w, vocab: int, seed: int):
    """B*G rows: a shared random prompt per group, completions of random lengths up to T."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    b, g, p, t = w.prompts_per_step, w.num_generations, w.prompt_tokens, w.max_completion_length
    ids = torch.randint(7, vocab, (b * g, p + t), generator=gen)  # [N, P + T]
    ids[:, :p] = ids[::g, :p].repeat_interleave(g, dim=0)
    mask = torch.ones_like(ids)  # [N, P + T]
    lengths = torch.randint(t // 4, t + 1, (b * g,), generator=gen)  # [N]
    for row, n in enumerate(lengths.tolist()):
        mask[row, p + n :] = 0
    return ids, mask, t


def run_child(mode: str, w, args) -> dict:
    import torch

    from grpo.logprobs import completion_logp, token_entropy, token_logp
    from grpo.modeling import build_char_tokenizer, build_tiny_model

    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer(vocab_size=w.vocab_size)
    model = build_tiny_model(tok, seed=args.seed, **model_sizes(w)).train()
    ids, mask, t = _batch(w, len(tok), args.seed)
    weights = mask[:, -t:].float()  # [N, T]

    def full():
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=t + 1,
        ).logits[:, :-1]  # [N, T, V]
        logp = token_logp(logits, ids[:, -t:])
        with torch.no_grad():
            token_entropy(logits)
        return logp

    def chunked():
        return completion_logp(model, ids, mask, t, with_entropy=True)[0]

    step = full if mode == "full" else chunked
    seconds = []
    for _ in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        logp = step()
        (logp * weights).sum().backward()
        seconds.append(time.perf_counter() - start)
    return {
        "best_s": min(seconds[1:]),
        "median_s": statistics.median(seconds[1:]),
        "peak_rss_mb": peak_rss_mb(),
        "logp_sum": float((logp.detach() * weights).sum()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(WORKLOADS), default="short")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    w = WORKLOADS[args.config]
    if w.prompt_tokens is None:
        raise SystemExit(f"--config {args.config}: needs a workload with prompt_tokens")
    if args.child:
        print(RESULT_MARKER + json.dumps(run_child(args.child, w, args)), flush=True)
        return
    results = {}
    for mode in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--child", mode, "--config", args.config]
        cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run([*cmd, "--seed", str(args.seed)], capture_output=True, text=True)
        lines = [x for x in out.stdout.splitlines() if x.startswith(RESULT_MARKER)]
        if out.returncode or not lines:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(f"{mode} failed (exit {out.returncode})")
        results[mode] = json.loads(lines[-1][len(RESULT_MARKER) :])
    n = w.prompts_per_step * w.num_generations
    print(f"{args.config}: N={n}, T={w.max_completion_length}, V={w.vocab_size or 101}")
    print(f"{'mode':8} {'best s':>8} {'median s':>9} {'peak RSS MiB':>13} {'sum logp':>12}")
    for mode, r in results.items():
        print(
            f"{mode:8} {r['best_s']:8.3f} {r['median_s']:9.3f} {r['peak_rss_mb']:13.0f} "
            f"{r['logp_sum']:12.4f}"
        )
    print(json.dumps({"config": args.config, **results}))


if __name__ == "__main__":
    main()
