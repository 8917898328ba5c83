"""The AI judge: its questions (`prompts`), its soft labels (`judge`), its settings and
the one factory stages use (`settings`), and `cai eval-labeler` (`eval_labeler`)."""
