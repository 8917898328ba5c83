"""SL-CAI fine-tuning: supervised learning on the final revisions (Bai et al. 2022, 3.1).

The model is fine-tuned with TRL's SFTTrainer on prompt -> final revision, optionally
mixed with its own answers to helpful prompts so it stays helpful (the paper mixes in
helpfulness samples). The loss is on the assistant turn only: rows are given to TRL
in prompt/completion form, which masks the prompt whatever the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass

from cai.chunks import ChunkLedger, chunk_seed, chunked_by_length, run_chunks
from cai.engines import Sampling, is_degenerate
from cai.rundir import read_jsonl
from cai.schema import setting


def TRL_CONFIG():
    from trl import SFTConfig

    return SFTConfig


def trl_settings(cfg) -> tuple[type, dict]:
    """The TRL config class and cai's defaults for it (the user's `sft:` keys override them)."""
    from trl import SFTConfig

    # loss_type nll: the revisions' negative log-likelihood, SL-CAI's loss (TRL 1.12's default,
    # chunked_nll, is the same maths; 1.15 made nll the default and deprecated chunked_nll).
    return SFTConfig, {"max_length": 1024, "completion_only_loss": True, "loss_type": "nll"}


@dataclass
class Config:
    model: str | None = setting(None, "the model to fine-tune: null = the run's model, or a model spec",
                                model_reference=True)
    helpful_prompts: int = setting(0, "helpful train prompts answered by the model and mixed in (0 = none)", ge=0)
    helpful_max_new_tokens: int = setting(128, "length of those answers", ge=1)
    helpful_temperature: float = setting(0.7, "their sampling temperature (0 = greedy)", ge=0)
    generation_batch_size: int = setting(64, "prompts per generation batch", ge=1)


def prompt_completion(messages: list[dict]) -> dict:
    """Split a chat into the context and the final assistant turn (the only one trained)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an SFT row must end with an assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def helpful_rows(ctx, cfg: Config, model_name: str) -> list[dict]:
    """The model's own answers to helpful prompts, made chunk by chunk (`cai.chunks`:
    resumable, shared across processes) and kept for resume."""
    prompts = ctx.prompts.helpful_train[: cfg.helpful_prompts]
    ledger = ChunkLedger(ctx.dir.path, "helpful", ["helpful.jsonl"])
    sampling = Sampling(cfg.helpful_max_new_tokens, cfg.helpful_temperature)

    def work(index: int, chunk) -> dict:
        engine = ctx.engine(model_name, cfg.generation_batch_size)
        answers = engine.generate([[{"role": "user", "content": p.text}] for p in chunk], sampling,
                                  seed=chunk_seed(ctx.run.seed, index, salt=17))
        return {"helpful.jsonl": [
            {"messages": [{"role": "user", "content": p.text}, {"role": "assistant", "content": a.text}],
             "id": p.id, "source": "helpful"} for p, a in zip(chunk, answers) if not is_degenerate(a.text)]}

    run_chunks(ledger, chunked_by_length(prompts, cfg.generation_batch_size), work, desc="sft: helpful answers")
    ctx.release(model_name)  # free the weights before training loads them again
    return ledger.rows("helpful.jsonl")


def run(ctx) -> dict:
    from datasets import Dataset
    from trl import SFTTrainer

    from cai.training.args import trl_config
    from cai.training.models import load_training_model
    from cai.training.save import train_and_save

    cfg: Config = ctx.config
    model_name = cfg.model or ctx.run.model
    revisions = read_jsonl(ctx.stage("critique").require("its sft.jsonl is the training set") / "sft.jsonl")
    helpful = helpful_rows(ctx, cfg, model_name) if cfg.helpful_prompts else []
    rows = [prompt_completion(r["messages"]) for r in revisions + helpful]
    if not rows:
        raise RuntimeError(f"no SFT rows: {ctx.stage('critique').path}/sft.jsonl is empty "
                           "(every generation was dropped as degenerate?)")

    args = trl_config(ctx, *trl_settings(cfg))
    loaded = load_training_model(ctx, model_name)  # with use_peft, TRL wraps it in the LoRA adapter
    trainer = SFTTrainer(model=loaded.model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=loaded.tokenizer, peft_config=loaded.peft_config)
    data = {"critique/sft.jsonl": len(revisions), **({"sft/helpful.jsonl": len(helpful)} if helpful else {})}
    metrics = train_and_save(trainer, ctx, base=model_name, data=data)
    return {"revision_rows": len(revisions), "helpful_rows": len(helpful), **metrics}
