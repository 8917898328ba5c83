"""RL-CAI: reinforcement learning from AI feedback (Bai et al. 2022, section 4.1).

The SFT model is the initial policy and the reference; the preference model trained on
the AI's soft labels is the reward. The policy answers training prompts, the reward
model scores each answer, and the policy is updated to raise the score while a KL
penalty keeps it near the reference. The paper trains on the red-team prompts mixed
with helpful ones (so the policy does not learn that refusing everything pays), and
uses PPO; RLOO and GRPO are cheaper alternatives (no value model: the baseline is the
other samples for the same prompt).

- `ppo`: `trl.experimental.ppo.PPOTrainer` (TRL 1.12, the last release with PPO). A
  value model, initialised from the reward model, is trained alongside the policy.
  PPO reads pre-tokenised prompts and scores token ids directly, so the policy and the
  reward model must share a tokenizer. Updates = total_episodes / batch.
- `rloo`, `grpo`: `trl.RLOOTrainer` / `trl.GRPOTrainer` with the reward model passed as
  the reward function (TRL renders prompt + answer with the reward model's own tokenizer
  and reads its score). A batch counts completions: `num_generations` per prompt.

Direct RLAIF (`reward: judge`, rloo and grpo; Lee et al. 2023, "RLAIF vs. RLHF", reported
better than training a reward model on AI labels): no reward model at all. The feedback
model (`feedback_model`, any engine: in-process weights or `server:NAME`) reads each
sampled answer with a principle drawn from the constitution and is asked whether the
answer is what the principle would choose; P(Yes), both option orders averaged, is the
reward, in [0, 1] (`cai.judge.judge.Judge.score_single`). When to choose it: it needs no
label or reward stage, and every on-policy answer gets a fresh label, so the policy
cannot drift out of the reward model's training distribution and exploit it; the price
is one judge pass (two questions per principle) per sampled answer per step, and an
in-process judge is a second model in memory. It is only as good as the judge: a 135M
judge is close to chance (`cai eval-labeler`), so with the demo model the reward is
mostly noise; a strong judge behind a server is where it pays. A reward in [0, 1]
moves less than a reward model's logits: RLOO subtracts kl_coef x the summed KL from it,
so a smaller kl_coef may be needed (GRPO scales advantages by the group's std).

`kl_coef` and `max_new_tokens` are cai names for the knobs the three TRL configs spell
differently (PPO: `kl_coef`, `response_length`; RLOO/GRPO: `beta`, `max_completion_length`);
the TRL key itself, if also set, wins. The penalty's unit follows TRL: PPO and RLOO
subtract kl_coef x (KL summed over the answer) from the reward, GRPO adds beta x (KL per
token) to its loss. Every other key of the `rl:` section goes to the algorithm's TRL config.

Logs (`rl/log_history.json`, one entry per optimisation step), by algorithm:

- reward (the reward model's score, mean over the batch): ppo `objective/scores`
  (`objective/rlhf_reward` is the score minus the KL penalty); rloo, grpo `reward`
  (and `reward_std`), also under the reward function's name: `rewards/model/mean` for
  the reward model, `rewards/judge/mean` for the judge's P(good).
- KL to the reference: ppo `objective/kl` (summed over the answer's tokens); rloo, grpo
  `kl` (mean per token; logged only when `beta` > 0).
- answer length in tokens: `completions/mean_length` for all three (for PPO cai counts
  it from the rollouts: TRL 1.12's PPO logs none).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from cai.judge.settings import JUDGE_FIELDS, JudgeSettings, judge_problems
from cai.schema import setting
from cai.yamlio import Problem

# algorithm -> (module, TRL config class)
ALGORITHMS = {
    "ppo": ("trl.experimental.ppo", "PPOConfig"),
    "rloo": ("trl", "RLOOConfig"),
    "grpo": ("trl", "GRPOConfig"),
}
# cai knob -> the TRL field it sets, per algorithm
KNOBS = {
    "max_new_tokens": {"ppo": "response_length", "rloo": "max_completion_length", "grpo": "max_completion_length"},
    "kl_coef": {"ppo": "kl_coef", "rloo": "beta", "grpo": "beta"},
}


JUDGE = ("reward", lambda v: v == "judge", "reward: judge")


@dataclass
class Config(JudgeSettings):  # with reward: judge, the judge: feedback_model and feedback_few_shot (pointwise)
    algorithm: Literal["ppo", "rloo", "grpo"] = "ppo"  # the paper uses PPO
    policy: str | None = setting(
        None, "the policy to optimise, also the KL reference: null = the newest policy (the sft stage's model in "
              "round 1, round k-1's rl in round k)", model_reference=True)
    reward_model: str | None = setting(None, "null = the reward stage's model", model_reference=True,
                                       only_if=("reward", lambda v: v == "reward_model", "reward: reward_model"))
    max_prompts: int | None = setting(None, "cap on training prompts (red-team + helpful), null = all", ge=1)
    helpful_fraction: float = setting(0.5, "share of the training prompts that are helpful ones (0 = red-team only)",
                                      ge=0, lt=1)
    max_new_tokens: int = setting(64, "answer length (PPO response_length, RLOO/GRPO max_completion_length)", ge=1)
    kl_coef: float = setting(0.05, "KL penalty to the reference (PPO kl_coef, RLOO/GRPO beta)", ge=0)
    reward: Literal["reward_model", "judge"] = setting(
        "reward_model", "reward_model: the reward stage's preference model scores each answer; judge: the feedback "
                        "model does, as P(good) under a drawn principle (direct RLAIF; rloo and grpo only)")
    principles_per_answer: int = setting(1, "with reward: judge, feedback principles drawn per answer (averaged)",
                                         ge=1, only_if=JUDGE)
    feedback_batch_size: int = setting(64, "with reward: judge, questions per scoring batch", ge=1, only_if=JUDGE)

    ONLY_IF: ClassVar[dict] = dict.fromkeys(JUDGE_FIELDS, JUDGE)  # the judge's keys do nothing without it


# Settings only the judge reads: they enter the config hash only with `reward: judge`.
JUDGE_SETTINGS = ("reward", *JUDGE_FIELDS, "principles_per_answer", "feedback_batch_size")


def hashed_config(cfg: Config, run) -> dict:
    """The settings that decide rl's results, for its config hash: the judge's only with
    `reward: judge` (so runs from before the option keep their hashes), the reward
    model's only without it."""
    unused = ("reward_model",) if cfg.reward == "judge" else JUDGE_SETTINGS
    return {key: value for key, value in dataclasses.asdict(cfg).items() if key not in unused}


def trl_config_class(algorithm: str):
    import importlib

    module, name = ALGORITHMS[algorithm]
    return getattr(importlib.import_module(module), name)


@functools.cache
def _any_algorithm_config():
    """A stand-in whose fields are the union of the three TRL configs' fields: what the
    `rl:` section may hold before the algorithm is known; `check_config` narrows it."""
    names = sorted({f.name for algorithm in ALGORITHMS for f in dataclasses.fields(trl_config_class(algorithm))
                    if f.init})
    cls = dataclasses.make_dataclass("PPOConfig, RLOOConfig or GRPOConfig", [(n, Any, None) for n in names])
    cls.__module__ = "trl"
    return cls


def TRL_CONFIG(section: dict | None = None):
    """The TRL config class of the section's `algorithm`; without a section (or with an
    invalid algorithm, which the Config check reports) the union of all three."""
    algorithm = section.get("algorithm", Config.algorithm) if section is not None else None
    return trl_config_class(algorithm) if algorithm in ALGORITHMS else _any_algorithm_config()


def stage_defaults(cfg: Config) -> dict:
    """cai's settings for the algorithm's TRL config (the user's `rl:` keys override them)."""
    defaults = {KNOBS[knob][cfg.algorithm]: getattr(cfg, knob) for knob in KNOBS}
    defaults["num_train_epochs"] = 1  # one pass over the prompts (TrainingArguments says 3)
    if cfg.algorithm == "ppo":
        defaults.update(stop_token="eos", num_sample_generations=0)
    else:
        defaults.update(num_generations=4 if cfg.algorithm == "grpo" else 2)  # GRPO's 8 is a lot for a CPU
    return defaults


def trl_settings(cfg: Config) -> tuple[type, dict]:
    """The algorithm's TRL config class and cai's defaults for it."""
    return trl_config_class(cfg.algorithm), stage_defaults(cfg)


def _merged_settings(cfg: Config, trl: dict) -> dict:
    cls = trl_config_class(cfg.algorithm)
    values = {f.name: f.default for f in dataclasses.fields(cls) if f.init and f.default is not dataclasses.MISSING}
    return {**values, **stage_defaults(cfg), **trl}


def check_config(run, cfg: Config, trl: dict) -> list[Problem]:
    """Problems the algorithm's TRL config or trainer would only find after models are
    loaded: keys of another algorithm's config, batches that do not split into groups."""

    def problem(key: str, message: str) -> Problem:
        if run.source is None:
            return Problem("config", 1, message)
        return run.source.problem(("rl", key), message)

    problems = judge_problems(run, "rl", cfg, pointwise=True)
    if cfg.reward == "judge" and cfg.algorithm == "ppo":
        problems.append(problem("reward", "'rl.reward': judge needs rl.algorithm rloo or grpo (their reward can be "
                                          "a function of the answer's text); TRL's PPO scores token ids with a "
                                          "reward model. Set rl.algorithm to rloo or grpo, or rl.reward to "
                                          "reward_model"))
    if cfg.reward == "judge" and cfg.feedback_model == "rl":
        problems.append(problem("feedback_model", "'rl.feedback_model': rl cannot judge its own training (its "
                                                  "model is what this stage writes); use base, sft, another stage "
                                                  "or a model spec"))
    cls = trl_config_class(cfg.algorithm)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in trl:
        if key not in fields:
            owners = [a for a in ALGORITHMS if key in {f.name for f in dataclasses.fields(trl_config_class(a))}]
            problems.append(problem(key, f"'rl.{key}' is not a field of {cls.__name__} (rl.algorithm is "
                                         f"'{cfg.algorithm}'); it belongs to algorithm {' / '.join(owners)}"))
    if problems:
        return problems

    s = _merged_settings(cfg, trl)
    if cfg.algorithm == "ppo":
        batch = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]
        if batch % s["num_mini_batches"]:
            problems.append(problem("num_mini_batches", (
                f"PPO: the batch (rl.per_device_train_batch_size {s['per_device_train_batch_size']} x "
                f"rl.gradient_accumulation_steps {s['gradient_accumulation_steps']} = {batch}) must be divisible "
                f"by rl.num_mini_batches ({s['num_mini_batches']})")))
    else:
        generations = s["num_generations"]
        if generations < 2:
            problems.append(problem("num_generations", f"{cfg.algorithm.upper()}: 'rl.num_generations' must be at "
                                                       f"least 2 (the baseline is the other answers to the same "
                                                       f"prompt), got {generations}"))
        elif s.get("generation_batch_size") is not None:
            if s["generation_batch_size"] % generations:
                problems.append(problem("generation_batch_size", (
                    f"{cfg.algorithm.upper()}: rl.generation_batch_size ({s['generation_batch_size']}) counts "
                    f"completions and must be divisible by rl.num_generations ({generations})")))
        else:
            steps = s.get("steps_per_generation") or s["gradient_accumulation_steps"]
            batch = s["per_device_train_batch_size"] * steps
            if batch % generations:
                problems.append(problem("per_device_train_batch_size", (
                    f"{cfg.algorithm.upper()}: rl.per_device_train_batch_size counts completions, not prompts: "
                    f"per_device_train_batch_size ({s['per_device_train_batch_size']}) x "
                    f"{'steps_per_generation' if s.get('steps_per_generation') else 'gradient_accumulation_steps'} "
                    f"({steps}) = {batch} must be divisible by rl.num_generations ({generations})")))
    return problems


def training_prompts(ctx, cfg: Config) -> list[dict]:
    """Red-team training prompts mixed with helpful ones, as one-turn conversations."""
    red, helpful = ctx.prompts.red_team_train, ctx.prompts.helpful_train
    if cfg.max_prompts is not None:
        n_helpful = min(len(helpful), round(cfg.max_prompts * cfg.helpful_fraction))
        n_red = min(len(red), cfg.max_prompts - n_helpful)
    else:
        n_red = len(red)
        n_helpful = min(len(helpful), round(n_red * cfg.helpful_fraction / (1 - cfg.helpful_fraction)))
    chosen = red[:n_red] + helpful[:n_helpful]
    random.Random(ctx.run.seed).shuffle(chosen)
    return [{"prompt": [{"role": "user", "content": p.text}], "kind": p.kind} for p in chosen]


def _check_prompt_count(cfg: Config, args, prompts: list) -> None:
    if cfg.algorithm == "ppo":
        needed = args.per_device_train_batch_size * args.gradient_accumulation_steps
        what = "PPO batch (per_device_train_batch_size x gradient_accumulation_steps)"
    else:
        needed = args.generation_batch_size // args.num_generations
        what = f"{cfg.algorithm.upper()} generation batch (in prompts: generation_batch_size / num_generations)"
    if len(prompts) < needed:
        raise ValueError(f"rl: {len(prompts)} training prompts, fewer than one {what} = {needed}; "
                         "raise rl.max_prompts / prompts.max_red_team or lower the batch")


def run(ctx) -> dict:
    from cai import models
    from cai.training.args import trl_config
    from cai.training.models import load_training_model, reference_loading
    from cai.training.save import train_and_save

    cfg: Config = ctx.config
    options = ctx.model_options
    policy = ctx.model_spec(cfg.policy, ctx.newest_policy())
    prompts = training_prompts(ctx, cfg)
    args = trl_config(ctx, *trl_settings(cfg))
    reference_loading(args, options)
    _check_prompt_count(cfg, args, prompts)

    reward = ctx.model_spec(cfg.reward_model, "reward") if cfg.reward == "reward_model" else None
    judge = judge_reward(ctx, cfg) if cfg.reward == "judge" else None
    if cfg.algorithm == "ppo":
        trainer = ppo_trainer(ctx, args, policy, reward, prompts)
    else:
        from datasets import Dataset
        from trl import GRPOTrainer, RLOOTrainer

        if judge is not None:
            reward_funcs, reward_tokenizer = judge, None
        else:
            # The reward model is the reward function; TRL renders each prompt + answer with
            # its own tokenizer.
            reward_tokenizer = models.load_tokenizer(reward)
            reward_funcs = models.load_reward_model(reward, reward_tokenizer, options)
        trainer_class = GRPOTrainer if cfg.algorithm == "grpo" else RLOOTrainer
        # The KL reference is reloaded by TRL from the policy's folder, or, with use_peft,
        # is the policy with its adapter disabled.
        loaded = load_training_model(ctx, policy, padding_side="left")
        trainer = trainer_class(
            model=loaded.model, args=args, reward_funcs=reward_funcs, reward_processing_classes=reward_tokenizer,
            train_dataset=Dataset.from_list([{"prompt": p["prompt"]} for p in prompts]),
            processing_class=loaded.tokenizer, peft_config=loaded.peft_config)
    metrics = train_and_save(trainer, ctx, base=policy, data=_prompt_counts(prompts))
    if judge is not None:
        ctx.release(cfg.feedback_model)
    reward_counts = judge.counts() if judge is not None else {"reward": "reward_model", "reward_model": reward}
    return {"algorithm": cfg.algorithm, "prompts": len(prompts),
            "helpful_prompts": sum(p["kind"] == "helpful" for p in prompts), **reward_counts, **metrics}


# ---------------------------------------------------------------- the judge as the reward (d-RLAIF)


def judge_reward(ctx, cfg: Config) -> JudgeReward:
    """The rl section's feedback model as a TRL reward function, on its engine."""
    from cai.judge.settings import make_judge

    judge = make_judge(ctx, cfg, cfg.feedback_batch_size, pointwise=True)
    return JudgeReward(judge, ctx.constitution, ctx.run.seed, cfg.principles_per_answer)


class JudgeReward:
    """The feedback model as the reward (direct RLAIF, Lee et al. 2023): TRL's GRPO and
    RLOO call it with each batch's prompts and sampled completions, and it returns, per
    completion, the judge's P(good) in [0, 1] (`Judge.score_single`). Each answer is judged
    under principles drawn from (seed, its prompt, index), as `draw_principles` draws for
    pairs: every answer to one prompt meets the same principles, so the group baseline of
    RLOO / GRPO compares like with like, and a resumed run draws what it drew before. TRL
    logs it as `rewards/judge/mean` (and `/std`)."""

    def __init__(self, judge, constitution, seed: int, principles_per_answer: int = 1):
        self.__name__ = "judge"  # the name TRL logs the reward under
        self.judge = judge
        self.constitution = constitution
        self.seed = seed
        self.principles_per_answer = principles_per_answer
        self.answers = 0

    def __call__(self, prompts: list, completions: list, **_) -> list[float]:
        from cai.judge.judge import comparison_key, draw_principles

        conversations = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        responses = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        drawn = [draw_principles(self.constitution, self.seed, comparison_key(c), self.principles_per_answer)
                 for c in conversations]
        scores = self.judge.score_single(self.constitution, conversations, responses, drawn)
        self.answers += len(scores)
        return scores

    def counts(self) -> dict:
        """What the manifest records about the judge's work this session."""
        seconds = self.judge.seconds
        description = self.judge.description
        return {"reward": "judge", "feedback_model": description.get("feedback_model", ""),
                "judge_scoring": description.get("judge_scoring", "probabilities"), "judge": description,
                "judged_answers_this_session": self.answers, "judge_seconds_this_session": round(seconds, 2),
                "judged_answers_per_second": round(self.answers / seconds, 3) if seconds else None}


def _prompt_counts(prompts: list[dict]) -> dict[str, int]:
    helpful = sum(p["kind"] == "helpful" for p in prompts)
    return {"red-team prompts": len(prompts) - helpful, "helpful prompts": helpful}


# ---------------------------------------------------------------- PPO plumbing


def ppo_pad_token(tokenizer) -> None:
    """TRL's PPO finds padding by token id (`ids != pad_token_id`): a pad token that also
    ends chat turns (SmolLM2 pads with <|im_end|>) would mask the prompt itself. Pad with
    another special token the chat template does not use."""
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                          add_generation_prompt=True)
    specials = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special]
    for token in [tokenizer.unk_token, tokenizer.bos_token, *specials]:
        if token and token != tokenizer.eos_token and token not in probe:
            tokenizer.pad_token = token
            return
    raise ValueError("PPO needs a pad token distinct from the tokens of the chat template; this tokenizer pads "
                     f"with {tokenizer.pad_token!r} (its EOS) and has no other special token to pad with. "
                     "Use algorithm rloo or grpo, which do not have this limit")


def check_shared_tokenizer(policy_tokenizer, reward_tokenizer, policy: str, reward: str) -> None:
    if policy_tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        raise ValueError(f"rl.algorithm ppo scores the policy's token ids with the reward model, so both need the "
                         f"same tokenizer, but {policy} and {reward} have different vocabularies. Train the reward "
                         "model from the same base model, or use algorithm rloo or grpo (they re-tokenise for the "
                         "reward model)")


def ppo_trainer(ctx, args, policy: str, reward: str, prompts: list[dict]):
    from datasets import Dataset

    from cai import models
    from cai.training.models import load_training_model

    loaded = load_training_model(ctx, policy, padding_side="left")
    tokenizer = loaded.tokenizer
    check_shared_tokenizer(tokenizer, models.load_tokenizer(reward), policy, reward)
    ppo_pad_token(tokenizer)
    query_ids = [tokenizer(tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"] for p in prompts]
    options = ctx.model_options
    # With use_peft the policy is a LoRA adapter and the reference is the policy with the
    # adapter disabled (no reference copy); the value model is still trained in full.
    reference = None if options.use_peft else models.load_causal_lm(policy, ctx.run.device, options)
    return _ppo_trainer_class()(
        args=args, processing_class=tokenizer, model=loaded.model, ref_model=reference,
        reward_model=models.load_reward_model(reward, tokenizer, options).eval(),
        value_model=models.load_reward_model(reward, tokenizer, options),  # the value head starts from the reward model
        train_dataset=Dataset.from_dict({"input_ids": query_ids}), peft_config=loaded.peft_config)


PPO_TRAINED = "policy_and_value.safetensors"  # a PPO checkpoint's trained weights: policy (or adapter), value model


def ppo_stream_file(process: int) -> str:
    return f"batch_stream_{process}.pt"


class ResumableBatches:
    """The endless batch stream TRL's PPO draws its updates from (`yield from dataloader`,
    epoch after epoch), with its place recorded: the epoch's batch count so far and the
    CPU random state the epoch's shuffle was drawn from (a `RandomSampler` draws its seed
    from the global generator at the epoch's first batch). A resumed stream (`resume`:
    that state and count) draws the same shuffle and skips what was used, so the updates
    after a checkpoint see the batches an uninterrupted run would."""

    def __init__(self, dataloader, resume: dict | None = None):
        import torch

        self.dataloader = dataloader
        self.epoch_rng: torch.Tensor | None = None
        self.position = 0
        self.resume = resume

    def __iter__(self):
        import torch

        if self.resume is not None:
            now, resume, self.resume = torch.get_rng_state(), self.resume, None
            self.epoch_rng, self.position = resume["epoch_rng"], resume["position"]
            torch.set_rng_state(self.epoch_rng)
            batches = iter(self.dataloader)
            used = [next(batches, None) for _ in range(self.position)]  # the shuffle is drawn at the first
            torch.set_rng_state(now)  # the generation after the checkpoint goes on from the checkpoint's state
            del used
            for batch in batches:
                self.position += 1
                yield batch
        while True:
            self.epoch_rng, self.position = torch.get_rng_state(), 0
            for batch in self.dataloader:
                self.position += 1
                yield batch

    def state(self) -> dict:
        return {"epoch_rng": self.epoch_rng, "position": self.position}


@functools.cache
def _ppo_trainer_class():
    """TRL's PPOTrainer with what cai.training.save.train_and_save expects of a trainer
    (`train(resume_from_checkpoint)` returning a TrainOutput), a completion-length log,
    and resume.

    Resume: TRL 1.12's PPO has no `resume_from_checkpoint`, and its checkpoints hold only
    the policy (`save_model` drops the value model). Each checkpoint here also holds every
    trained weight (policy or its adapter, and the value model: `PPO_TRAINED`) and each
    process's place in the batch stream (`ResumableBatches`), written before the Trainer's
    own files (optimizer, scheduler, random states, and trainer_state.json last, which
    marks a checkpoint complete). A resume loads them, restores the step and episode
    counters and the log history, and runs the updates left; the result is the
    uninterrupted run's (tested). Sharded training (DeepSpeed, FSDP) writes no PPO
    checkpoints: an interrupted run restarts."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import TrainerCallback
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
    from trl.experimental.ppo import PPOTrainer

    class Continue(TrainerCallback):
        """Puts back the counters TRL's `train()` zeroes at its start."""

        def __init__(self, saved, total: int):
            self.saved, self.total = saved, total

        def on_train_begin(self, args, state, control, **kwargs):
            state.global_step, state.episode = self.saved.global_step, self.saved.episode
            state.log_history, state.max_steps = list(self.saved.log_history), self.total

    class CaiPPOTrainer(PPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # transformers.Trainer.__init__ sets this and `_save` reads it on every rank;
            # TRL 1.12's PPOTrainer never calls that __init__. cai never loads PPO's models
            # sharded by transformers, so non-writer ranks skip saving, as Trainer would.
            self.is_distributed_loading_by_transformers = False
            self._lengths: list[int] = []
            self._batches: ResumableBatches | None = None
            self._watch_rollout_lengths(self.policy_model)

        def _watch_rollout_lengths(self, policy) -> None:
            # TRL 1.12's PPO logs no completion length: count it from the rollouts it generates.
            # Counted like RLOO/GRPO count theirs: up to and including the stop token.
            generate, stop = policy.generate, self.stop_token_id

            def counting_generate(*args, **kwargs):
                # TRL passes return_dict_in_generate and output_scores beside its
                # generation_config, which transformers 5.25 deprecates: fold them in.
                config = kwargs.get("generation_config")
                extra = {k: kwargs.pop(k) for k in ("return_dict_in_generate", "output_scores")
                         if config is not None and k in kwargs}
                if extra:
                    kwargs["generation_config"] = copy.deepcopy(config)
                    kwargs["generation_config"].update(**extra)
                output = generate(*args, **kwargs)
                sequences = output.sequences if hasattr(output, "sequences") else output
                answers = sequences[:, kwargs["input_ids"].shape[1]:]
                stops = answers == stop if stop is not None else torch.zeros_like(answers, dtype=torch.bool)
                lengths = torch.where(stops.any(1), stops.int().argmax(1) + 1, answers.shape[1])
                self._lengths += lengths.tolist()
                return output

            policy.generate = counting_generate

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if self._lengths:
                logs["completions/mean_length"] = sum(self._lengths) / len(self._lengths)
                self._lengths = []
            super().log(logs, start_time)

        @contextlib.contextmanager
        def _unwrapped(self):
            # Under DDP the policy-and-value model is wrapped: TRL 1.12 then misses its
            # `.policy` (and saves both halves) and its model card reads `.config`, which the
            # wrapper lacks. Saves see the unwrapped model.
            wrapped = self.model
            self.model = self.accelerator.unwrap_model(wrapped)
            try:
                yield
            finally:
                self.model = wrapped

        def save_model(self, output_dir=None, _internal_call=False):
            with self._unwrapped():
                super().save_model(output_dir, _internal_call)

        def _sharded(self) -> bool:
            return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)

        def _save_checkpoint(self, model, trial):
            if self._sharded():
                return
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self._batches.state(), folder / ppo_stream_file(self.args.process_index))
            if self.args.should_save:
                trained = {name: p.detach().cpu().contiguous()
                           for name, p in self.accelerator.unwrap_model(self.model).named_parameters()
                           if p.requires_grad}
                save_file(trained, str(folder / PPO_TRAINED))
            with self._unwrapped():
                super()._save_checkpoint(model, trial)

        def _resume(self, checkpoint: str) -> tuple[Any, dict]:
            """Load a checkpoint's weights, optimizer, scheduler and random states; its
            trainer state and this process's batch-stream place."""
            folder = Path(checkpoint)
            model = self.accelerator.unwrap_model(self.model)
            trained = load_file(str(folder / PPO_TRAINED))
            wanted = {name for name, p in model.named_parameters() if p.requires_grad}
            _, unexpected = model.load_state_dict(trained, strict=False)
            if unexpected or wanted - set(trained):
                raise RuntimeError(f"{folder}: its {PPO_TRAINED} does not match this PPO model (another policy or "
                                   "LoRA setting?); remove the checkpoints folder to start over")
            # (Trainer._load_optimizer_and_scheduler reads attributes PPOTrainer never sets.)
            self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_NAME, map_location=self.accelerator.device,
                                                      weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))
            saved = type(self.state).load_from_json(str(folder / "trainer_state.json"))
            stream = torch.load(folder / ppo_stream_file(self.args.process_index), weights_only=True)
            self._load_rng_state(checkpoint)  # last: nothing above draws random numbers
            return saved, stream

        def train(self, resume_from_checkpoint=None):
            started = time.time()
            total, saved, stream = self.args.num_total_batches, None, None
            if resume_from_checkpoint:
                saved, stream = self._resume(resume_from_checkpoint)
            dataloader, self._batches = self.dataloader, ResumableBatches(self.dataloader, stream)
            resumed = Continue(saved, total) if saved is not None else None
            if resumed is not None:
                self.callback_handler.callbacks.insert(0, resumed)
                self.args.num_total_batches = total - saved.global_step  # TRL's loop runs this many updates
            self.dataloader = self._batches
            try:
                super().train()
            finally:
                self.dataloader, self.args.num_total_batches = dataloader, total
                if resumed is not None:
                    self.callback_handler.remove_callback(resumed)
            losses = [entry["loss/policy_avg"] for entry in self.state.log_history if "loss/policy_avg" in entry]
            return TrainOutput(self.state.global_step, sum(losses) / len(losses) if losses else 0.0,
                               {"train_runtime": time.time() - started})

    return CaiPPOTrainer
