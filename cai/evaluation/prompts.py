"""The prompts an evaluation answers: each kind's held-out split, or the sources
`evaluate.prompts` names (a file, a datasets folder, `builtin:harmbench`, ...), where a
kind given several sources also reports each source as its own set, KIND/NAME.
"""

from __future__ import annotations

from pathlib import Path

from cai.evaluation.figures import GROUPS, KINDS

HELD_OUT = "held-out"  # in evaluate.prompts: the run's held-out split of that kind


def prompt_problems(run, cfg, problem) -> list:
    """What is wrong with `evaluate.prompts` and the settings naming prompt sets
    (`judge_prompts`, `reward_prompts`, `judge_asr_prompts`), every line of every file
    read, before any work. `problem(key, message)` places a message at its config key."""
    from cai.yamlio import ValidationError

    problems = []
    for kind, spec in cfg.prompts.items():
        specs = spec if isinstance(spec, list) else [spec]
        if kind not in KINDS:
            problems.append(problem(("prompts", kind), f"'evaluate.prompts': unknown prompt kind '{kind}' "
                                                       f"(expected {' or '.join(KINDS)})"))
        elif not specs or not all(isinstance(s, dict) or isinstance(s, str) and s.strip() for s in specs):
            problems.append(problem(("prompts", kind), f"'evaluate.prompts.{kind}' must be a prompt source "
                                                       f"(a .jsonl/.txt file, a datasets folder, builtin:NAME, "
                                                       f"a mapping {{dataset: ID, split: ..., column: ...}} or "
                                                       f"{HELD_OUT}) or a non-empty list of them"))
        elif any(specs.count(s) > 1 for s in specs):
            problems.append(problem(("prompts", kind), f"'evaluate.prompts.{kind}' lists a source twice: {specs}"))
    known = set(GROUPS) | {set_name(kind, spec) for kind in KINDS for spec in source_specs(cfg, kind)
                           if not problems and len(source_specs(cfg, kind)) > 1}
    for key in ("judge_prompts", "reward_prompts", "judge_asr_prompts"):
        for name in getattr(cfg, key) or []:
            if not problems and name not in known:
                problems.append(problem(key, f"'evaluate.{key}': no prompt set '{name}' (known: "
                                             f"{', '.join(sorted(known))})"))
            elif not problems and key == "judge_asr_prompts" and name.split("/")[0] != "red_team":
                problems.append(problem(key, f"'evaluate.judge_asr_prompts': '{name}' is not a red-team set: "
                                             "the harmful verdict is asked of red-team prompts only"))
    if not problems and cfg.prompts:
        try:  # every line of every file, before any work
            sources = {kind: source_prompts(run, cfg, kind) for kind in cfg.prompts}
        except ValidationError as err:
            return problems + err.problems
        if len(sources) == 2 and (both := {p.id for p in sources["red_team"]} & {p.id for p in sources["helpful"]}):
            text = next(p.text for p in sources["red_team"] if p.id in both)
            problems.append(problem("prompts", f"'evaluate.prompts': {len(both)} prompt(s) are in both the red_team "
                                               f"and the helpful file, e.g. {text[:60]!r}; a prompt has one kind"))
    return problems


def source_specs(cfg, kind: str) -> list:
    """The sources `evaluate.prompts.KIND` names, as a list ([held-out] when it names none)."""
    spec = cfg.prompts.get(kind, HELD_OUT)
    return list(spec) if isinstance(spec, list) else [spec]


def set_name(kind: str, spec) -> str:
    """A prompt set's name in the results: KIND/NAME (builtin:harmbench -> red_team/harmbench,
    a file -> its stem, a {dataset: OWNER/NAME} mapping -> NAME)."""
    if isinstance(spec, dict):
        return f"{kind}/{Path(str(spec.get('dataset'))).name}"
    short = spec if spec == HELD_OUT else spec.removeprefix("builtin:") if spec.startswith("builtin:") else \
        Path(spec).stem
    return f"{kind}/{short}"


def source_prompts(run, cfg, kind: str) -> list:
    """The prompts of the sources `evaluate.prompts.KIND` names, held-out aside (a bad
    line is a problem at its line)."""
    from cai.prompts import load_source

    return [p for spec in source_specs(cfg, kind) if spec != HELD_OUT
            for p in load_source(spec, kind, run.source, key=("evaluate", "prompts", kind),
                                 cache_only=run.cache_only)]


def evaluation_prompts(ctx, cfg) -> tuple[list, dict[str, str], dict[str, list[str]]]:
    """The prompts to evaluate on, where each kind's come from (the held-out split, or
    the sources of `evaluate.prompts`, all their prompts, in file order), and the prompt
    ids of each set (KIND/NAME) of a kind with more than one source. A prompt in two sets
    of one kind is evaluated once, in the first."""
    from cai.prompts import load_source

    held_out = {"red_team": ctx.prompts.red_team_eval, "helpful": ctx.prompts.helpful_eval}
    configured = {"red_team": ctx.run.prompts.red_team, "helpful": ctx.run.prompts.helpful}
    prompts, sources, sets = [], {}, {}
    for kind in KINDS:
        specs, named = source_specs(cfg, kind), []
        taken: set[str] = set()
        for spec in specs:
            if spec == HELD_OUT:
                chosen = held_out[kind]
                named.append(f"held-out split of {configured[kind]}")
            else:
                chosen = load_source(spec, kind, ctx.run.source, key=("evaluate", "prompts", kind),
                                     cache_only=ctx.run.cache_only)
                named.append(f"evaluate.prompts.{kind}: {spec}")
            chosen = [p for p in chosen if p.id not in taken]
            taken |= {p.id for p in chosen}
            prompts += chosen
            if len(specs) > 1 and chosen:
                sets[set_name(kind, spec)] = [p.id for p in chosen]
        sources[kind] = "; ".join(named)
    seen: dict[str, str] = {}
    for prompt in prompts:
        if seen.setdefault(prompt.id, prompt.kind) != prompt.kind:
            raise ValueError(f"the prompt {prompt.text[:60]!r} is both a red-team and a helpful evaluation prompt "
                             f"({sources['red_team']}; {sources['helpful']}): a prompt has one kind")
    return (prompts, {kind: source for kind, source in sources.items() if any(p.kind == kind for p in prompts)},
            sets)


def prompt_groups(prompts, sets: dict[str, list[str]]) -> dict[str, list[str]]:
    """{group: prompt ids}: each kind that has prompts, then its sets (KIND/NAME), then `all`."""
    groups = {}
    for kind in KINDS:
        if any(p.kind == kind for p in prompts):
            groups[kind] = [p.id for p in prompts if p.kind == kind]
            groups.update({name: ids for name, ids in sets.items() if name.startswith(kind + "/")})
    groups["all"] = [p.id for p in prompts]
    return groups
