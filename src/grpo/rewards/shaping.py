"""Reward shaping applied after the reward functions, on the combined reward."""

from __future__ import annotations

import torch


def overlong_penalty(
    lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), to add to the reward.

    0 for ``|y| <= L_max - L_cache``; ``((L_max - L_cache) - |y|) / L_cache * penalty``
    (falling linearly to ``-penalty``) inside the last ``L_cache = buffer`` tokens; and
    ``-penalty`` beyond ``L_max``. A truncated completion here has exactly ``L_max`` tokens.

    Args:
        lengths: [N] completion lengths in tokens.
        max_length: L_max, the generation budget (``rollout.max_completion_length``).
        buffer: L_cache, how many tokens before L_max the penalty starts (0: off).

    >>> overlong_penalty(torch.tensor([10, 17, 20]), max_length=20, buffer=4)
    tensor([ 0.0000, -0.2500, -1.0000])
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float)
    start = max_length - buffer
    over = (lengths.float() - start).clamp(min=0)  # [N] tokens into the buffer
    return 0.0 - (over / buffer).clamp(max=1.0) * penalty  # [N] (0.0 - x: no -0.0)
