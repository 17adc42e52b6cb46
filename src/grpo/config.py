"""One typed configuration, grouped by concern, validated once.

A run is described by a YAML file whose top-level keys are the sections below, plus
``key=value`` overrides on the command line (``algorithm.beta=0``); every leaf that a
TRL user knows keeps TRL's name (``num_generations``, ``beta``, ``epsilon``, ...).
Unknown keys are errors, not silently ignored settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from grpo.errors import GRPOError


class ConfigError(GRPOError, ValueError):
    """A configuration value is missing, unknown or out of range; the message names it."""


class _Section(BaseModel):
    # allow_inf_nan=False: an inf or nan learning rate, beta or reward weight would
    # otherwise pass every bound check (nan compares false) and train NaN weights
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )


class LoraConfig(_Section):
    """Low-rank adapters (Hu et al. 2021, "LoRA") through PEFT: ``W + (alpha / rank) B A``
    on the target layers, only ``A`` and ``B`` trained. The reference is the policy with
    its adapters switched off, so no second copy of the weights exists."""

    rank: int = Field(default=16, ge=1)
    """r: the adapters' rank (PEFT's ``r``)."""
    alpha: float = Field(default=32.0, gt=0)
    """Scale numerator: the update is ``alpha / rank * B A`` (PEFT's ``lora_alpha``)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapters' input (PEFT's ``lora_dropout``); not switched off by
    ``model.disable_dropout``."""
    target_modules: list[str] | str = "all-linear"
    """Layer names that get adapters, or ``all-linear`` (every linear layer but the LM head,
    PEFT's shorthand). The LM head cannot take one: log-probs run it in chunks."""

    @model_validator(mode="after")
    def _no_head_adapter(self) -> LoraConfig:
        targets = (
            [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        )
        if "lm_head" in targets:
            raise ValueError(
                f"target_modules={self.target_modules!r}: lm_head cannot take an adapter "
                "(log-probs run the LM head in chunks); leave it out"
            )
        return self


class ModelConfig(_Section):
    name_or_path: str = "runs/tiny-model"
    """Local directory or hub id of the policy, loaded with ``from_pretrained``."""
    ref_name_or_path: str | None = None
    """Reference model for the KL term; defaults to the policy's starting weights."""
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")
    """Where the policy, reference, critic and reward models run: ``auto`` (CUDA when
    present, else CPU), ``cpu``, ``cuda`` (under torchrun: this process's local GPU) or
    ``cuda:N``. Every tensor of a step lives there."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the policy and reference model."""
    autocast: Literal["none", "bfloat16"] = "none"
    """Run the training step's forward passes (generation, old-policy, reference, policy,
    critic) under ``torch.autocast`` in this dtype. Weights, gradients, optimizer states,
    log-softmax, the losses and the backward passes stay in ``dtype``; matmuls run in
    bfloat16, about twice as fast on CPUs with avx512_bf16 or AMX and on recent GPUs, at
    bfloat16's precision (about 3 significant digits). Reward models and held-out
    evaluation are not affected."""
    disable_dropout: bool = True
    """Set every dropout probability of the policy and the reference to 0 (TRL's
    ``disable_dropout``): with dropout the training pass is another function than the
    sampler's and the reference's, so the KL is not 0 at step one and the ratio not 1."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (transformers'
    ``gradient_checkpointing_enable``, non-reentrant): same gradients, much less activation
    memory, about a third more compute. The training pass then runs prompts once per
    completion (checkpointed layers drop the KV cache ``optim.share_prompt`` relies on)."""
    fused_mlp: bool = True
    """Run SwiGLU MLPs (Llama, Qwen2/3, Mistral, ... see ``grpo.fused_mlp.SWIGLU_MLPS``) so
    that the training pass keeps ``gate(x)`` and ``up(x)`` for the backward pass and
    recomputes ``silu(gate(x)) * up(x)`` there: two ``[tokens, intermediate]`` tensors per
    layer less (one when ``down_proj`` carries a LoRA adapter or is frozen), the same
    maths and gradients. Other models are left as they are; false keeps transformers' own
    forward."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of every weight (off by default); see ``LoraConfig``.
    ``model.lora={}`` takes the defaults, ``model.lora.rank=8`` sets one field."""


class DataConfig(_Section):
    task: str | None = "add2"
    """Built-in task (see ``grpo.tasks``); ignored when ``train_file`` or ``dataset`` is set."""
    train_file: str | None = None
    """File of prompts, one row per prompt, extra columns go to rewards: JSONL (also
    ``.jsonl.gz``), JSON, CSV, Parquet, Arrow, or a ``save_to_disk`` directory."""
    dataset: str | None = None
    """A ``datasets`` hub id or a local dataset script or directory, loaded with
    ``datasets.load_dataset(dataset, config, split=split)``; instead of ``train_file``."""
    config: str | None = None
    """Configuration (subset) name of ``dataset``."""
    split: str = "train"
    """Split of ``dataset`` (or of a ``save_to_disk`` DatasetDict) to train on."""
    eval_file: str | None = None
    """Held-out prompts for ``run.eval_every``, scored with the run's reward functions;
    same formats as ``train_file``."""
    eval_split: str | None = None
    """Held-out split for ``run.eval_every``: of ``eval_file`` when that is a save_to_disk
    DatasetDict (default there: ``test``), else of ``dataset`` or ``train_file``'s directory."""
    prompt_column: str = "prompt"
    """Column holding the prompt: a string, or a list of chat messages (chat template applied)."""
    add_special_tokens: Literal["auto"] | bool = "auto"
    """Whether a prompt starts with the tokenizer's BOS. ``auto``: a string is encoded as
    ``tokenizer(text)`` does by default (BOS where the tokenizer adds one, e.g. Llama;
    never a trailing EOS) and chat messages as the chat template writes them; ``true``:
    BOS first even where the tokenizer adds none; ``false``: never a BOS (TRL encodes
    string prompts this way)."""
    num_train_prompts: int = Field(default=5000, ge=1)
    """How many prompts a built-in task generates for training."""
    num_eval_prompts: int = Field(default=200, ge=1)
    """How many held-out prompts a built-in task generates for evaluation."""


class RolloutConfig(_Section):
    engine: Literal["torch", "vllm"] = "torch"
    """Generation engine: ``torch`` (any transformers model) or ``vllm`` (GPU, optional extra)."""
    prompts_per_step: int = Field(default=8, ge=1)
    """B: prompts drawn per training step; the step samples B * num_generations completions."""
    num_generations: int = Field(default=8, ge=2)
    """G: completions per prompt (group size). GRPO needs at least 2 to form a baseline."""
    max_completion_length: int = Field(default=64, ge=1)
    """New tokens per completion at most; longer completions are truncated."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature; log-probs in the loss use the same temperature."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling threshold (1.0 disables it)."""
    top_k: int = Field(default=0, ge=0)
    """Top-k sampling (0 disables it)."""

    @field_validator("engine")
    @classmethod
    def _engine_available(cls, name: str) -> str:
        from grpo.rollout import ENGINES, engine_unavailable

        reason = engine_unavailable(name)
        if reason:
            usable = ", ".join(e for e in ENGINES if engine_unavailable(e) is None)
            raise ValueError(f"rollout engine {name!r} {reason}; usable here: {usable}")
        return name


class RewardsConfig(_Section):
    functions: list[str] = Field(default_factory=lambda: ["arithmetic_correct"])
    """Reward functions: registry names, ``path/file.py:function``, ``module:function``, or
    ``model:PATH`` for a learned outcome reward model (sequence classification)."""
    weights: list[float] | None = None
    """One weight per function (default: all 1)."""
    step_source: str = "verifier"
    """Step rewards for ``algorithm.advantage: process``: ``verifier`` (the built-in task's
    step verifier) or the path of a process reward model (token classification)."""
    step_separator: str = "\n"
    """Where one reasoning step ends and the next begins (process reward models)."""
    overlong_buffer: int = Field(default=0, ge=0)
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): completions longer than
    ``max_completion_length - overlong_buffer`` lose up to ``overlong_penalty``, linearly;
    0 disables it."""
    overlong_penalty: float = Field(default=1.0, ge=0)
    """Reward lost by a completion that reaches ``max_completion_length``."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Seconds one call of one reward function may take (on the whole batch) before the
    run stops with an error naming it; each call's time is logged as
    ``time/rewards/NAME``."""

    @model_validator(mode="after")
    def _weights_match(self) -> RewardsConfig:
        if not self.functions:
            raise ValueError("functions is empty: give at least one reward function")
        if self.weights is not None and len(self.weights) != len(self.functions):
            raise ValueError(
                f"weights has {len(self.weights)} entries but functions has "
                f"{len(self.functions)}: give one weight per function"
            )
        return self


class AlgorithmConfig(_Section):
    name: Literal["grpo", "rloo", "ppo"] = "grpo"
    """Estimator: GRPO (group baseline, KL in the loss), RLOO (leave-one-out baseline, no
    std, no clipping, KL in the reward; seed section VI), PPO (learned critic + GAE, KL in
    the reward; seed section I)."""
    advantage: Literal["outcome", "process"] = "outcome"
    """GRPO only: one reward per completion (eq. II.I) or per reasoning step (eq. V.I)."""
    beta: float = Field(default=0.04, ge=0)
    """KL weight (eq. IV.I). 0 loads no reference model at all."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator; k3 (Schulman) is unbiased and never negative."""
    use_bias_correction_kl: bool = False
    """GRPO: multiply the KL term by the importance ratio, not detached (TRL 1.16's default;
    DeepSeek-V3.2, arXiv 2512.02556): on-policy the value is the same and the gradient is
    the reverse KL's unbiased one (k2's). Off: the paper's plain k3."""
    epsilon: float = Field(default=0.2, ge=0)
    """Lower clip range of the ratio (PPO's epsilon)."""
    epsilon_high: float | None = Field(default=None, ge=0)
    """Upper clip range; defaults to ``epsilon``. DAPO's clip-higher uses 0.28."""
    num_iterations: int = Field(default=1, ge=1)
    """mu: optimisation passes over each rollout batch (DeepSeekMath's GRPO iterations)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: group std (paper), batch std (REINFORCE++), none (Dr. GRPO)."""
    advantage_eps: float = Field(default=1e-4, gt=0)
    """Added to the std before dividing, so zero-std groups give advantage 0."""
    loss_type: Literal["grpo", "token_mean", "dr_grpo"] = "grpo"
    """Aggregation: per-completion mean (paper), token mean (DAPO), constant budget (Dr. GRPO)."""
    ref_reset_every: int = Field(default=0, ge=0)
    """Reset the reference model to the policy every N steps (iterative RL); 0 never.
    Under ``model.lora`` the adapters are merged into the base weights and a fresh adapter
    (B = 0, fresh optimizer moments) starts, so the adapters-off reference is the policy."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """Ratio per token (PPO, GRPO) or one per completion, the mean token log-ratio
    exponentiated (GSPO, Zheng et al. 2025; use it with small epsilons, e.g. 3e-4/4e-4)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal (zero advantage)
    and sample more prompts until the batch is full again."""
    max_refills: int = Field(default=4, ge=0)
    """Extra generation rounds dynamic sampling may run per step before it trains on the
    informative groups it has."""
    gamma: float = Field(default=1.0, ge=0, le=1)
    """PPO: discount of GAE."""
    lam: float = Field(default=0.95, ge=0, le=1)
    """PPO: lambda of GAE."""
    value_clip: float | None = Field(default=0.2, ge=0)
    """PPO: clip range of the value loss around the old values (None: unclipped)."""
    critic_learning_rate: float | None = Field(default=None, gt=0)
    """PPO: AdamW learning rate of the critic (default: optim.learning_rate)."""

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class OptimConfig(_Section):
    learning_rate: float = Field(default=1e-6, gt=0)
    """Peak AdamW learning rate."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.99, ge=0, lt=1)
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Global gradient-norm clip; 0 disables it."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warmup."""
    warmup_steps: int = Field(default=0, ge=0)
    """Optimizer steps of linear warmup from 0."""
    max_steps: int = Field(default=100, ge=1)
    """Training steps (one rollout batch each)."""
    num_minibatches: int = Field(default=1, ge=1)
    """Optimizer steps per pass over a rollout batch; each mini-batch holds whole groups."""
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Micro-batches per mini-batch (memory only: the gradient is the same)."""
    max_nonfinite_steps: int = Field(default=3, ge=1)
    """Optimizer steps whose loss or gradient norm is not finite are skipped (weights,
    optimizer and schedule untouched; counted as ``nonfinite_skipped``); this many in a
    row stop the run with a checkpoint of the last good weights."""
    share_prompt: bool = True
    """Run each group's prompt once in the policy, old-policy, reference and critic passes
    and share its keys and values with the G completions (Prefix Grouper, arXiv 2506.05433):
    the same log-probs and gradients for ``B*P + N*T`` tokens instead of ``N*(P+T)``."""
    bucket_by_length: bool = True
    """Run completions of similar length together, each set trimmed to its longest, so
    little padding is computed (same numbers; split only where the saved positions pay
    for the extra forward calls)."""


class RunConfig(_Section):
    output_dir: str = "runs/grpo"
    """Where the log, checkpoints, plots and final model go."""
    seed: int = 0
    """Seeds data order, sampling and initialisation."""
    num_threads: int = Field(default=0, ge=0)
    """torch CPU threads; 0 keeps torch's default."""
    log_every: int = Field(default=1, ge=1)
    """Write metrics every N steps."""
    save_every: int = Field(default=0, ge=0)
    """Checkpoint every N steps (0: only by the clock, at the end, on a stop signal
    (SIGTERM, SIGHUP, SIGINT) and on an error)."""
    save_every_minutes: float = Field(default=10.0, ge=0)
    """Also checkpoint after a step when this many minutes have passed since the last
    checkpoint, so a run killed without warning (kill -9, power loss) loses minutes; 0
    disables the clock."""
    keep_last: int = Field(default=2, ge=1)
    """Checkpoints kept in ``OUTPUT_DIR/checkpoints``; older ones are deleted."""
    eval_every: int = Field(default=0, ge=0)
    """Evaluate held-out greedy accuracy every N steps (0: never during training): a built-in
    task's test problems, or ``data.eval_file`` / ``data.eval_split`` scored with the run's
    reward functions."""
    eval_prompts: int = Field(default=100, ge=1)
    """Held-out prompts used by the periodic evaluation."""
    progress: bool = True
    """Show a progress bar on the console."""
    release_freed_memory: bool = False
    """On a CPU device under glibc, give tensors of 1 MiB or more back to the OS when freed,
    except while decoding (``grpo.host_memory``), so that the backward pass cannot fragment
    malloc's heap: lower peak memory for slower training passes (LoRA on ``big-vocab``:
    update peak 2577 -> 1925 MiB; ``short``: 5.5 -> 7.0 s per step, every freed page
    faulted in again). Same numbers either way; no effect on CUDA."""


class LoggingConfig(_Section):
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    """Sinks on top of ``metrics.jsonl`` and the console: ``tensorboard`` (event files in
    ``OUTPUT_DIR/tensorboard``) and ``wandb``; each is imported only when chosen."""
    run_name: str | None = None
    """Name of the run in the report, TensorBoard and W&B (default: the output directory's)."""
    wandb_project: str = "grpo"
    """W&B project."""
    wandb_mode: Literal["offline", "online"] | None = None
    """W&B mode; by default ``WANDB_MODE`` from the environment, else ``offline`` (synced
    later with ``wandb sync``), so nothing leaves the machine unless asked for."""
    num_samples: int = Field(default=4, ge=0)
    """Completions per logged step written to ``OUTPUT_DIR/samples.jsonl`` (prompt,
    completion, each reward function's score, advantage), as TRL's ``log_completions``;
    the first ones of the step, so whole groups when it is a multiple of G. 0: none."""
    print_samples_every: int = Field(default=0, ge=0)
    """Print the logged samples as a table on the console every N steps (0: never)."""

    @field_validator("report_to")
    @classmethod
    def _sinks_installed(cls, sinks: list[str]) -> list[str]:
        import importlib.util

        for sink in sinks:  # found, not imported: each is imported only when used
            if importlib.util.find_spec(sink) is None:
                raise ValueError(f"{sink} is not installed: pip install 'grpo[{sink}]'")
        return sinks


class DistributedConfig(_Section):
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How ``torchrun``'s processes hold the policy: ``ddp`` (a full copy each, gradients
    all-reduced) or ``fsdp`` (FSDP2's ``fully_shard`` per decoder layer and at the root:
    weights, gradients and optimizer states split over the processes, for models that do
    not fit one device; the reference is sharded the same way). One process ignores it."""
    world_size: int | None = Field(default=None, ge=1)
    """Processes of the run, recorded by the trainer from torchrun's environment (in the
    saved ``config.yaml``). Left empty, any number works; set, a launch with another number
    stops before loading."""

    def check(self, world_size: int, cfg: Config) -> None:
        """Stop a launch whose process count cannot split the batch into whole groups."""
        if self.world_size is not None and self.world_size != world_size:
            raise ConfigError(
                f"distributed.world_size = {self.world_size}: the run was launched on "
                f"{world_size} processes; launch {self.world_size} or leave it empty"
            )
        b, mb = cfg.rollout.prompts_per_step, cfg.optim.num_minibatches
        if b % world_size or (b // world_size) % mb:
            raise ConfigError(
                f"rollout.prompts_per_step = {b}: expected a multiple of the {world_size} "
                f"processes times optim.num_minibatches = {mb}, so that every process holds "
                "whole groups in every mini-batch"
            )
        per_mini = b // world_size // mb * cfg.rollout.num_generations
        if per_mini % cfg.optim.gradient_accumulation_steps:
            raise ConfigError(
                f"optim.gradient_accumulation_steps = {cfg.optim.gradient_accumulation_steps} "
                f"does not divide the {per_mini} completions of a process's mini-batch"
            )
        if world_size > 1 and cfg.algorithm.name == "ppo":
            raise ConfigError(
                "algorithm.name = 'ppo': the critic trains on one process only; use grpo or "
                "rloo under torchrun, or launch one process"
            )


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _algorithm_options(self) -> Config:
        alg = self.algorithm
        if alg.advantage == "process" and alg.name != "grpo":
            raise ValueError(
                f"algorithm.advantage='process' needs algorithm.name='grpo', got {alg.name!r}"
            )
        if alg.use_bias_correction_kl and alg.name != "grpo":
            raise ValueError(
                f"algorithm.use_bias_correction_kl=true needs algorithm.name='grpo' (the KL in "
                f"the loss), got {alg.name!r}, which puts the KL in the reward"
            )
        if self.model.lora is not None and alg.name == "ppo":
            raise ValueError(
                "model.lora is set but algorithm.name='ppo': PPO's critic is a full model "
                "with its own optimizer and cannot train through LoRA yet; use grpo or rloo, "
                "or remove model.lora"
            )
        if self.rewards.overlong_buffer >= self.rollout.max_completion_length:
            raise ValueError(
                f"rewards.overlong_buffer={self.rewards.overlong_buffer} must be smaller than "
                f"rollout.max_completion_length={self.rollout.max_completion_length}"
            )
        return self

    @model_validator(mode="after")
    def _data_sources(self) -> Config:
        d = self.data
        if d.train_file and d.dataset:
            raise ValueError(
                f"data.train_file={d.train_file!r} and data.dataset={d.dataset!r}: give one"
            )
        if d.eval_split and not (d.dataset or d.train_file or d.eval_file):
            raise ValueError(
                f"data.eval_split={d.eval_split!r} needs a dataset to split: data.dataset, or "
                "a save_to_disk directory in data.train_file or data.eval_file"
            )
        own_data = d.train_file or d.dataset
        if self.run.eval_every and own_data and not (d.eval_file or d.eval_split):
            raise ValueError(
                f"run.eval_every={self.run.eval_every} with your own training data needs "
                "held-out prompts: set data.eval_file or data.eval_split (or run.eval_every=0)"
            )
        return self

    @model_validator(mode="after")
    def _whole_groups(self) -> Config:
        b, mb, gas = (
            self.rollout.prompts_per_step,
            self.optim.num_minibatches,
            self.optim.gradient_accumulation_steps,
        )
        if b % mb:
            raise ValueError(
                f"optim.num_minibatches={mb} does not divide rollout.prompts_per_step={b}: "
                "each mini-batch must hold whole groups"
            )
        per_mini = b * self.rollout.num_generations // mb
        if per_mini % gas:
            raise ValueError(
                f"optim.gradient_accumulation_steps={gas} does not divide the {per_mini} "
                "completions of a mini-batch"
            )
        return self

    @property
    def completions_per_step(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.num_generations


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key (value {e['input']!r}); check the spelling")
        elif e["type"] == "model_type" or not e["loc"]:
            lines.append(f"{where}: {e['msg']}")
        else:
            lines.append(f"{where} = {e['input']!r}: {e['msg']}")
    return "invalid config: " + "; ".join(lines)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["algorithm.beta=0", "run.seed=3"]`` -> a nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. algorithm.beta=0.04")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: {raw!r} is not a YAML value ({err})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    """Validate a nested dict (plus ``key=value`` overrides) into a Config, or raise ConfigError."""
    tree = _merge(data or {}, parse_overrides(overrides or []))
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file (or none: all defaults) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(f"config file {str(path)!r} {what}")
        data = _read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {str(path)!r}: expected a mapping of sections at the top"
            )
    return build_config(data, overrides)


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a syntax error is a ConfigError naming file:line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {str(path)!r}: byte {err.start} is not UTF-8 ({err.reason})"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {where}: YAML syntax error: {problem}") from None


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
