"""What the plan checks besides each section's own keys: the device, every model a
config names, the prompt files and splits, the constitution and what the stages ask of
it, the packages a setting needs, and settings that would leave a stage nothing to do.
Nothing here loads weights, reaches a network (hub ids are looked up in the local cache
under `--check`) or writes."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

from cai import registry
from cai.engines import is_server
from cai.registry import MODEL_STAGES, ORDER, PROMPTED_BASE, TRAINING_STAGES, split_step
from cai.yamlio import Problem, ValidationError, problem


def device_problems(run) -> list[Problem]:
    from cai.models import device_problem

    reason = device_problem(run.device)
    return [] if reason is None else [problem(run.source, ("device",), reason)]


def reference_problems(run, name: str, cfg) -> list[Problem]:
    """Every model a stage's config names (fields marked `model_reference`) exists: a
    stage name, a declared server (`sections.server_problems`) or a model spec
    `models.spec_problem` accepts. A stage that is not part of this run is not an error
    here (evaluate skips it)."""
    from cai.plan.sections import config_values

    problems = []
    for f, item in config_values(cfg):
        if f.metadata.get("model_reference") and item is not None and not is_server(item):
            problems += model_problems(run, (name, f.name), item)
    return problems


# The hub's legacy ids without an owner (gpt2, bert-base-uncased, ...) now live under one;
# transformers still redirects some, cai's checks need the full id. By the id's first word.
LEGACY_HUB_OWNERS = {"gpt2": "openai-community", "openai": "openai-community", "distilgpt2": "distilbert",
                     "distilbert": "distilbert", "bert": "google-bert", "roberta": "FacebookAI",
                     "xlm": "FacebookAI", "t5": "google-t5", "albert": "albert", "ctrl": "Salesforce"}


def model_problems(run, key: tuple, reference: str) -> list[Problem]:
    from cai.models import spec_problem

    where = ".".join(key)
    stage_role = key != ("model",)  # the run's own model must be weights, not a stage
    if reference == PROMPTED_BASE:
        return [] if key == ("evaluate", "models") else [problem(
            run.source, key, f"'{where}': '{PROMPTED_BASE}' (the base model prompted with the constitution) is a "
                             f"model evaluate.models may list, not a model for {where}: write base")]
    name, number = split_step(reference)
    if stage_role and number is not None and name in MODEL_STAGES:
        if not registry.stage(name).per_round:
            return [problem(run.source, key, f"'{where}': '{reference}': {name} runs once, not per round; "
                                             f"name it '{name}'")]
        if not 1 <= number <= run.rounds:
            return [problem(run.source, key, f"'{where}': '{reference}' names round {number}, but this run has "
                                             f"rounds: {run.rounds}")]
        return []
    if stage_role and reference in MODEL_STAGES:
        return []
    if stage_role and reference in ORDER:
        return [problem(run.source, key, f"'{where}': stage '{reference}' saves no model "
                                         f"(stages with a model: {', '.join(MODEL_STAGES)})")]
    if "/" not in reference and ":" not in reference and not Path(reference).expanduser().exists():
        model = "a model (builtin:NAME, an existing folder, or a hub id owner/name)"
        what = f"neither a stage name ({', '.join(MODEL_STAGES)}) nor {model}" if stage_role else f"not {model}"
        close = difflib.get_close_matches(reference, MODEL_STAGES if stage_role else [], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        if not close and (owner := LEGACY_HUB_OWNERS.get(reference.split("-")[0])) is not None:
            hint = f"; the hub moved its old ids without an owner under one: write {owner}/{reference}"
        return [problem(run.source, key, f"'{where}': '{reference}' is {what}{hint}")]
    if run.cache_only:  # --check: a hub id is looked up in the cache, never on the hub
        if (reason := spec_problem(reference, hub=False)) is not None:
            return [problem(run.source, key, f"'{where}': {reason}")]
        if hub_id_uncached(reference):
            from cai.prompts import NotCached

            return [NotCached(*run.source.where(key), f"'{where}': model {reference} is not in the local Hugging "
                                                      f"Face cache (cai --check reads caches only; a run fetches "
                                                      f"it over a network)")]
        return []
    if (reason := spec_problem(reference)) is not None:
        return [problem(run.source, key, f"'{where}': {reason}")]
    return []


def hub_id_uncached(reference: str) -> bool:
    """A hub id (owner/name, no such local path) whose config is not in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    if reference.startswith("builtin:") or Path(reference).expanduser().exists():
        return False
    try:
        return not isinstance(try_to_load_from_cache(reference, "config.json"), str)
    except ValueError:  # not a well-formed hub id: not in any cache either
        return True


def prompt_problems(run, names: list[str]) -> list[Problem]:
    """The prompt files read and checked line by line, and no stage that will run left
    with nothing to do: training prompts for critique, label and rl, held-out ones for evaluate."""
    from cai.prompts import load_splits

    needed = {name: registry.stage(name).prompts for name in dict.fromkeys(split_step(s)[0] for s in names)}
    needed = {name: split for name, split in needed.items() if split}
    if not needed:
        return []
    try:
        splits = load_splits(run.prompts, run.seed, run.source, cache_only=run.cache_only)
    except ValidationError as err:
        return err.problems
    needs = set(needed.values())
    fraction = run.prompts.eval_fraction
    problems = []
    if "train" in needs and not splits.red_team_train:
        users = ", ".join(n for n, split in needed.items() if split == "train")
        problems.append(problem(run.source, ("prompts", "eval_fraction"), (
            f"'prompts.eval_fraction': no red-team training prompts for {users}: every prompt of "
            f"{run.prompts.red_team} "
            f"falls in the eval split (eval_fraction {fraction}); add prompts or lower eval_fraction")))
    if "eval" in needs:
        problems += eval_split_problems(run, splits)
    return problems


def eval_split_problems(run, splits) -> list[Problem]:
    """Every kind evaluate measures has held-out prompts: red-team prompts (harmlessness)
    and, when `prompts.helpful` is set, helpful ones (helpfulness). A kind whose split is
    empty is refused, never dropped from the results in silence; a file in
    `evaluate.prompts.KIND` replaces that kind's split (its own checks are evaluate's)."""
    own = (run.stages.get("evaluate") or {}).get("prompts")
    own = own if isinstance(own, dict) else {}
    fraction = run.prompts.eval_fraction
    held_out = {"red_team": (run.prompts.red_team, splits.red_team_eval),
                "helpful": (run.prompts.helpful, splits.helpful_eval)}
    problems = []
    for kind, (source, prompts) in held_out.items():
        if source is None or kind in own or prompts:
            continue
        measure = "harmlessness" if kind == "red_team" else "helpfulness"
        problems.append(problem(run.source, ("prompts", "eval_fraction"), (
            f"'prompts.eval_fraction': no held-out {kind} prompts for evaluate ({measure} would not be measured): "
            f"eval_fraction {fraction} puts none of the prompts of {source} in the eval split; raise it, add "
            f"prompts, or name a prompt file in evaluate.prompts.{kind}")))
    return problems


def load_constitution(run):
    """(the constitution or None, its problems): a file that is missing or has problems
    is a refusal at the `constitution` key or at the file's own lines."""
    from cai.constitution import check_constitution

    path = run.constitution_path()
    if not path.is_file():
        return None, [problem(run.source, ("constitution",), f"'constitution': no such file {run.constitution}")]
    return check_constitution(path)


def few_shot_problems(run, sections: dict, constitution) -> list[Problem]:
    """Few-shot counts above the examples the constitution has: the stage would show fewer
    than it says (critique's `few_shot`, a judge's `feedback_few_shot` where the judge is used)."""
    problems = []
    have = {"critique_examples": len(constitution.critique_examples),
            "feedback_examples": len(constitution.feedback_examples)}
    for name, section in sections.items():
        parts = registry.stage(name).constitution_of(section.config)
        for key, part in (("few_shot", "critique_examples"), ("feedback_few_shot", "feedback_examples")):
            asked = getattr(section.config, key, None)
            if part in parts and asked is not None and asked > have[part]:
                kind = part.split("_")[0]
                problems.append(problem(run.source, (name, key),
                                        f"'{name}.{key}': {asked} {kind} examples asked for, but the constitution "
                                        f"{run.constitution} has {have[part]}; lower it or add examples"))
    return problems


# `report_to` names and the package each needs (what transformers' integrations import).
TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio", "mlflow": "mlflow",
                    "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "neptune": "neptune",
                    "swanlab": "swanlab", "codecarbon": "codecarbon", "azure_ml": "azureml"}


def training_problems(run, sections: dict) -> list[Problem]:
    """A training stage's settings that would fail or do nothing only once it runs: a
    tracker whose package is not installed (`report_to`), no epoch to train, a DPO filter
    that keeps no pair."""
    problems = []
    for name, section in sections.items():
        if name not in TRAINING_STAGES:
            continue
        where = (name, "report_to") if "report_to" in section.trl else ("report_to",)
        value = section.trl.get("report_to", run.report_to)
        for tracker in [value] if isinstance(value, str) else value or []:
            package = TRACKER_PACKAGES.get(tracker)
            if package is not None and importlib.util.find_spec(package) is None:
                problems.append(problem(run.source, where, f"'{'.'.join(where)}': {tracker} needs the {package} "
                                                           f"package, which is not installed: pip install {package}, "
                                                           f"or report_to: none"))
        epochs, steps = section.trl.get("num_train_epochs"), section.trl.get("max_steps", -1)
        if epochs is not None and epochs == 0 and (steps is None or steps <= 0):
            problems.append(problem(run.source, (name, "num_train_epochs"),
                                    f"'{name}.num_train_epochs': 0 trains nothing (and no max_steps is set): "
                                    f"{name} would save its starting model as if trained"))
        cfg = section.config
        if (name == "dpo" and cfg.soft_labels == "threshold" and cfg.min_confidence >= 1
                and not cfg.mix_critique_pairs):
            problems.append(problem(run.source, ("dpo", "min_confidence"),
                                    "'dpo.min_confidence': 1 keeps only pairs whose label is certain (p_chosen "
                                    "exactly 1), which a judge's soft labels are not: dpo would keep no pair; lower "
                                    "it, or set mix_critique_pairs: true"))
    return problems
