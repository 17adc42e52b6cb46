"""Dropout off by default (KL exactly 0 at step one, ratio exactly 1 before an update) and
gradient checkpointing (the same gradients as without)."""

import pytest
import torch
from test_trainer import distinct_chars, make_cfg
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from grpo.algorithms.objective import policy_loss
from grpo.logprobs import batch_logp
from grpo.losses import Normaliser, kl_divergence
from grpo.modeling import build_char_tokenizer, build_tiny_model
from grpo.trainer import GRPOTrainer
from grpo.types import Batch


def _gpt2(tok):  # GPT-2's dropout everywhere, raised from its default 0.1 to 0.3
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.3,
        embd_pdrop=0.3,
        attn_pdrop=0.3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return GPT2LMHeadModel(config)


def _llama(tok):  # Llama's dropout is a float its attention passes to a functional dropout
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        attention_dropout=0.3,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("disable", [True, False])
def test_dropout_off_gives_kl_zero_and_ratio_one(build, disable, tiny_model_dir, tmp_path):
    tok = build_char_tokenizer()
    cfg = make_cfg(tiny_model_dir, tmp_path, f"model.disable_dropout={disable}")
    trainer = GRPOTrainer(cfg, model=build(tok), tokenizer=tok, reward_functions=[distinct_chars])
    torch.manual_seed(1)
    rollout = trainer.engine.generate(trainer.model, [[8, 9, 10]], trainer.sampling)
    batch = Batch.from_rollout(rollout)
    real = batch.completion_mask.bool()
    # step one: the reference (eval mode) against the policy in training mode, scored twice
    # as old_logp and logp would be with mu > 1 (the trainer itself skips the reference
    # pass while the weights are equal, so the passes are run here directly)
    trainer.model.train()
    with torch.no_grad():
        ref_logp = trainer.reference.logp(batch, 3)  # [N, T]
        old_logp = trainer.policy.logp(batch)[0]  # [N, T]
        logp = trainer.policy.logp(batch)[0]  # [N, T]
    kl = kl_divergence(logp, ref_logp, "k3")[real]
    ratio = torch.exp(logp - old_logp)[real]
    if disable:
        assert torch.equal(kl, torch.zeros_like(kl))
        assert torch.equal(ratio, torch.ones_like(ratio))
    else:  # the test can fail: with dropout on, both are off
        assert kl.sum() > 0.0
        assert not torch.equal(ratio, torch.ones_like(ratio))


@pytest.mark.parametrize("share_prompt", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tmp_path, share_prompt):
    tok = build_char_tokenizer()
    grads, losses = {}, {}
    for checkpointing in (False, True):
        cfg = make_cfg(
            tiny_model_dir,
            tmp_path,
            f"model.gradient_checkpointing={checkpointing}",
            f"optim.share_prompt={share_prompt}",
        )
        model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4)
        trainer = GRPOTrainer(cfg, model=model, tokenizer=tok, reward_functions=[distinct_chars])
        # transformers before 5.18 names it is_gradient_checkpointing
        on = getattr(trainer.model, "is_activation_checkpointing", None)
        assert (trainer.model.is_gradient_checkpointing if on is None else on) == checkpointing
        rollout = trainer.engine.generate(
            model, [[8, 9, 10], [11, 12]], trainer.sampling, torch.Generator().manual_seed(0)
        )
        batch = Batch.from_rollout(rollout)
        batch.advantages = torch.linspace(-1, 1, batch.num_completions)[:, None].expand(
            -1, batch.completion_length
        )
        with torch.no_grad():
            batch.ref_logp = batch_logp(model, batch, 1.0)[0] - 0.1  # [N, T]
        model.train().zero_grad()
        norm = Normaliser.from_mask(batch.completion_mask, cfg.rollout.max_completion_length)
        logp, entropy = trainer.policy.logp(batch, with_entropy=True)  # [N, T] each
        out = policy_loss(logp, entropy, batch, trainer.algorithm, cfg.algorithm, norm)
        out.loss.backward()
        losses[checkpointing] = out.loss.detach()
        grads[checkpointing] = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(losses[True], losses[False])
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b)
