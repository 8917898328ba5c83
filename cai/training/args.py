"""TRL configs of the training stages: cai's defaults, the stage's, then the user's keys,
and the checks that run them before any work."""

from __future__ import annotations

from pathlib import Path

from cai.models import cuda_usable


def trl_config(ctx, cls, stage_defaults: dict | None = None):
    """Build a TRL config: cai's defaults (`CAI_TRL_DEFAULTS`), then the stage's, then the
    user's `ctx.trl` keys. Checkpoints go to the stage folder so a killed run resumes from
    the last one."""
    return build_trl_config(ctx.run, ctx.trl, ctx.dir.path, cls, stage_defaults or {})


LEAVE = object()  # cai sets nothing: the TRL config's own default stands


def _on_gpu(run) -> bool:
    return cuda_usable(run.device)


def _cpu_only(value):
    return lambda run, trl: LEAVE if _on_gpu(run) else value


def _checkpointing_on_cpu(run, trl: dict):
    # transformers 5's name (gradient_checkpointing is its deprecated alias, which follows it);
    # a user's value under either name stands
    if _on_gpu(run) or {"gradient_checkpointing", "activation_checkpointing"} & set(trl):
        return LEAVE
    return "auto"


def checkpointing_is_auto(run, trl: dict) -> bool:
    """`activation_checkpointing: auto`, the user's or cai's CPU default: the stage decides
    before training, from its batch and the memory budget (`cai.training.memory`)."""
    return {**cai_trl_defaults(run, trl), **trl}.get("activation_checkpointing") == "auto"


# cai's defaults for every training stage's TRL config, the one place both the stage
# (`build_trl_config`) and `--help` (`cai.help`) read them: key -> (its value, or a
# function of the run and the user's TRL keys giving it or LEAVE; how --help states it
# when it depends on the run, `{trl}` standing for the TRL config's own default).
CAI_TRL_DEFAULTS = {
    "seed": (lambda run, trl: run.seed, "the run's seed"),
    "data_seed": (lambda run, trl: run.seed, "the run's seed"),
    "report_to": (lambda run, trl: run.report_to, "the run's report_to"),
    "run_name": (lambda run, trl: run.run_name or LEAVE, "the run's run_name when set, else {trl}"),
    "logging_steps": (1, None),  # every step: a tiny run has few
    "save_strategy": ("steps", None),
    "save_steps": (50, None),  # a killed run loses at most 50 steps
    "save_total_limit": (1, None),
    "dataloader_num_workers": (0, None),
    "use_cpu": (lambda run, trl: not _on_gpu(run), "true unless a CUDA GPU is used"),
    # TRL defaults both on; on CPU bf16 is slow or unsupported, and checkpointing costs
    # about a third more time on small models
    "bf16": (_cpu_only(False), "false on CPU, {trl} on a CUDA GPU"),
    "fp16": (_cpu_only(False), "false on CPU, {trl} on a CUDA GPU"),
    "activation_checkpointing": (_checkpointing_on_cpu,
                                 "auto on CPU (true, false or auto: on when the batch's activations would not fit "
                                 "the run's memory_budget), gradient_checkpointing's value on a CUDA GPU"),
    "gradient_checkpointing": (lambda run, trl: LEAVE, "auto on CPU (it follows activation_checkpointing), {trl} "
                                                       "on a CUDA GPU"),
}


def cai_trl_defaults(run, trl: dict) -> dict:
    """`CAI_TRL_DEFAULTS`' values for a run."""
    values = {}
    for key, (value, _) in CAI_TRL_DEFAULTS.items():
        value = value(run, trl) if callable(value) else value
        if value is not LEAVE:
            values[key] = value
    return values


def build_trl_config(run, trl: dict, stage_dir: Path, cls, stage_defaults: dict):
    """`trl_config` from its parts, so validation builds the same object without a stage
    context (building one writes nothing)."""
    defaults = {"output_dir": str(Path(stage_dir) / "checkpoints"), **cai_trl_defaults(run, trl)}
    values = {**defaults, **stage_defaults, **trl}
    if values.get("activation_checkpointing") == "auto":  # decided by the stage before training
        values["activation_checkpointing"] = False
    for key, value in values.items():
        if key.endswith("_strategy") and value is False:
            values[key] = "no"  # YAML reads a bare `no` as false
    return cls(**values)


# Ranges of common TRL fields, checked with cai's own (`cai.config.setting`) before any
# work: TRL and transformers accept most out-of-range values and fail mid-training.
TRL_RANGES = {
    **dict.fromkeys(("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "max_length", "max_prompt_length", "max_completion_length", "response_length",
                     "num_mini_batches", "num_generations", "generation_batch_size", "steps_per_generation",
                     "save_total_limit", "num_ppo_epochs", "local_rollout_forward_batch_size"), {"ge": 1}),
    **dict.fromkeys(("learning_rate", "weight_decay", "max_grad_norm", "beta", "kl_coef", "temperature",
                     "num_train_epochs", "warmup_steps"), {"ge": 0}),
    **dict.fromkeys(("warmup_ratio", "label_smoothing"), {"ge": 0, "le": 1}),
    "top_p": {"gt": 0, "le": 1},
    **dict.fromkeys(("logging_steps", "save_steps", "eval_steps"), {"gt": 0}),
}
# Keys cai sets itself: a user value would break a guarantee (checkpoints live in the
# stage folder, so two runs never share or resume each other's).
RESERVED_TRL_KEYS = {"output_dir": "checkpoints always go to the stage folder (RUN_DIR/STAGE/checkpoints), "
                                   "so runs never share them; remove this key"}


def trl_value_problems(doc, section: str, cls, trl: dict) -> list:
    """The user's TRL keys against the config class's field types and `TRL_RANGES`
    (cheap, before the stage's own checks do arithmetic with them)."""
    import typing

    from cai.schema import hint_name, out_of_range, type_ok
    from cai.yamlio import describe

    hints = typing.get_type_hints(cls)
    problems = []
    for key, value in trl.items():
        name = f"{section}.{key}"
        hint = hints.get(key)
        if key in RESERVED_TRL_KEYS:
            problems.append(doc.problem((section, key), f"'{name}': {RESERVED_TRL_KEYS[key]}"))
        elif key == "activation_checkpointing" and value == "auto":
            continue
        elif _simple(hint) and not type_ok(value, hint):
            problems.append(doc.problem((section, key), f"'{name}' must be {hint_name(hint)}, got {describe(value)}"))
        elif (expected := out_of_range(value, TRL_RANGES.get(key, {}), hint)) is not None:
            problems.append(doc.problem((section, key), f"'{name}' must be {expected}, got {value}"))
    return problems


def _simple(hint) -> bool:
    """int, float, bool or str, optionally `| None`: hints cai can check exactly (TRL's
    enum and list fields take strings and lists it converts itself)."""
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
    else:
        args = [hint]
    return len(args) == 1 and args[0] in (int, float, bool, str)


def trl_build_problems(run, section: str, cls, stage_defaults: dict, trl: dict) -> list:
    """Build the stage's TRL config as the stage will (nothing is written) and turn a
    failure into a problem at the key that causes it: each user key is tried alone; if
    none fails alone, the section is named."""
    import warnings

    def attempt(keys: dict) -> str | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation notes are for the real run
                build_trl_config(run, keys, run.path / section, cls, stage_defaults)
        except Exception as err:  # noqa: BLE001 - any failure is the user's value, reported
            return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        return None

    error = attempt(trl)
    if error is None:
        return []
    culprits = {key: message for key in trl if (message := attempt({key: trl[key]})) is not None}
    if not culprits:
        return [run.source.problem((section,), f"'{section}': {cls.__name__} refuses these settings: {error}")]
    return [run.source.problem((section, key), f"'{section}.{key}': {message}") for key, message in culprits.items()]
