"""TRL 1.12's PPO (`trl.experimental.ppo`, the last TRL release with PPO) on a job that
bench/ppo_compare.py writes: the baseline row of that bench. It runs in a venv of its own
with trl==1.12.0 and imports nothing from cai (cai needs a newer TRL).

    VENV/bin/python bench/ppo_trl112.py JOB.json

JOB.json: {"policy": folder, "reward": folder, "prompt_ids": [[token ids], ...],
"seed": int, "threads": int, "output_dir": folder, "ppo": {PPOConfig fields}}.

Four full models, as TRL's PPO holds them: the policy (trained), its reference (a second
copy of the policy folder, frozen), the reward model (frozen) and the value model
(initialised from the reward model, trained), as cai's stage did with TRL 1.12. Writes
OUTPUT_DIR/result.json: the trainer's log history (one entry per update), each update's
seconds and the seconds of `train()` (models loaded before the clock starts).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def pad_distinct_from_eos(tokenizer) -> None:
    """TRL 1.12's PPO finds padding by token id, so a pad token that also ends chat turns
    (SmolLM2 pads with its EOS, <|im_end|>) would mask real tokens: pad with another
    special token the chat template does not use, as cai's TRL 1.12 stage did."""
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                          add_generation_prompt=True)
    specials = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special]
    for token in [tokenizer.unk_token, tokenizer.bos_token, *specials]:
        if token and token != tokenizer.eos_token and token not in probe:
            tokenizer.pad_token = token
            return
    raise SystemExit(f"ppo_trl112: the tokenizer pads with its EOS {tokenizer.eos_token!r} and has no other "
                     "special token to pad with")


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"  # we know PPO is experimental in 1.12: that is the point
    import torch

    torch.set_num_threads(job["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    out = Path(job["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(job["policy"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_distinct_from_eos(tokenizer)

    def reward_head(folder: str):
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id  # TRL finds each sequence's last token by it
        return model

    policy = AutoModelForCausalLM.from_pretrained(job["policy"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(job["policy"], dtype=torch.float32).eval()
    reward = reward_head(job["reward"]).eval()
    value = reward_head(job["reward"])  # the value head starts from the reward model

    # cai's settings for its TRL configs on CPU: fp32, no activation checkpointing, every update logged.
    args = PPOConfig(output_dir=str(out / "checkpoints"), seed=job["seed"], data_seed=job["seed"], use_cpu=True,
                     bf16=False, fp16=False, activation_checkpointing=False, logging_steps=1, save_strategy="no",
                     report_to=[], dataloader_num_workers=0, stop_token="eos", num_sample_generations=0,
                     **job["ppo"])

    class UpdateClock(TrainerCallback):
        """Each update's seconds: TRL's PPO calls on_step_end once per update."""

        def __init__(self):
            self.seconds: list[float] = []
            self.last = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

    clock = UpdateClock()
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, value_model=value,
                         train_dataset=Dataset.from_dict({"input_ids": job["prompt_ids"]}), callbacks=[clock])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started

    import transformers
    import trl

    result = {"log_history": trainer.state.log_history, "update_seconds": clock.seconds,
              "train_seconds": round(seconds, 3), "global_steps": trainer.state.global_step,
              "threads": torch.get_num_threads(), "pad_token": tokenizer.pad_token,
              "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__}}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"[trl-1.12] {trainer.state.global_step} updates in {seconds:.1f}s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
