"""RL-CAI: reinforcement learning from AI feedback (Bai et al. 2022, section 4.1).

The SFT model is the initial policy and the reference; the preference model trained on
the AI's soft labels is the reward. The policy answers training prompts, the reward
model scores each answer, and the policy is updated to raise the score while a KL
penalty keeps it near the reference. The paper trains on the red-team prompts mixed
with helpful ones (so the policy does not learn that refusing everything pays), and
uses PPO; RLOO and GRPO are cheaper alternatives (no value model: the baseline is the
other samples for the same prompt).

- `ppo`: cai's own PPO (`cai.training.ppo`; TRL deleted its PPO in 1.13). Rollouts come
  from cai's generation engine; a value model (from the reward model: a warm critic) is
  trained alongside the policy. With `use_peft`, policy, reference and value share one
  frozen base (two adapters; the reference is the base with them disabled).
  Updates = total_episodes / batch.
- `rloo`, `grpo`: `trl.RLOOTrainer` / `trl.GRPOTrainer`. A batch counts completions:
  `num_generations` per prompt.

Every algorithm takes the same reward function (`reward_function`): the reward model
renders prompt + answer with its own chat template and reads its score
(`RewardModelReward`), or the judge (below).

Direct RLAIF (`reward: judge`; Lee et al. 2023, "RLAIF vs. RLHF", reported
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

import dataclasses
import functools
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from cai.judge.settings import JUDGE_FIELDS, JudgeSettings, judge_problems
from cai.schema import setting
from cai.yamlio import Problem, problem

# algorithm -> (module, TRL config class)
ALGORITHMS = {
    "ppo": ("cai.training.ppo", "PPOConfig"),  # cai's own: TRL deleted its PPO in 1.13
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
                        "model does, as P(good) under a drawn principle (direct RLAIF)")
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
    """A stand-in whose fields are the union of the three configs' fields: what the
    `rl:` section may hold before the algorithm is known; `check_config` narrows it."""
    from cai.training.ppo import REMOVED_KEYS

    # (TRL 1.12's PPO keys that cai's PPO lacks pass here so that `check_config` names their replacement.)
    names = sorted({f.name for algorithm in ALGORITHMS for f in dataclasses.fields(trl_config_class(algorithm))
                    if f.init} | set(REMOVED_KEYS))
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
    if cfg.algorithm != "ppo":
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

    from cai.training.ppo import REMOVED_KEYS

    problems = judge_problems(run, "rl", cfg, pointwise=True)
    if cfg.reward == "judge" and cfg.feedback_model == "rl":
        problems.append(problem(run.source, ("rl", "feedback_model"),
                                "'rl.feedback_model': rl cannot judge its own training (its "
                                "model is what this stage writes); use base, sft, another stage "
                                "or a model spec"))
    cls = trl_config_class(cfg.algorithm)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in trl:
        if cfg.algorithm == "ppo" and key in REMOVED_KEYS:
            problems.append(problem(run.source, ("rl", key),
                                    f"'rl.{key}' was a key of TRL 1.12's PPOConfig; cai's PPO has none: "
                                    f"{REMOVED_KEYS[key]}"))
        elif key not in fields:
            owners = [a for a in ALGORITHMS if key in {f.name for f in dataclasses.fields(trl_config_class(a))}]
            problems.append(problem(run.source, ("rl", key),
                                    f"'rl.{key}' is not a field of {cls.__name__} (rl.algorithm is "
                                    f"'{cfg.algorithm}'); it belongs to algorithm {' / '.join(owners)}"))
    if problems:
        return problems

    s = _merged_settings(cfg, trl)
    if cfg.algorithm == "ppo":
        batch = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]
        if batch % s["num_mini_batches"]:
            problems.append(problem(run.source, ("rl", "num_mini_batches"), (
                f"PPO: the rollout batch (rl.per_device_train_batch_size {s['per_device_train_batch_size']} x "
                f"rl.gradient_accumulation_steps {s['gradient_accumulation_steps']} = {batch}) must be divisible "
                f"by rl.num_mini_batches ({s['num_mini_batches']})")))
    else:
        generations = s["num_generations"]
        if generations < 2:
            problems.append(problem(run.source, ("rl", "num_generations"),
                                    f"{cfg.algorithm.upper()}: 'rl.num_generations' must be at "
                                    f"least 2 (the baseline is the other answers to the same "
                                    f"prompt), got {generations}"))
        elif s.get("generation_batch_size") is not None:
            if s["generation_batch_size"] % generations:
                problems.append(problem(run.source, ("rl", "generation_batch_size"), (
                    f"{cfg.algorithm.upper()}: rl.generation_batch_size ({s['generation_batch_size']}) counts "
                    f"completions and must be divisible by rl.num_generations ({generations})")))
        else:
            steps = s.get("steps_per_generation") or s["gradient_accumulation_steps"]
            batch = s["per_device_train_batch_size"] * steps
            if batch % generations:
                problems.append(problem(run.source, ("rl", "per_device_train_batch_size"), (
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
    from cai.training.args import trl_config
    from cai.training.models import reference_loading
    from cai.training.save import train_and_save

    cfg: Config = ctx.config
    options = ctx.model_options
    policy = ctx.model_spec(cfg.policy, ctx.newest_policy())
    prompts = training_prompts(ctx, cfg)
    args = trl_config(ctx, *trl_settings(cfg))
    reference_loading(args, options)
    _check_prompt_count(cfg, args, prompts)

    reward = reward_function(ctx, cfg, args.device)
    if cfg.algorithm == "ppo":
        trainer = ppo_trainer(ctx, args, policy, reward, prompts)
    else:
        from datasets import Dataset
        from trl import GRPOTrainer, RLOOTrainer

        from cai.training.models import load_training_model

        trainer_class = GRPOTrainer if cfg.algorithm == "grpo" else RLOOTrainer
        # The KL reference is reloaded by TRL from the policy's folder, or, with use_peft,
        # is the policy with its adapter disabled.
        loaded = load_training_model(ctx, policy, padding_side="left")
        trainer = trainer_class(
            model=loaded.model, args=args, reward_funcs=reward,
            train_dataset=Dataset.from_list([{"prompt": p["prompt"]} for p in prompts]),
            processing_class=loaded.tokenizer, peft_config=loaded.peft_config)
    metrics = train_and_save(trainer, ctx, base=policy, data=_prompt_counts(prompts))
    if cfg.reward == "judge":
        ctx.release(cfg.feedback_model)
    return {"algorithm": cfg.algorithm, "prompts": len(prompts),
            "helpful_prompts": sum(p["kind"] == "helpful" for p in prompts), **reward.counts(), **metrics}


def reward_function(ctx, cfg: Config, device):
    """The reward, as the callable every algorithm takes (TRL's `reward_funcs` signature,
    `reward(prompts, completions, completion_ids=...) -> [float]`): the reward model
    (`RewardModelReward`) or, with `reward: judge`, the feedback model (`JudgeReward`)."""
    if cfg.reward == "judge":
        return judge_reward(ctx, cfg)
    return RewardModelReward(ctx.model_spec(cfg.reward_model, "reward"), ctx.model_options, device, ctx.work)


class RewardModelReward:
    """The reward stage's preference model as a reward function: each prompt and answer
    rendered with the reward model's own chat template (the sequences it was trained on,
    `cai.training.models.RewardScorer`), its score read at the last token. Logged by TRL as
    `rewards/model/mean`."""

    def __init__(self, spec: str, options, device, work=None):
        from cai import models
        from cai.training.models import RewardScorer

        self.__name__ = "model"  # the name TRL logs the reward under
        self.spec = spec
        tokenizer = models.load_tokenizer(spec)
        self.model = models.load_reward_model(spec, tokenizer, options).to(device).eval()
        self.model.requires_grad_(False)
        self.scorer = RewardScorer(self.model, tokenizer, batch_size=64, work=work)  # its scoring counted (cai.work)

    def __call__(self, prompts: list, completions: list, **_) -> list[float]:
        conversations = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        responses = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return self.scorer.score(conversations, responses)

    def counts(self) -> dict:
        return {"reward": "reward_model", "reward_model": self.spec}


def ppo_trainer(ctx, args, policy: str, reward, prompts: list[dict]):
    """cai's PPO (`cai.training.ppo`). Full fine-tuning: a reference copy of the policy and
    a value model initialised from the reward model (a warm critic; from the policy under a
    zero head when there is no reward model of the policy's vocabulary). LoRA: one base for
    policy, reference and value."""
    import torch

    from cai import models
    from cai.training.models import load_training_model
    from cai.training.ppo import PPOTrainer

    options = ctx.model_options
    loaded = load_training_model(ctx, policy, padding_side="left")
    reward_model = getattr(reward, "model", None)
    same_vocabulary = (reward_model is not None
                       and reward.scorer.tokenizer.get_vocab() == loaded.tokenizer.get_vocab())
    conversations = [p["prompt"] for p in prompts]
    if options.use_peft:
        return PPOTrainer(args, loaded.model, loaded.tokenizer, conversations, reward, peft_config=loaded.peft_config,
                          reward_model_for_value_head=reward_model if same_vocabulary else None)
    reference = models.load_causal_lm(policy, ctx.run.device, options)
    value_model = models.load_reward_model(reward.spec if same_vocabulary else policy, loaded.tokenizer, options)
    if not same_vocabulary:
        with torch.no_grad():
            value_model.score.weight.zero_()
    return PPOTrainer(args, loaded.model, loaded.tokenizer, conversations, reward, reference=reference,
                      value_model=value_model)


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
