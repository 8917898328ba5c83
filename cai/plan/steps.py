"""Which steps a command runs, in which round, and what each reads from the others.

The stages, their order, their upstream and which of them run per round are
`cai.registry`'s. With `rounds: N`, round k >= 2 repeats label, reward, rl and dpo in
`roundK/`: a stage name there means that round's step (`label` is `label@2` in round 2),
the newest policy is round k-1's (`newest_policy`), and evaluate, after the rounds,
reads every round's steps.
"""

from __future__ import annotations

from cai import registry
from cai.registry import ORDER, in_round, round_of, split_step, step_command, step_name
from cai.schema import applies
from cai.yamlio import Problem, ValidationError, problem


def default_stages(run) -> list[str]:
    """The steps `cai run` runs: all stages, but rl and dpo only when their section is
    present (rl is the default when neither is). rl with `reward: judge` needs no reward
    model: then reward runs only when its section is present (evaluate scores with it),
    and label only when reward (without `reward.preferences`) or dpo runs or its section
    is present. With `rounds: N` the per-round ones repeat N times (`cai.registry.steps`)."""
    chosen = registry.optimisers(run.stages)
    wanted = {"critique", "sft", "evaluate", *chosen}
    judge_reward = "rl" in chosen and run.stages.get("rl", {}).get("reward") == "judge"
    if not judge_reward or "reward" in run.stages:
        wanted.add("reward")
    reads_labels = not (run.stages.get("reward") or {}).get("preferences")  # else it reads a file of pairs
    if ("reward" in wanted and reads_labels) or "dpo" in wanted or "label" in run.stages:
        wanted.add("label")
    return registry.steps([s for s in ORDER if s in wanted], run.rounds)


def select_stages(run, start: str | None, until: str | None) -> list[str]:
    """The stages `--from START --until UNTIL` selects (a usage error names the flag)."""
    stages = default_stages(run)
    problems = [Problem(flag, None, f"'{bound}' is not one of this run's stages ({', '.join(stages)})"
                        + _rounds_note(run, bound))
                for flag, bound in (("--from", start), ("--until", until)) if bound is not None and bound not in stages]
    if not problems and start and until and stages.index(start) > stages.index(until):
        problems.append(Problem("--from", None, f"'{start}' comes after --until '{until}' "
                                                f"(stage order: {', '.join(stages)}), so nothing would run"))
    if problems:
        raise ValidationError(problems)
    begin = stages.index(start) if start else 0
    end = stages.index(until) + 1 if until else len(stages)
    return stages[begin:end]


def _rounds_note(run, bound: str) -> str:
    """Why a `STAGE@K` past the config's rounds is not a step: `rounds` says how many."""
    name, number = split_step(bound)
    if number is None or number <= run.rounds or name not in registry.BY_NAME:
        return ""
    if not registry.stage(name).per_round:
        return f": {name} runs once, not per round"
    rounds = "round 1" if run.rounds == 1 else f"rounds 1 to {run.rounds}"
    return f": the config has rounds: {run.rounds}, so {name} runs in {rounds} (raise rounds to run round {number})"


def newest_policy(run, name: str, round_number: int) -> str:
    """The policy a step starts from or samples with when its config names none: sft in
    round 1; in round k, round k-1's model of the same optimiser (rl from rl, dpo from
    dpo), or for another stage (label) round k-1's rl, else its dpo: `rl@1`, a reference
    that means round 1's rl in any round."""
    if round_number <= 1:
        return "sft"
    chosen = registry.optimisers(run.stages)
    source = name if name in chosen else chosen[0]
    return f"{source}@{round_number - 1}"


def upstream_steps(run, step: str, cfg) -> list[str]:
    """The steps whose outputs a step reads: its stage's upstream in its round, and in
    round k >= 2 the newest policy (round k-1's). Evaluate, after the rounds, reads every
    round's steps. With one round these are the stage names, as before rounds existed."""
    name = split_step(step)[0]
    round_number = round_of(step, run.rounds)
    found = []
    for up in registry.stage(name).upstream_of(cfg):
        if registry.stage(up).per_round and not registry.stage(name).per_round:
            found += [step_name(split_step(up)[0], k) for k in range(1, run.rounds + 1)]
        else:
            found.append(in_round(up, round_number))
    if registry.stage(name).per_round and round_number > 1:
        found.append(in_round(newest_policy(run, name, round_number), round_number))
    return list(dict.fromkeys(found))


# What a stage reads from other stages besides the models it names: (stage, why).
DATA_READS = {"sft": (("critique", "its sft.jsonl is the training set"),),
              "reward": (("label", "its prefs.jsonl is the training set"),),
              "dpo": (("label", "its prefs.jsonl is the training set"),)}
# A model role left null means this stage's model.
NULL_ROLES = {"policy": "sft", "reward_model": "reward"}


def required_stages(name: str, cfg) -> list[tuple[str, str]]:
    """The stages `name` cannot run without, and why: the data it reads (DATA_READS, when
    upstream in this config: reward with `preferences` reads no labels; critique's pairs
    with `mix_critique_pairs`) and every stage its model roles name (evaluate's `models`
    aside: it skips a stage that has not run)."""
    from cai.plan.sections import config_values

    upstream = registry.stage(name).upstream_of(cfg)
    needed = [(stage, why) for stage, why in DATA_READS.get(name, ()) if stage in upstream]
    if getattr(cfg, "mix_critique_pairs", False):
        needed.append(("critique", "mix_critique_pairs reads its prefs.jsonl"))
    for f, item in config_values(cfg):
        if (not f.metadata.get("model_reference") or not applies(cfg, f)  # rl's reward_model with reward: judge
                or (name, f.name) == ("evaluate", "models")):
            continue
        item = NULL_ROLES.get(f.name) if item is None else item
        if item in ORDER and item != name:
            needed.append((item, f"its model is {name}.{f.name}"))
    return list(dict.fromkeys(needed))


def required_steps(run, step: str, cfg) -> list[tuple[str, str]]:
    """`required_stages` as the steps of this step's round."""
    round_number = round_of(step, run.rounds)
    return [(in_round(up, round_number), why) for up, why in required_stages(split_step(step)[0], cfg)]


def cycle_problems(run, configs: dict) -> list[Problem]:
    """Steps that need each other in a loop, named as the cycle they are
    (`label -> rl -> reward -> label`) with the reason of each arrow, at the key of the
    first: no `--from` can run them. `configs`: {stage: Config} of the run's stages."""
    steps = default_stages(run)
    edges = {step: [(up, why) for up, why in required_steps(run, step, configs[split_step(step)[0]]) if up in steps]
             for step in steps if split_step(step)[0] in configs}

    def cycle_from(start: str) -> list[tuple[str, str]] | None:
        stack = [(start, [])]
        visited = set()
        while stack:
            step, path = stack.pop()
            for up, why in edges.get(step, ()):
                if up == start:
                    return path + [(step, why)]
                if up not in visited:
                    visited.add(up)
                    stack.append((up, path + [(step, why)]))
        return None

    problems, seen = [], set()
    for start in steps:
        cycle = cycle_from(start)
        if not cycle or frozenset(s for s, _ in cycle) in seen:
            continue
        seen.add(frozenset(s for s, _ in cycle))
        arrows = " -> ".join(f"{step} ({why})" for step, why in cycle) + f" -> {start}"
        step, why = cycle[0]
        role = why.removeprefix("its model is ")
        where = tuple(role.split(".")) if role != why else (split_step(step)[0],)
        hint = "; with rounds: N, round k can name round k-1's model (rl@1)" if run.rounds == 1 else ""
        problems.append(problem(run.source, where, f"these steps need each other in a cycle, so no order (no --from) "
                                                   f"can run them: {arrows}. Name a model that exists before "
                                                   f"{step} instead{hint}"))
    return problems


def upstream_problems(run, selected: list[str], configs: dict, flag: str | None = None) -> list[Problem]:
    """Every step a selected step needs (in its round) has completed in the run folder or
    runs before it in this command: checked before any stage folder is made. `flag`: the
    `--from` argument of `cai run` (None: a single step's command)."""
    from cai.rundir import StageDir

    problems, will_run = [], set()
    for step in selected:
        name = split_step(step)[0]
        for needed, why in required_steps(run, step, configs[name]):
            if needed in will_run or StageDir(run.path, needed).complete():
                continue
            up = split_step(needed)[0]
            advice = f"start from it (--from {up})" if flag else f"run `{step_command(needed)}` first"
            problems.append(Problem(flag or step_command(step), None,
                                    f"{name} needs stage '{needed}' ({why}), which has not completed in {run.path}: "
                                    f"{advice}"))
        will_run.add(step)
    return problems
