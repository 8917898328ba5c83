"""cai's PPO (Schulman et al. 2017) for RL-CAI (Bai et al. 2022, section 4.1), on the
transformers Trainer's machinery (optimizer, scheduler, checkpoints, callbacks, accelerate).

TRL dropped its PPO in 1.13 (`trl.experimental.ppo`, "unmaintained"); the engines that kept
PPO (OpenRLHF `ppo_utils/experience_maker.py` + `models/loss.py`, verl
`trainer/ppo/core_algos.py`, TRL 1.12 `ppo_trainer.py`) share one shape, which this file
follows. One update:

1. **Rollouts.** A batch of prompts, rendered with the chat template, is answered by the
   policy through cai's generation engine (`TransformersEngine.generate_tokens`: batched
   by length, the shared prefix cached once), pure sampling at `temperature` (no top-k, no
   top-p: the log-probs below must be of the distribution the tokens were drawn from).
   Each answer is cut after its first EOS; the EOS is part of the answer.
2. **Scoring, no gradient.** Prompts are left-padded, answers right-padded, and
   `position_ids` come from the attention mask, so a padded row's positions are those of
   the unpadded row. The policy's and the reference's log-probs of each answer token are
   taken at the same temperature; the value model gives V(s_t) for the state before
   each answer token; the reward (a reward model, the judge, any `reward(prompts,
   completions, completion_ids=...)` callable) scores each finished answer once.
3. **Rewards.** Per token, r_t = −kl_coef · KL_t, with KL_t = log π(a_t) − log π_ref(a_t)
   (`k1`) or (ρ − 1) − log ρ, ρ = π_ref / π (`k3`, lower variance); the score is added at
   the answer's last real token. An answer with no EOS can lose `missing_eos_penalty`.
4. **Advantages.** Masked GAE: δ_t = r_t + γ V(s_{t+1}) − V(s_t), A_t = δ_t + γλ A_{t+1},
   with V = 0 after the last token (the episode ends there; TRL 1.12 bootstrapped from the
   state after EOS, `padding_mask_p1`). Returns R_t = A_t + V(s_t); advantages are whitened
   over the batch's real tokens.
5. **Optimisation.** `num_ppo_epochs` passes over the batch in `num_mini_batches`
   shuffled minibatches (each `gradient_accumulation_steps` micro-batches of
   `per_device_train_batch_size`): the clipped surrogate
   max(−A·ρ, −A·clip(ρ, 1 ± cliprange)), ρ = π_new / π_old, plus `vf_coef` × the clipped
   value loss ½·max((V − R)², (clip(V, V_old ± cliprange_value) − R)²), gradients clipped
   at `max_grad_norm`.

Models. Full fine-tuning trains a policy and a value model (a reward-model-shaped
backbone with a scalar head, initialised from the reward model) and keeps a frozen
reference copy: four models, two of them with Adam states. With a LoRA policy
(`peft_config`) the three share one frozen base (Hydra-PPO, Santacroce et al. 2023): the
policy is the `default` adapter, the value model a second adapter (`value`) with a scalar
head, and the reference is the base with the adapters disabled.

Logs (one entry per update) keep TRL 1.12's names: `objective/scores` (mean reward),
`objective/kl` (KL summed over the answer, mean over answers), `objective/entropy`
(−log π of the sampled answer, summed), `objective/non_score_reward`,
`objective/rlhf_reward`, `policy/approxkl_avg`, `policy/clipfrac_avg`,
`policy/entropy_avg` (per token), `loss/policy_avg`, `loss/value_avg`, `val/clipfrac_avg`,
`val/ratio`, `val/num_eos_tokens`, plus `val/explained_variance` and
`completions/mean_length` (tokens up to and including the EOS, as RLOO/GRPO count).

Resume: a checkpoint holds every trained tensor (`model.safetensors`), the optimizer, the
scheduler, the random states and trainer_state.json (written last: it marks a checkpoint
complete). The prompts of update u are a function of (seed, u), and each rollout draws
from a generator seeded by (seed, u, process), so a resumed run trains the updates an
uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

# ---------------------------------------------------------------- the maths, on tensors


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true (over `dim`, or over everything)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance), 0 elsewhere; with
    `shift_mean=False` the mean is added back (rewards keep their sign)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = masked_mean((values - mean) ** 2, mask) * (count / (count - 1).clamp(min=1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"]) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the sampled token's log-probs
    (Schulman, "Approximating KL divergence"): k1 = log π − log π_ref (unbiased, can be
    negative per token); k3 = (ρ − 1) − log ρ with ρ = π_ref / π (unbiased, never negative)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    return log_ratio.exp() - 1 - log_ratio


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over answer tokens ([batch, tokens]; `mask` marks
    the real ones). Past the last real token the state is terminal: its value is 0, and
    nothing after it flows back. Returns (advantages, returns = advantages + values), both
    0 past the answer."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        following = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss: mean over real tokens of
    max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), ρ = exp(log π_new − log π_old). Also the share of
    tokens where the clip decided (clip fraction) and ½·mean((log ρ)²) (approximate KL)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return loss, clipfrac, approxkl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """½·mean over real tokens of max((V − R)², (clip(V, V_old ± ε_v) − R)²), and the share
    of tokens where the clipped term was the larger."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over real tokens: 1 is a perfect critic, ≤ 0 one no better than a constant."""
    mean = masked_mean(returns, mask)
    variance = masked_mean((returns - mean) ** 2, mask)
    residual = returns - values
    residual_variance = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1 - residual_variance / variance) if variance > 0 else float("nan")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position, without materialising the whole log-softmax twice."""
    return torch.gather(logits.log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- the config


def _help(text: str, default: Any = None, **extra) -> Any:
    return field(default=default, metadata={"help": text, **extra})


@dataclass
class PPOConfig(TrainingArguments):
    """cai's PPO settings (the `rl:` section with `algorithm: ppo`), beside the
    TrainingArguments every trainer takes (learning_rate, per_device_train_batch_size,
    gradient_accumulation_steps, save_steps, ...). Names and defaults are TRL 1.12's
    `PPOConfig`'s, so configs written for it keep their meaning.

    Batches, per process: a rollout is `per_device_train_batch_size` ×
    `gradient_accumulation_steps` prompts, optimised in `num_mini_batches` minibatches, each
    in micro-batches of `per_device_train_batch_size`. Updates = ceil(total_episodes /
    (rollout × processes)).
    """

    learning_rate: float = _help("The initial learning rate for AdamW (TRL 1.12's PPO default).", 3e-6)
    total_episodes: int | None = _help("Answers sampled over the whole run (null = num_train_epochs x prompts).")
    num_ppo_epochs: int = _help("Passes over each rollout batch.", 4)
    num_mini_batches: int = _help("Minibatches per rollout batch (one optimizer step each, per epoch).", 1)
    local_rollout_forward_batch_size: int = _help("Rows per no-grad forward pass while scoring a rollout.", 64)
    response_length: int = _help("Most answer tokens (cai's rl.max_new_tokens sets it).", 53)
    temperature: float = _help("Sampling temperature of the rollouts; log-probs are taken at the same one.", 0.7)
    missing_eos_penalty: float | None = _help("Subtracted from the score of an answer with no EOS (null = none).")
    kl_coef: float = _help("Weight of the per-token KL to the reference in the reward.", 0.05)
    kl_estimator: Literal["k1", "k3"] = _help("KL estimator: k1 (log-ratio, unbiased) or k3 (lower variance).", "k1")
    whiten_rewards: bool = _help("Whiten the per-token rewards over the batch before GAE.", False)
    cliprange: float = _help("PPO's clip range of the probability ratio.", 0.2)
    vf_coef: float = _help("Weight of the value loss.", 0.1)
    cliprange_value: float = _help("Clip range of the value prediction around the rollout's.", 0.2)
    gamma: float = _help("Discount factor.", 1.0)
    lam: float = _help("GAE's lambda.", 0.95)

    def __post_init__(self):
        super().__post_init__()
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}")


# Keys TRL 1.12's PPOConfig had that cai's does not: what to write instead.
REMOVED_KEYS = {
    "stop_token": "cai's PPO always ends an answer at the tokenizer's EOS; remove the key",
    "stop_token_id": "cai's PPO always ends an answer at the tokenizer's EOS; remove the key",
    "num_sample_generations": "cai's PPO logs no sample generations (evaluate does); remove the key",
    "sft_model_path": "the policy is rl.policy (null = the newest policy); remove the key",
    "reward_model_path": "the reward model is rl.reward_model; remove the key",
    "model_adapter_name": "with use_peft the policy adapter is cai's own ('default'); remove the key",
    "ref_adapter_name": "with use_peft the reference is the base with the adapters disabled; remove the key",
    "ds3_gather_for_generation": "cai's PPO runs on one process or under DDP (no DeepSpeed); remove the key",
    "dataset_num_proc": "cai tokenises the prompts itself; remove the key",
    **dict.fromkeys(("world_size", "num_total_batches", "micro_batch_size", "local_batch_size", "batch_size",
                     "local_mini_batch_size", "mini_batch_size"),
                    "derived from per_device_train_batch_size, gradient_accumulation_steps and the number of "
                    "processes, not set; remove the key"),
}


# ---------------------------------------------------------------- the models


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio compares two passes over the same tokens: dropout would make them differ."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def backbone(model: nn.Module) -> nn.Module:
    """The decoder under a causal-LM or sequence-classification head."""
    return getattr(model, model.base_model_prefix)


class PolicyAndValue(nn.Module):
    """The two trained parts behind one `forward` (so DDP sees one module): the policy's
    logits over the answer and the value of each answer state.

    Full fine-tuning: `value_model` is a sequence-classification model (its backbone and
    its `score` head). LoRA (`shared=True`): `policy` is a PeftModel holding two adapters,
    `default` (the policy) and `value`, and `value_head` is the scalar head; the value
    pass runs the same base with the `value` adapter."""

    def __init__(self, policy, value_model=None, value_head: nn.Linear | None = None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.value_head = value_head
        self.shared = value_model is None

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """`activation_checkpointing: true`: recompute the activations of the policy (and of
        a separate value model) in backward.

        With the shared base, the policy pass and the value pass run the same layers under
        different adapters, and backward recomputes a layer's forward after `forward` has
        switched back to `default`: each recompute runs under the adapter its forward ran
        under (torch's non-reentrant checkpoint's `context_fn`), else the value pass's
        gradients would come from the policy adapter's activations."""
        kwargs = dict(activation_checkpointing_kwargs or {"use_reentrant": False})
        if self.shared:
            if kwargs.get("use_reentrant", False):
                raise ValueError("PPO with a LoRA policy recomputes activations with use_reentrant=False only "
                                 "(the two adapters share the layers)")
            kwargs["use_reentrant"] = False
            kwargs["context_fn"] = self._recompute_under_forward_adapter
        for model in (self.policy, self.value_model):
            if model is not None:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                                      every_n_layers=every_n_layers, offload=offload)

    def _recompute_under_forward_adapter(self):
        adapter = self.policy.active_adapter
        return contextlib.nullcontext(), self._using(adapter)

    @contextlib.contextmanager
    def _using(self, adapter: str):
        previous = self.policy.active_adapter
        if previous == adapter:
            yield
            return
        self._adapter(adapter)
        try:
            yield
        finally:
            self._adapter(previous)

    def _adapter(self, name: str) -> None:
        # peft's set_adapter freezes the other adapters; both are trained here, and the
        # autograd graph keeps each pass's own adapter.
        self.policy.set_adapter(name)
        for parameter_name, parameter in self.policy.named_parameters():
            if ".default." in parameter_name or ".value." in parameter_name:
                parameter.requires_grad_(True)

    def forward(self, input_ids, attention_mask, position_ids, answer_start: int):
        """Logits predicting each answer token ([rows, answer, vocabulary]) and V(s_t)
        of the state before it ([rows, answer]). Answer tokens start at `answer_start`."""
        keep = input_ids.shape[1] - answer_start + 1  # logits from the last prompt position on
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             logits_to_keep=keep, use_cache=False).logits[:, :-1]
        if self.shared:
            self._adapter("value")
            try:
                decoder = backbone(self.policy.get_base_model())
                hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
            finally:
                self._adapter("default")
            head = self.value_head
        else:
            hidden = backbone(self.value_model)(input_ids=input_ids, attention_mask=attention_mask,
                                                position_ids=position_ids, use_cache=False).last_hidden_state
            head = self.value_model.score
        values = head(hidden[:, answer_start - 1:-1]).squeeze(-1).float()
        return logits, values

    def reference_logits(self, reference, input_ids, attention_mask, position_ids, answer_start: int):
        keep = input_ids.shape[1] - answer_start + 1
        context = self.policy.disable_adapter() if self.shared else contextlib.nullcontext()
        model = self.policy if self.shared else reference
        with context:
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         logits_to_keep=keep, use_cache=False).logits[:, :-1]


def lora_policy_and_value(policy, peft_config, reward_model=None) -> PolicyAndValue:
    """Hydra-PPO: the policy's base carries the `default` (policy) and `value` adapters; the
    value head starts from the reward model's head when their sizes match (a warm critic),
    else at zero."""
    import copy

    from peft import get_peft_model

    model = get_peft_model(policy, peft_config)
    value_config = copy.deepcopy(peft_config)
    model.add_adapter("value", value_config)
    hidden = policy.config.get_text_config().hidden_size
    head = nn.Linear(hidden, 1, bias=False)
    source = getattr(reward_model, "score", None) if reward_model is not None else None
    with torch.no_grad():
        if source is not None and tuple(source.weight.shape) == (1, hidden):
            head.weight.copy_(source.weight.float())
        else:
            head.weight.zero_()
    head.to(device=next(policy.parameters()).device)
    wrapper = PolicyAndValue(model, value_head=head)
    wrapper._adapter("default")
    return wrapper


# ---------------------------------------------------------------- the trainer


@dataclass
class Rollout:
    """One batch of sampled answers and what PPO needs of them, all [rows, answer tokens]
    except `scores` [rows]."""

    input_ids: torch.Tensor  # [left-padded prompt][right-padded answer]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    answer_start: int
    answers: torch.Tensor
    mask: torch.Tensor  # real answer tokens
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    finished: torch.Tensor  # the answer has an EOS


class PPOTrainer(Trainer):
    """PPO as described in the module docstring. `reward` is a TRL-style reward function
    `reward(prompts=conversations, completions=[[assistant message]], completion_ids=ids)`
    returning one float per answer."""

    def __init__(self, args: PPOConfig, policy, processing_class, prompts: list[list[dict]], reward,
                 reference=None, value_model=None, peft_config=None, reward_model_for_value_head=None,
                 callbacks=None):
        if peft_config is None and (reference is None or value_model is None):
            raise ValueError("PPO with full fine-tuning needs a reference model and a value model")
        for model in (policy, reference, value_model):
            if model is not None:
                disable_dropout(model)
        if peft_config is not None:
            wrapper = lora_policy_and_value(policy, peft_config, reward_model_for_value_head)
            disable_dropout(wrapper)  # LoRA's own dropout
        else:
            wrapper = PolicyAndValue(policy, value_model=value_model)
        super().__init__(model=wrapper, args=args, processing_class=processing_class, callbacks=callbacks)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("cai's PPO runs on one process or under DDP; for DeepSpeed or FSDP use rl.algorithm "
                             "rloo or grpo")
        self.reference = reference.to(self.args.device).eval() if reference is not None else None
        if self.reference is not None:
            self.reference.requires_grad_(False)
        self.prompts = prompts
        self.reward = reward
        self.prompt_ids = [self._render(p) for p in prompts]
        self.world = self.accelerator.num_processes
        args = self.args
        self.local_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        if self.local_batch % args.num_mini_batches:
            raise ValueError(f"PPO: per_device_train_batch_size x gradient_accumulation_steps ({self.local_batch}) "
                             f"must be divisible by num_mini_batches ({args.num_mini_batches})")
        self.batch = self.local_batch * self.world
        episodes = args.total_episodes or int(args.num_train_epochs * len(prompts))
        self.num_updates = max(1, math.ceil(episodes / self.batch))
        self._engine = None
        self.work = None  # the stage's cai.work.Work (`count_work`)

    def count_work(self, work) -> None:
        """Count this trainer's work into the stage's `work` (cai.work): the rollouts'
        generation (the engine), their policy, value and reference forwards, and the
        optimisation's forward and backward passes, real tokens against positions."""
        from cai.work import matmul_parameters, training_flop_per_token

        self.work = work
        wrapper = self.accelerator.unwrap_model(self.model)
        self._forward_flop = 2 * matmul_parameters(wrapper)
        self._reference_flop = 2 * matmul_parameters(self.reference if self.reference is not None else wrapper.policy)
        self._train_flop = training_flop_per_token(wrapper, bool(self.args.activation_checkpointing))

    # ------------------------------------------------------------ data

    def _render(self, conversation: list[dict]) -> list[int]:
        text = self.processing_class.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return self.processing_class(text, add_special_tokens=False)["input_ids"]

    def prompts_of_update(self, update: int) -> list[int]:
        """Indices of this process's prompts for update `update` (0-based): the run's
        prompts in a fresh seeded order each epoch, read as one stream, a global batch per
        update, this process's slice of it."""
        count = len(self.prompts)
        start = update * self.batch + self.args.process_index * self.local_batch
        orders: dict[int, list[int]] = {}
        chosen = []
        for position in range(start, start + self.local_batch):
            epoch, index = divmod(position, count)
            if epoch not in orders:
                generator = torch.Generator().manual_seed(self.args.seed * 7919 + epoch)
                orders[epoch] = torch.randperm(count, generator=generator).tolist()
            chosen.append(orders[epoch][index])
        return chosen

    def engine(self):
        """cai's generation engine over the policy (the `default` adapter with LoRA)."""
        from cai.engines.hf import TransformersEngine

        if self._engine is None:
            policy = self.accelerator.unwrap_model(self.model).policy
            self._engine = TransformersEngine(policy, self.processing_class,
                                              batch_size=self.args.local_rollout_forward_batch_size)
            self._engine.work = self.work
        return self._engine

    # ------------------------------------------------------------ one rollout

    def _tensors(self, prompts: list[list[int]], answers: list[list[int]]):
        pad = self.processing_class.pad_token_id
        prompt_width, answer_width = max(map(len, prompts)), max(1, max(map(len, answers)))
        rows = len(prompts)
        input_ids = torch.full((rows, prompt_width + answer_width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            input_ids[i, prompt_width - len(prompt):prompt_width] = torch.tensor(prompt)
            attention[i, prompt_width - len(prompt):prompt_width] = 1
            if answer:
                input_ids[i, prompt_width:prompt_width + len(answer)] = torch.tensor(answer)
                attention[i, prompt_width:prompt_width + len(answer)] = 1
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        device = self.args.device
        return input_ids.to(device), attention.to(device), positions.to(device), prompt_width

    @torch.no_grad()
    def rollout(self, update: int) -> Rollout:
        from cai.engines.base import Sampling

        args = self.args
        indices = self.prompts_of_update(update)
        prompt_ids = [self.prompt_ids[i] for i in indices]
        engine = self.engine()
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        sampling = Sampling(max_new_tokens=args.response_length, temperature=args.temperature, top_p=1.0, top_k=0)
        seed = (args.seed * 1_000_003 + update * 7_919 + args.process_index * 104_729) % 2**31
        rows = engine.generate_tokens(prompt_ids, sampling, seed)
        answers, finished = [], []
        for row in rows:
            length, stopped = engine.answer_length(row)
            answers.append(row[:length + 1] if stopped else row[:length])  # the EOS is the last action
            finished.append(stopped)
        input_ids, attention, positions, start = self._tensors(prompt_ids, answers)
        width = input_ids.shape[1] - start
        lengths = torch.tensor([len(a) for a in answers], device=input_ids.device)
        mask = torch.arange(width, device=input_ids.device)[None, :] < lengths[:, None]
        answer_ids = input_ids[:, start:]
        logprobs, ref_logprobs, values = [], [], []
        step = args.local_rollout_forward_batch_size
        temperature = args.temperature
        for i in range(0, len(answers), step):
            part = slice(i, i + step)
            with self.autocast_smart_context_manager():
                logits, value = model(input_ids[part], attention[part], positions[part], start)
                ref_logits = model.reference_logits(self.reference, input_ids[part], attention[part],
                                                    positions[part], start)
            logprobs.append(token_logprobs(logits.float() / temperature, answer_ids[part]))
            ref_logprobs.append(token_logprobs(ref_logits.float() / temperature, answer_ids[part]))
            values.append(value)
            del logits, ref_logits
        if self.work is not None:
            tokens, computed = int(attention.sum()), attention.numel()
            self.work.add("rollout forward", tokens, computed, self._forward_flop)
            self.work.add("reference", tokens, computed, self._reference_flop)
        tokenizer = self.processing_class
        conversations = [self.prompts[i] for i in indices]
        completions = [[{"role": "assistant",
                         "content": tokenizer.decode(a[:-1] if f else a, skip_special_tokens=True).strip()}]
                       for a, f in zip(answers, finished)]
        scores = torch.tensor(self.reward(prompts=conversations, completions=completions, completion_ids=answers),
                              dtype=torch.float32, device=input_ids.device)
        finished_t = torch.tensor(finished, device=input_ids.device)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~finished_t).float()
        model.train()
        return Rollout(input_ids, attention, positions, start, answer_ids, mask, torch.cat(logprobs),
                       torch.cat(ref_logprobs), torch.cat(values), scores, finished_t)

    # ------------------------------------------------------------ one update

    def advantages(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        args, mask = self.args, rollout.mask
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, args.kl_estimator) * mask
        non_score = -args.kl_coef * kl
        rewards = non_score.clone()
        last = (mask.sum(1) - 1).clamp(min=0)
        rewards[torch.arange(len(last), device=last.device), last] += rollout.scores
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, rollout.values, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask)
        return {"kl": kl, "non_score": non_score, "advantages": advantages, "returns": returns}

    def optimise(self, rollout: Rollout, targets: dict, update: int) -> dict[str, float]:
        args, model = self.args, self.model
        rows = rollout.input_ids.shape[0]
        minibatch = rows // args.num_mini_batches
        micro = args.per_device_train_batch_size
        stats: dict[str, list[float]] = {k: [] for k in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac",
                                                        "entropy", "ratio")}
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + update)
        parameters = [p for p in model.parameters() if p.requires_grad]
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(rows, generator=generator).to(rollout.input_ids.device)
            for begin in range(0, rows, minibatch):
                chosen = order[begin:begin + minibatch]
                pieces = [chosen[j:j + micro] for j in range(0, len(chosen), micro)]
                for k, part in enumerate(pieces):
                    sync = k == len(pieces) - 1
                    context = contextlib.nullcontext() if sync else self.accelerator.no_sync(model)
                    with context, self.autocast_smart_context_manager():
                        logits, values = model(rollout.input_ids[part], rollout.attention_mask[part],
                                               rollout.position_ids[part], rollout.answer_start)
                        logits = logits.float() / args.temperature
                        logprobs = token_logprobs(logits, rollout.answers[part])
                        mask = rollout.mask[part]
                        pg_loss, clipfrac, approxkl = policy_loss(logprobs, rollout.logprobs[part],
                                                                  targets["advantages"][part], mask, args.cliprange)
                        vf_loss, vf_clipfrac = value_loss(values, rollout.values[part], targets["returns"][part],
                                                          mask, args.cliprange_value)
                        loss = (pg_loss + args.vf_coef * vf_loss) * len(part) / len(chosen)
                        self.accelerator.backward(loss)
                    if self.work is not None:
                        self.work.add("train", int(rollout.attention_mask[part].sum()),
                                      rollout.attention_mask[part].numel(), self._train_flop)
                    with torch.no_grad():
                        probs = logits.softmax(-1)
                        entropy = masked_mean(torch.logsumexp(logits, -1) - (probs * logits).sum(-1), mask)
                        ratio = masked_mean((logprobs - rollout.logprobs[part]).exp(), mask)
                    for key, value in (("approxkl", approxkl), ("clipfrac", clipfrac), ("pg_loss", pg_loss),
                                       ("vf_loss", vf_loss), ("vf_clipfrac", vf_clipfrac), ("entropy", entropy),
                                       ("ratio", ratio)):
                        stats[key].append(float(value.detach()))
                    del logits, probs, values, logprobs, loss
                if args.max_grad_norm and args.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return {key: sum(values) / len(values) for key, values in stats.items()}

    def metrics(self, rollout: Rollout, targets: dict, stats: dict[str, float]) -> dict[str, float]:
        mask = rollout.mask
        gather = self.accelerator.gather_for_metrics

        def mean(tensor: torch.Tensor) -> float:
            return gather(tensor.reshape(1).float()).mean().item()

        kl = targets["kl"].sum(1).mean()
        non_score = targets["non_score"].sum(1).mean()
        ratios = torch.tensor([stats["ratio"]], device=mask.device)
        metrics = {
            "objective/kl": mean(kl),
            "objective/entropy": mean(((-rollout.logprobs) * mask).sum(1).mean()),
            "objective/non_score_reward": mean(non_score),
            "objective/rlhf_reward": mean(non_score + rollout.scores.mean()),
            "objective/scores": mean(rollout.scores.mean()),
            "policy/approxkl_avg": mean(torch.tensor(stats["approxkl"], device=mask.device)),
            "policy/clipfrac_avg": mean(torch.tensor(stats["clipfrac"], device=mask.device)),
            "loss/policy_avg": mean(torch.tensor(stats["pg_loss"], device=mask.device)),
            "loss/value_avg": mean(torch.tensor(stats["vf_loss"], device=mask.device)),
            "val/clipfrac_avg": mean(torch.tensor(stats["vf_clipfrac"], device=mask.device)),
            "policy/entropy_avg": mean(torch.tensor(stats["entropy"], device=mask.device)),
            "val/ratio": mean(ratios),
            "val/num_eos_tokens": gather(rollout.finished.sum().reshape(1)).sum().item(),
            "completions/mean_length": mean(mask.sum(1).float().mean()),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "episode": self.state.global_step * self.batch,
        }
        explained = explained_variance(rollout.values, targets["returns"], mask)
        if math.isfinite(explained):  # undefined when every return is the same
            metrics["val/explained_variance"] = explained
        return metrics

    # ------------------------------------------------------------ the loop

    def train(self, resume_from_checkpoint: str | None = None, **_):
        from transformers.trainer_utils import TrainOutput

        started = time.time()
        self.create_optimizer_and_scheduler(num_training_steps=self.num_updates)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model_wrapped = self.model
        self.state.max_steps = self.num_updates
        self.state.logging_steps, self.state.save_steps = self.args.logging_steps, self.args.save_steps
        self.state.num_train_epochs = self.num_updates * self.batch / len(self.prompts)
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        if self.args.activation_checkpointing:  # Trainer.train, which this loop replaces, is where it is set
            kwargs = dict(self.args.activation_checkpointing_kwargs or {})
            every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
            self.accelerator.unwrap_model(self.model).activation_checkpointing_enable(
                activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload)
        self.model.train()
        for update in range(self.state.global_step, self.num_updates):
            self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)
            rollout = self.rollout(update)
            targets = self.advantages(rollout)
            stats = self.optimise(rollout, targets, update)
            self.state.global_step = update + 1
            self.state.epoch = self.state.global_step * self.batch / len(self.prompts)
            metrics = self.metrics(rollout, targets, stats)
            self.lr_scheduler.step()
            self.log(metrics)
            self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)
            if self.control.should_save:
                self._save_checkpoint(self.model, trial=None)
                self.control = self.callback_handler.on_save(self.args, self.state, self.control)
            del rollout, targets
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        losses = [entry["loss/policy_avg"] for entry in self.state.log_history if "loss/policy_avg" in entry]
        return TrainOutput(self.state.global_step, sum(losses) / len(losses) if losses else 0.0,
                           {"train_runtime": time.time() - started})

    # ------------------------------------------------------------ saving and resuming

    def _trained_tensors(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """A checkpoint (`_internal_call`) keeps every trained tensor, the value model's
        too; the final save is the policy alone (with LoRA, its `default` adapter)."""
        from pathlib import Path

        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if _internal_call:
            save_file(self._trained_tensors(), str(Path(output_dir) / "model.safetensors"))
            return
        policy = self.accelerator.unwrap_model(self.model).policy
        if self.accelerator.unwrap_model(self.model).shared:
            policy.save_pretrained(output_dir, selected_adapters=["default"])
        else:
            policy.save_pretrained(output_dir)

    def _resume(self, checkpoint: str) -> None:
        from pathlib import Path

        from safetensors.torch import load_file
        from transformers.trainer_callback import TrainerState

        folder = Path(checkpoint)
        model = self.accelerator.unwrap_model(self.model)
        saved = load_file(str(folder / "model.safetensors"))
        wanted = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(saved) != wanted:
            raise RuntimeError(f"{folder}: its model.safetensors does not match this PPO model (another policy or "
                               "LoRA setting?); remove the checkpoints folder to start over")
        with torch.no_grad():
            parameters = dict(model.named_parameters())
            for name, tensor in saved.items():
                parameters[name].copy_(tensor.to(parameters[name].device))
        self._load_optimizer_and_scheduler(checkpoint)
        state = TrainerState.load_from_json(str(folder / "trainer_state.json"))
        self.state.global_step, self.state.epoch = state.global_step, state.epoch
        self.state.log_history = list(state.log_history)
        self._load_rng_state(checkpoint)
