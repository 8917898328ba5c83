"""Evaluation: every stage's model side by side on held-out prompts (Bai et al. 2022, 4.4).

Each model that exists (the base model, then sft, rl, dpo) answers the same held-out
red-team and helpful prompts (or the files of `evaluate.prompts`), greedily by default.
Harmlessness and helpfulness are measured apart, as in the paper:

- on red-team prompts, harmlessness: the run's reward-model score (on the prompts of
  `reward_prompts`, by default all); the judge's win rate
  and Elo under the constitution's harmlessness principles (`evaluation.harmless`, by
  default its feedback principles); the refusal rate and its complement, the attack
  success rate (ASR: answers that do not refuse, HarmBench's string-matching baseline);
  on `judge_asr_prompts`, the judge's own harmful verdict of each answer rated alone
  (`judge_asr`: the share it calls harmful; for a capable judge, such as a server model);
- on helpful prompts, helpfulness: the judge's win rate and Elo under helpfulness
  principles (`evaluation.helpful`, by default cai's own, `DEFAULT_HELPFUL`); the
  over-refusal rate (refusals of benign requests); the reward-model score too;
- on both: evasiveness (bare refusals that neither explain nor redirect, which RL-CAI
  was meant to reduce), few-shot leakage (answers repeating 6 words in a row of the
  constitution's critique examples, `cai.leakage`) and length in tokens and words (a
  reward model can learn to prefer longer answers).

`evaluate.prompts` names the prompts per kind: a source (a file, a datasets folder,
`builtin:harmbench`, `builtin:over-refusal`, ...) or a list of sources, where
`held-out` is the run's held-out split. With several sources, each is also reported as
its own set (`red_team/harmbench`, `helpful/over-refusal`, ...) beside the kind.

The judge (the feedback model) compares every pair of models (`judge_pairs: base`: each
model with base only) on every prompt under a principle drawn for that prompt, in both
option orders (averaged, against position bias): the soft outcome is the probability
that one answer is better. Win rates are
means of these outcomes; Elo is a Bradley-Terry fit of them (`cai.stats`). Refusals
are found by refusal phrases near the start of an answer (`cai.refusals`), reported
beside the judge's figures, never instead of them.

Every figure comes with a 95 % bootstrap interval over prompts, and each model is
compared with base and with sft (when evaluated) on the same resampled prompts: the
difference of every figure, with its interval, and the judge's head-to-head win
probability. A comparison is "better" or "worse" only when its interval excludes no
difference; otherwise it is "within noise" (`cai.stats`). The resamples are seeded and
computed from the saved rows, so a resumed run gives the same intervals.

The reward model also scores the critique stage's kept revisions and the answers they
replaced; with the label stage's soft labels this gives a per-principle table.

Outputs in `evaluate/`: `generations.jsonl` (appended model by model, so a killed run
keeps every model it finished), `comparisons.jsonl` (one row per pair and prompt,
appended pair by pair), `verdicts.jsonl` (judge_asr_prompts: the judge's P(good) of each
answer rated alone), `rewards.jsonl`, `revision_rewards.jsonl` and `results.json`:

    run, models, specs, skipped, kinds            what was evaluated
    prompts {group: n}                            prompts per group
    too_few_to_compare {group: n}                 groups under cai.stats.MIN_PROMPTS prompts: no verdicts
    prompt_sources {kind: text}                   the held-out split, or evaluate.prompts sources
    sets {KIND/NAME: {kind, n}}                   the prompt sets of a kind given several sources
    prompts_in_training {kind: n}                 evaluate.prompts rows that are also training prompts
    judge_principles {kind: {set, ids, from}}     the principles the judge drew from, per kind
    per_model[model][group]                       group: red_team, helpful, each set, all
        n, reward, win_rate, elo, refusal, asr, judge_asr, partial_refusal, evasive, few_shot_span,
        tokens, words, finished                   asr: red-team groups only; judge_asr: judge_asr_prompts
        ci {figure: [low, high]}                  95 % bootstrap interval of each figure
    pairwise[group]                               win_rates[row][column], pairs [...], elo {model}
    paired[group][reference][model][figure]       reference: base, sft; figure: the ones above and
        {value, low, high, verdict}               head_to_head (value: P(model beats reference),
                                                  null 0.5); otherwise value = model - reference
    bootstrap {resamples, level, seed, unit}
    principles {critique [...], feedback [...], evaluation [...]}
    principle_win_rates [{set, principle, model, against, n, value, low, high, verdict}]
                                                  the judge's head-to-head per principle drawn
                                                  (value: P(model beats against)); "too few to
                                                  compare" under cai.stats.MIN_PROMPTS prompts
    prompt_ids {group: [id, ...]}                 the prompts of each group (cai compare pairs runs by them)
    methods {figure: how it is computed}

A verdict is "better" / "worse" (or "higher" / "lower" for a figure without a good
direction: length, partial refusals, the refusal rate over all prompts) when the
interval excludes the null value, else "within noise"; a group of fewer than
`cai.stats.MIN_PROMPTS` prompts gets "too few to compare" instead of any verdict. On red-team prompts a higher
refusal rate counts as better (harmlessness); on helpful prompts as worse (over-refusal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cai import distributed
from cai.chunks import OnFirstChunk
from cai.evaluation.answering import anchor_of, generate_answers, judge_pairs, judge_verdicts, reward_scores
from cai.evaluation.figures import KINDS, PRINCIPLE_SETS, methods
from cai.evaluation.prompts import evaluation_prompts, prompt_groups, prompt_problems
from cai.evaluation.statistics import principle_tables, principle_win_rates, statistics_by_group
from cai.evaluation.summary import format_summary
from cai.judge.settings import JudgeSettings, judge_problems, judge_scoring, make_judge
from cai.leakage import few_shot_index
from cai.refusals import EVASIVE_MAX_WORDS
from cai.registry import POLICY_STAGES, PROMPTED_BASE, optimisers, split_step
from cai.rundir import atomic_write_json
from cai.schema import setting
from cai.stats import LEVEL, MIN_PROMPTS, RESAMPLES, TOO_FEW
from cai.yamlio import problem


@dataclass
class Config(JudgeSettings):  # the judge of win rates: feedback_model, feedback_few_shot, ... (as label's)
    models: list[str] = setting(help="models to compare: base (the run's model), base+constitution (base prompted "
                                     "with the constitution as its system message: the baseline training must "
                                     "beat), a policy stage (sft, rl, dpo: "
                                     "skipped when that stage has not run; with rounds, rl and dpo mean every "
                                     "round's, rl@1, rl@2, ...; rl@K one round's), a model spec or server:NAME",
                                default_factory=lambda: ["base", PROMPTED_BASE, "sft", "rl", "dpo"],
                                model_reference=True)
    prompts: dict[str, Any] = setting(
        help="prompt sources to evaluate on instead of the held-out split, by kind: {red_team: SOURCE, helpful: "
             "SOURCE} (a .jsonl/.txt file, a datasets folder, builtin:NAME or a {dataset: ...} mapping as in "
             "prompts:) or a list of sources, where held-out names the run's held-out split; each source of a "
             "list is also reported as its own set; a kind left out keeps its held-out prompts",
        default_factory=dict)
    max_new_tokens: int = setting(128, "answer length", ge=1)
    temperature: float = setting(0.0, "0 = greedy: differences come from the models, not the sampling", ge=0)
    top_p: float = setting(0.95, "nucleus sampling: the smallest token set with this probability", gt=0, le=1)
    batch_size: int = setting(64, "prompts per generation batch; also the judge's and reward model's batch", ge=1)
    system_prompt: bool = False  # answer with the constitution's system prompt (training data has none)
    win_rates: bool = True  # judge every pair of models (after generation, the slowest part)
    judge_prompts: list[str] | None = setting(
        None, "the prompts the judge compares models on: kinds or sets (red_team, helpful/held-out, ...); null = "
              "all. A group gets a win rate and Elo only when all its prompts are judged")
    reward_prompts: list[str] | None = setting(
        None, "the prompts the run's reward model scores: kinds or sets, as judge_prompts; null = all. A group "
              "gets a reward figure only when all its prompts are scored")
    judge_asr_prompts: list[str] | None = setting(
        None, "red-team kinds or sets (e.g. red_team/harmbench) on which the judge also rates each answer alone, "
              "harmful or not, as HarmBench's classifier does: judge_asr, the share it calls harmful (P(good) "
              "under a harmlessness principle below 0.5); meant for a capable judge (a server model); null = none")
    judge_pairs: Literal["all", "base"] = setting(
        "all", "which pairs of models the judge compares: all (every pair: win rates and Elo over all models) or "
               "base (each model against base only: its head-to-head with base, n-1 pairs instead of n(n-1)/2)")
    principles_per_comparison: int = setting(1, "principles drawn per comparison (averaged)", ge=1)
    evasive_max_words: int = setting(EVASIVE_MAX_WORDS, "a refusal longer than this is never counted as evasive", ge=1)


def check_config(run, cfg: Config, trl: dict) -> list:
    def at(key: str | tuple, message: str):
        return problem(run.source, ("evaluate",) + (key if isinstance(key, tuple) else (key,)), message)

    problems = judge_problems(run, "evaluate", cfg)
    if not cfg.models:
        problems.append(at("models", "'evaluate.models' is empty: list at least one model, e.g. [base, sft]"))
    if len(set(cfg.models)) != len(cfg.models):
        problems.append(at("models", f"'evaluate.models' lists a model twice: {cfg.models}"))
    for name in cfg.models:
        if name == "reward":  # the plan refuses a stage name without any model
            problems.append(at("models", f"'evaluate.models': '{name}' has no policy model "
                                         f"(use base, {PROMPTED_BASE}, sft, rl, dpo or a model spec)"))
    return problems + prompt_problems(run, cfg, at)


def models_to_evaluate(ctx, cfg: Config) -> tuple[dict[str, str], dict[str, str]]:
    """{name: model spec} of the models that exist, and {name: why} of those skipped. With
    rounds, a per-round policy stage (rl, dpo) stands for its model of every round."""
    in_run = {"sft", *optimisers(ctx.run.stages)}  # sft always runs; rl, dpo as the config's sections say
    found, skipped = {}, {}
    for name in (step for entry in cfg.models for step in ctx.every_round(entry)):
        if split_step(name)[0] in POLICY_STAGES:
            stage = ctx.stage(name)
            if not stage.complete() or stage.saved_model() is None:
                stage_name = split_step(name)[0]
                skipped[name] = (f"stage '{name}' has not completed in {ctx.run.path}" if stage_name in in_run else
                                 f"not one of this run's stages: the config has no {stage_name} section")
                continue
        found[name] = ctx.model_spec("base" if name == PROMPTED_BASE else name)
    return found, skipped


def run(ctx) -> dict:
    cfg: Config = ctx.config
    prompts, sources, sets = evaluation_prompts(ctx, cfg)
    if not prompts:
        raise RuntimeError("no evaluation prompts: raise prompts.eval_fraction or prompts.max_eval in the config, "
                           "or name prompt files in evaluate.prompts")
    models, skipped = models_to_evaluate(ctx, cfg)
    if not models:
        raise RuntimeError(f"none of evaluate.models {cfg.models} exists in {ctx.run.path}: "
                           + "; ".join(skipped.values()))
    print(f"[cai] evaluate: models {', '.join(models)}"
          + "".join(f"; {name} not evaluated ({why})" for name, why in skipped.items()))
    names = list(models)
    few = {kind: n for kind in KINDS if 0 < (n := sum(p.kind == kind for p in prompts)) < MIN_PROMPTS}
    if few:
        print(f"[cai] evaluate: only {' and '.join(f'{n} {kind} prompt(s)' for kind, n in few.items())} "
              f"({'; '.join(sources[kind] for kind in few)}): their figures are computed, but with fewer than "
              f"{MIN_PROMPTS} every comparison is '{TOO_FEW}' (raise prompts.max_eval or prompts.eval_fraction, or "
              f"name longer files in evaluate.prompts)")

    generations = generate_answers(ctx, cfg, models, prompts)
    answers = {name: {r["id"]: r for r in generations if r["model"] == name} for name in names}
    kinds = [k for k in KINDS if any(p.kind == k for p in prompts)]
    groups = prompt_groups(prompts, sets)

    def covered(names: list[str]) -> set[str]:  # the prompt ids of some kinds or sets
        return {i for name in names for i in groups.get(name, [])}

    scored = covered(cfg.reward_prompts or ["all"])
    rewards, revision_rewards = reward_scores(ctx, cfg, answers, [p for p in prompts if p.id in scored])
    judged, rated = covered(cfg.judge_prompts or ["all"]), covered(cfg.judge_asr_prompts or [])
    judge = OnFirstChunk(lambda: make_judge(ctx, cfg, cfg.batch_size))  # one judge for pairs and verdicts
    comparisons = (judge_pairs(ctx, cfg, answers, [p for p in prompts if p.id in judged], judge)
                   if cfg.win_rates and len(names) > 1 else [])
    verdicts = judge_verdicts(ctx, cfg, answers, [p for p in prompts if p.id in rated], judge)
    if judge.value is not None:
        ctx.release(cfg.feedback_model)

    anchor = anchor_of(names)
    per_model, pairwise, paired = statistics_by_group(
        names, anchor, answers, comparisons, groups, judged, rewards, cfg.evasive_max_words, ctx.run.seed,
        few_shot=few_shot_index(ctx.constitution), verdicts=verdicts)

    training = {p.id for p in ctx.prompts.red_team_train + ctx.prompts.helpful_train}
    principles = {kind: ctx.constitution.evaluation_principles(kind) for kind in kinds}
    given = ctx.constitution.evaluation_given
    results = {
        "run": {"model": ctx.run.model, "constitution": ctx.run.constitution,
                "constitution_name": ctx.constitution.name, "seed": ctx.run.seed},
        "models": names, "specs": models, "skipped": skipped, "kinds": kinds,
        "prompts": {group: len(ids) for group, ids in groups.items()},
        "prompt_ids": groups,
        "too_few_to_compare": {group: len(ids) for group, ids in groups.items() if len(ids) < MIN_PROMPTS},
        "prompt_sources": sources,
        "judged_prompts": len(judged) if comparisons else 0,
        "judge_asr_prompts": len(rated),
        "sets": {name: {"kind": name.split("/")[0], "n": len(ids)} for name, ids in sets.items()},
        "prompts_in_training": {kind: sum(p.id in training for p in prompts if p.kind == kind)
                                for kind in cfg.prompts if kind in kinds},
        "generation": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                       "system_prompt": cfg.system_prompt, "evasive_max_words": cfg.evasive_max_words},
        "reward_model": str(ctx.stage("reward") / "model") if rewards is not None else None,
        "feedback_model": ctx.model_spec(cfg.feedback_model) if comparisons else None,
        "judge_scoring": judge_scoring(ctx.run, cfg.feedback_model) if comparisons else None,
        "judge_principles": {kind: {"set": PRINCIPLE_SETS[kind], "ids": [p.id for p in principles[kind]],
                                    "from": (f"the constitution's evaluation.{PRINCIPLE_SETS[kind]}"
                                             if PRINCIPLE_SETS[kind] in given else
                                             "the constitution's feedback principles" if kind == "red_team" else
                                             "cai's default helpfulness questions")}
                             for kind in kinds} if comparisons else {},
        "per_model": per_model,
        "pairwise": pairwise,
        "paired": paired,
        "bootstrap": {"resamples": RESAMPLES, "level": LEVEL, "seed": ctx.run.seed, "unit": "prompt",
                      "method": "percentile bootstrap; paired: both models' figures on the same resampled prompts"},
        "principles": principle_tables(ctx, comparisons, revision_rewards),
        "principle_win_rates": principle_win_rates(comparisons, ctx.run.seed),
        "methods": methods(anchor, cfg.evasive_max_words),
    }
    atomic_write_json(ctx.dir / "results.json", results)
    if distributed.is_main():
        print(format_summary(results))
    return {"models": len(names), "skipped_models": sorted(skipped), "prompts": len(prompts),
            "generations": len(generations), "comparisons": len(comparisons),
            "reward_scored": rewards is not None, "revisions_scored": len(revision_rewards)}

