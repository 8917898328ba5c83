"""What a stage gets: its step's settings, its folder, the folders of the steps it
reads, and the engines it opens (one per model, shared by the roles that name it).

With `rounds: N`, a stage name means this round's step (`ctx.stage("label")` is
`round2/label` in round 2), `newest_policy()` is round k-1's policy, and the reward model
trains on the labels of every round so far (`every_round_so_far`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cai import registry
from cai.registry import ORDER, in_round, split_step, step_name
from cai.rundir import StageDir
from cai.work import Work


@dataclass
class StageContext:
    run: Any  # cai.config.RunConfig
    name: str  # the stage (`label`); `step` is the stage in its round (`label@2`)
    config: Any
    trl: dict
    dir: StageDir
    config_hash: str
    upstream: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict, repr=False)  # what config_hash is computed from
    model_options: Any = None  # cai.models.ModelOptions: the run's top-level keys, then the stage's
    round: int = 1
    policy: str = "sft"  # the newest policy: sft in round 1, round k-1's after (cai.plan.steps.newest_policy)
    run_steps: tuple = ()  # every step `cai run` runs for this config
    _engines: dict = field(default_factory=dict, repr=False)
    engines_used: list = field(default_factory=list, repr=False)  # what each released engine did
    work: Work = field(default_factory=Work, repr=False)  # what its models computed, counted where they run

    @classmethod
    def of(cls, step, run, run_steps=()) -> StageContext:
        """The context of a planned step (`cai.plan.plan.Step`)."""
        return cls(run, step.name, step.config, step.trl, StageDir(run.path, step.step), step.fingerprint,
                   step.upstream, settings=step.settings, model_options=step.model_options, round=step.round,
                   policy=step.newest_policy, run_steps=tuple(run_steps))

    @property
    def step(self) -> str:
        return self.dir.name

    def run_stage(self) -> dict:
        """The stage's `run(ctx)`: its counts for the manifest; its engines released after,
        however it ends."""
        import importlib

        try:
            return importlib.import_module(registry.stage(self.name).module).run(self) or {}
        finally:
            self.release()

    def stage(self, name: str) -> StageDir:
        """A stage's folder as this step sees it: a per-round stage's in this round
        (`label` in round 2 is `round2/label`), `NAME@K` in round K."""
        return StageDir(self.run.path, in_round(name, self.round))

    def every_round_so_far(self, name: str) -> list[StageDir]:
        """A per-round stage's folder in each round up to this one (round 1 first)."""
        return [StageDir(self.run.path, step_name(name, k)) for k in range(1, self.round + 1)]

    def every_round(self, name: str) -> list[str]:
        """The names of a per-round stage's steps over all rounds, as model references:
        `rl` with one round, `rl@1`, `rl@2`, ... with several; any other name as is."""
        if name not in registry.ROUND_STAGES or self.run.rounds == 1:
            return [name]
        return [f"{name}@{k}" for k in range(1, self.run.rounds + 1)]

    def newest_policy(self) -> str:
        """The default policy of this step: sft in round 1, round k-1's after."""
        return self.policy

    def model_spec(self, spec: str | None, default: str = "base") -> str:
        """Resolve a model reference: `base` (the run's model), a stage name whose
        `model/` folder it means (`sft`, `rl`, `dpo`, `reward`; a per-round stage's in
        this round, `rl@K` round K's), or any model spec."""
        spec = spec or default
        if spec == "base":
            return self.run.model
        if split_step(spec)[0] in ORDER:
            stage = self.stage(spec).require(f"its model is needed by {self.step}")
            return str(stage.saved_model() or stage.path / "model")
        return spec

    def engine(self, reference: str | None, batch_size: int = 8):
        """The engine of a model reference (see `model_spec`), opened once per stage:
        roles that name the same model (a policy that also judges) share it."""
        from cai.engines import open_engine

        spec = self.model_spec(reference)
        if spec not in self._engines:
            self._engines[spec] = open_engine(spec, self.run, batch_size, self.model_options)
            self._engines[spec].work = self.work
        return self._engines[spec]

    def release(self, reference: str | None = None) -> None:
        """Close one engine (or all), freeing its weights before the next is loaded."""
        import gc

        specs = [self.model_spec(reference)] if reference is not None else list(self._engines)
        for spec in specs:
            engine = self._engines.pop(spec, None)
            if engine is not None:
                self.engines_used.append(engine.describe())
                engine.close()
        gc.collect()

    @cached_property
    def constitution(self):
        from cai.constitution import load_constitution

        return load_constitution(self.run.constitution_path())

    @cached_property
    def prompts(self):
        from cai.prompts import load_splits

        return load_splits(self.run.prompts, self.run.seed, self.run.source)
