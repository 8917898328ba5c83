"""Fingerprints: what a step's outputs depend on, hashed, and what changed, in words.

It imports only the names of a constitution's parts (`cai.constitution`). A fingerprint is of meaning, not of bytes: the
constitution enters as the parts a stage uses (`cai.registry.Stage.constitution`), each
principle and example by its own digest, so an edited comment changes nothing and a
refusal can say `principle 'cruelty': critique text changed`; settings that change where a
run logs or saves (`NON_RESULT_TRL_KEYS`), and model options that do not change outputs
(`MODEL_OPTIONS_NOT_HASHED`), stay out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from cai.constitution import EXAMPLE_PARTS, PART_WORDS, PRINCIPLE_PARTS


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def digest(value: Any) -> str:
    """A short digest of a text or a JSON-able value (a principle's text, an example)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# TRL settings that change where and how often a run logs, saves or reports, never what
# it computes: they stay out of the config hash, so changing them does not redo a stage.
NON_RESULT_TRL_KEYS = {"report_to", "run_name", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node",
                       "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
                       "dataloader_prefetch_factor", "include_num_input_tokens_seen", "include_tokens_per_second"}
NON_RESULT_TRL_PREFIXES = ("logging_", "save_", "push_to_hub", "hub_")

# Model options a stage's outputs do not depend on.
MODEL_OPTIONS_NOT_HASHED = ("keep_checkpoints", "compile_generation")

# A server's settings that can change results (not where it is or how it is reached).
SERVER_RESULT_KEYS = ("model", "assistant_prefill", "option_scoring", "top_logprobs")


def changes_results(trl_key: str) -> bool:
    return trl_key not in NON_RESULT_TRL_KEYS and not trl_key.startswith(NON_RESULT_TRL_PREFIXES)


def model_options_fingerprint(options: Any) -> dict:
    """The model options that differ from the defaults and change what a stage produces
    (only those, so runs with default settings keep their hashes)."""
    default = type(options)()
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if f.name not in MODEL_OPTIONS_NOT_HASHED and getattr(options, f.name) != getattr(default, f.name)}


def server_fingerprint(server: Any) -> dict:
    return {key: getattr(server, key) for key in SERVER_RESULT_KEYS}


def shared_fingerprint(run: Any, path: Any = lambda value: value) -> dict:
    """The run's shared keys a stage's outputs depend on (threads, device and hub_kernels
    do not change results beyond rounding; the constitution enters per stage). `path`:
    a file's or folder's name -> what it means (its absolute path), so the same files
    named from another folder are the same run."""
    prompts = dataclasses.asdict(run.prompts)
    for key in ("red_team", "helpful"):
        if isinstance(prompts[key], dict) and "dataset" in prompts[key]:
            prompts[key] = {**prompts[key], "dataset": path(prompts[key]["dataset"])}
        else:
            prompts[key] = path(prompts[key])
    return {"seed": run.seed, "model": path(run.model), "prompts": prompts}


ORDER_KEY = "(order)"


def constitution_fingerprint(constitution: Any, parts: tuple[str, ...]) -> dict:
    """The parts of a constitution a stage uses, by meaning: each principle's texts and
    each example by digest, and the order of the principles (they are drawn from a list)."""
    out: dict[str, Any] = {}
    for part in parts:
        if part in ("system_prompt", "name"):
            out[part] = digest(getattr(constitution, part)) if getattr(constitution, part) else None
        elif part in PRINCIPLE_PARTS:
            principles = getattr(constitution, part)
            out[part] = {ORDER_KEY: digest([p.id for p in principles]),
                         **{p.id: {key: digest(getattr(p, key)) for key in PRINCIPLE_PARTS[part]} for p in principles}}
        elif part in EXAMPLE_PARTS:
            out[part] = {str(n): digest(dataclasses.asdict(example))
                         for n, example in enumerate(getattr(constitution, part), start=1)}
        else:
            raise ValueError(f"unknown constitution part {part!r}")
    return out


def step_settings(stage: str, shared: dict, constitution: dict, config: dict, trl: dict, upstream: dict,
                  servers: dict, model_options: dict) -> dict:
    """Everything a step's config hash is computed from (kept in its marker and manifest,
    so a refusal can say which setting changed)."""
    body = {"stage": stage, "shared": shared, "constitution": constitution, "config": config,
            "trl": {key: value for key, value in trl.items() if changes_results(key)}, "upstream": upstream}
    if servers:
        body["servers"] = servers
    if model_options:
        body["model_options"] = model_options
    return body


def own_settings(settings: dict) -> dict:
    """A step's settings without its upstream steps' hashes: what its own config says."""
    return {key: value for key, value in settings.items() if key != "upstream"}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}



def _constitution_line(key: str, old: Any, new: Any) -> str:
    """`principle 'cruelty': critique text changed`, from a flat key of the constitution part."""
    part, _, rest = key.removeprefix("constitution.").partition(".")
    if part in ("system_prompt", "name", "constitution_sha256"):
        return {"system_prompt": "constitution: system prompt changed", "name": "constitution: name changed"}.get(
            part, "constitution: file changed")
    words = PART_WORDS.get(part, part)
    name, _, field = rest.partition(".")
    if name == ORDER_KEY:
        return f"constitution: the order of the {words}s changed"
    shown = f"{words} {name}" if part in EXAMPLE_PARTS else f"{words} '{name}'"
    if old == "(not set)":
        return f"{shown}: added" if not field or field == PRINCIPLE_PARTS.get(part, ("",))[0] else ""
    if new == "(not set)":
        return f"{shown}: removed" if not field or field == PRINCIPLE_PARTS.get(part, ("",))[0] else ""
    return f"{shown}: {field} text changed" if field else f"{shown}: changed"


def settings_diff(before: dict, now: dict) -> list[str]:
    """`key: old -> new` for every setting that entered the old and the new config hash
    differently (`before`: the old manifest or marker); a constitution part in words
    (`principle 'cruelty': critique text changed`); an upstream stage redone as such."""
    if "settings" not in before:  # written before cai kept the hashed settings: what the manifest has
        old = {k: before.get(k) for k in ("config", "trl", "shared", "upstream")}
        now = {k: now.get(k) for k in ("config", "trl", "shared", "upstream")}
    else:
        old = before["settings"]
    flat_old, flat_now = _flat(old), _flat(now)
    lines = []
    for key in sorted(set(flat_old) | set(flat_now)):
        a, b = flat_old.get(key, "(not set)"), flat_now.get(key, "(not set)")
        if a == b:
            continue
        if key.startswith(("constitution.", "shared.constitution_sha256")):
            line = _constitution_line(key.replace("shared.", "constitution.", 1), a, b)
            if line and line not in lines:
                lines.append(line)
            continue
        shown = key.removeprefix("shared.").removeprefix("config.").removeprefix("trl.")
        if key.startswith("upstream."):
            step = key.split(".", 1)[1]
            shown = (f"upstream stage '{step}' (its config hash: it was redone)" if a != "(not set)" and
                     b != "(not set)" else f"upstream stage '{step}' ({'new' if a == '(not set)' else 'gone'})")
        elif key.startswith(("config.", "trl.", "model_options.")):
            shown = f"{before.get('stage', now.get('stage'))}.{shown.removeprefix('model_options.')}"
        lines.append(f"{shown}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return lines or ["(no setting differs: the stage's code changed how its settings are hashed)"]
