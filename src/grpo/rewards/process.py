"""Process supervision plumbing: character-level steps -> token-level tensors (eq. V.I).

Step reward sources (``grpo.rewards.models``: the built-in step verifier or a process reward
model) score a completion's *text*: per completion, K step scores and the character offset
in the text of each step's last character. ``advantages.process_advantages`` wants tensors
over the policy's *tokens*. Two pure functions bridge them:

- ``char_to_token_ends``: each step's last character -> the completion token that holds it;
- ``step_tensors``: ragged per-completion lists -> padded ``[N, K]`` rewards, mask, ends.

Shape letters (see ``grpo.types``): N completions, T completion tokens, K steps (the most
steps of any completion in the batch, at least 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


def char_to_token_ends(
    tokenizer: PreTrainedTokenizerBase,
    completion_ids: Sequence[Sequence[int]],
    texts: Sequence[str],
    end_offsets: Sequence[Sequence[int]],
) -> list[list[int]]:
    """For each step, the index within its completion of the token holding the step's last
    character.

    Token i "holds" character c when the decoded prefix ``ids[: i + 1]`` is the first to
    reproduce ``text[: c + 1]``: with byte-level BPE, a character split over several tokens
    belongs to the token that completes it. Coverage is measured as the longest common
    prefix of ``decode(ids[: i + 1], skip_special_tokens=True)`` and ``text``, so a decoded
    prefix ending in half a character (U+FFFD) or any other mismatch never counts as
    covering more than it matches. This works for any tokenizer, without offset mappings.

    A step end at or beyond what the tokens reproduce of the text clamps to the token that
    completes the text (the last real token: trailing special tokens such as EOS or padding
    are never chosen); a negative offset clamps to 0. If no token reproduces any of the text
    (the text is not the decoding of the ids), every step maps to the last token. An empty
    completion maps every step to 0. Never raises on mismatched inputs of the right lengths.

    Coverage grows with the prefix, so each step end is found by binary search over prefix
    lengths: O(K log T) decodes per completion, each decoded prefix cached, instead of T.

    Args:
        tokenizer: the policy's tokenizer (the one that produced ``completion_ids``).
        completion_ids: N lists of completion token ids (unpadded; a trailing EOS is fine).
        texts: N strings, ``tokenizer.decode(ids, skip_special_tokens=True)``: the text the
            step offsets index.
        end_offsets: N lists of K_i character offsets into ``texts[i]``, the last character
            of each step (as ``split_steps`` and the step reward sources give them).

    Returns:
        N lists of K_i token indices in ``[0, len(completion_ids[i]))`` (0 when empty).

    >>> from grpo.modeling import build_char_tokenizer
    >>> tok = build_char_tokenizer()
    >>> ids = tok("1+2=3\\nA:3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    >>> char_to_token_ends(tok, [ids], [tok.decode(ids, skip_special_tokens=True)], [[4, 8, 99]])
    [[4, 8, 8]]
    """
    if not len(completion_ids) == len(texts) == len(end_offsets):
        raise ValueError(
            f"got {len(completion_ids)} completion_ids, {len(texts)} texts and "
            f"{len(end_offsets)} end_offsets lists; give one of each per completion"
        )
    return [
        _token_ends(tokenizer, list(ids), text, list(ends))
        for ids, text, ends in zip(completion_ids, texts, end_offsets, strict=True)
    ]


def _token_ends(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], text: str, ends: list[int]
) -> list[int]:
    num_tokens = len(ids)
    if num_tokens == 0:
        return [0] * len(ends)
    cache: dict[int, int] = {}

    def covered(i: int) -> int:
        """Characters of ``text`` that ``ids[: i + 1]`` reproduces."""
        if i not in cache:
            decoded = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
            cache[i] = _common_prefix_length(decoded, text)
        return cache[i]

    total = covered(num_tokens - 1)
    if total == 0:
        return [num_tokens - 1] * len(ends)
    token_ends = []
    for end in ends:
        target = min(max(int(end), 0), total - 1)  # the character to cover
        lo, hi = 0, num_tokens - 1  # covered(hi) > target always holds
        while lo < hi:  # smallest i with covered(i) > target
            mid = (lo + hi) // 2
            if covered(mid) > target:
                hi = mid
            else:
                lo = mid + 1
        token_ends.append(lo)
    return token_ends


def _common_prefix_length(a: str, b: str) -> int:
    if b.startswith(a):  # the usual case, at C speed
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def step_tensors(
    step_scores: Sequence[Sequence[float]], token_ends: Sequence[Sequence[int]]
) -> tuple[Tensor, Tensor, Tensor]:
    """Pad ragged per-completion steps into the tensors ``process_advantages`` takes.

    Args:
        step_scores: N lists, K_i reward of each step of completion i.
        token_ends: N lists, K_i token index of each step's end (``char_to_token_ends``).

    Returns:
        ``(step_rewards, step_mask, step_end)``, each ``[N, K]`` with K = max(1, max_i K_i):
        float32 rewards, long 0/1 mask (a completion with no steps is all 0), long token
        indices; padded steps hold 0 in all three.

    >>> rewards, mask, end = step_tensors([[1.0, 0.0], []], [[3, 7], []])
    >>> rewards.tolist(), mask.tolist(), end.tolist()
    ([[1.0, 0.0], [0.0, 0.0]], [[1, 1], [0, 0]], [[3, 7], [0, 0]])
    """
    if len(step_scores) != len(token_ends):
        raise ValueError(
            f"got {len(step_scores)} step_scores lists for {len(token_ends)} token_ends lists"
        )
    for i, (scores, ends) in enumerate(zip(step_scores, token_ends, strict=True)):
        if len(scores) != len(ends):
            raise ValueError(f"completion {i} has {len(scores)} step scores but {len(ends)} ends")
    num_rows = len(step_scores)
    num_steps = max([1, *(len(scores) for scores in step_scores)])
    step_rewards = torch.zeros(num_rows, num_steps)  # [N, K]
    step_mask = torch.zeros(num_rows, num_steps, dtype=torch.long)  # [N, K]
    step_end = torch.zeros(num_rows, num_steps, dtype=torch.long)  # [N, K]
    for i, (scores, ends) in enumerate(zip(step_scores, token_ends, strict=True)):
        k = len(scores)
        step_rewards[i, :k] = torch.tensor([float(s) for s in scores])
        step_mask[i, :k] = 1
        step_end[i, :k] = torch.tensor([int(e) for e in ends], dtype=torch.long)
    return step_rewards, step_mask, step_end
