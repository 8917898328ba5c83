"""Engines: the one way data stages reach a model (see `base.py` for the interface).

A model reference that a data stage resolves is either weights (`builtin:...`, a
folder, a hub id: `TransformersEngine`, loaded in-process) or `server:NAME`, a server
declared under the run config's `servers:` section (`OpenAIEngine`).
"""

from __future__ import annotations

from cai.engines.base import Capabilities, Completion, Engine, EngineError, Sampling, is_degenerate

SERVER_PREFIX = "server:"

__all__ = ["Capabilities", "Completion", "Engine", "EngineError", "Sampling", "is_degenerate", "SERVER_PREFIX",
           "is_server", "server_name", "open_engine"]


def is_server(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(SERVER_PREFIX)


def server_name(spec: str) -> str:
    return spec[len(SERVER_PREFIX):]


def open_engine(spec: str, run, batch_size: int = 8, options=None) -> Engine:
    """The engine for a resolved model spec; weights are loaded on `run.device` with the
    stage's `cai.models.ModelOptions` (dtype, attention, revision)."""
    if is_server(spec):
        from cai.engines.openai import OpenAIEngine

        name = server_name(spec)
        if name not in run.servers:
            raise ValueError(f"{spec}: no server '{name}' under 'servers:' in the run config "
                             f"(declared: {', '.join(sorted(run.servers)) or 'none'})")
        return OpenAIEngine(run.servers[name], spec)
    from cai.engines.hf import TransformersEngine

    return TransformersEngine.from_spec(spec, run.device, batch_size, options=options)
