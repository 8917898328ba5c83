"""What the training stages (sft, reward, rl, dpo) share, each concern once:

- `args`: the TRL config of a stage (cai's defaults, the stage's, the user's keys) and its
  checks before any work;
- `models`: the one loader of the weights a stage trains (tokenizer, dtype, quantisation,
  the LoRA config), and the reward model's scorer;
- `preferences`: the one reader of the preference pairs (label/prefs.jsonl, critique/prefs.jsonl);
- `soft_labels`: the soft-label loss, collator and the reward / DPO trainers that use them;
- `save`: training with resume from the newest complete checkpoint, saving (adapters
  merged or not) and the model card.
"""
