"""The critique stage in-process and through a local OpenAI-compatible server.

The same prompts, rounds and token limits, run three ways in one process:
  1. in-process (TransformersEngine: batched, shared-prefix cache),
  2. `transformers serve` with continuous batching, reached through `server:NAME`,
  3. `transformers serve` without it.
Each run is the real stage (`run_one`) in a fresh run folder; the server is started
here on 127.0.0.1 and stopped after. Prints seconds, generated tokens, tokens/s and the
ratio of each server run to the in-process one. The server and cai share this machine's
cores, so on a 2-core laptop the server's numbers are what a local server costs, not
what a GPU server would give.

    .venv/bin/python bench/critique_server.py [--prompts 16] [--rounds 1] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the server launcher the tests use


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16, help="red-team prompts")
    parser.add_argument("--rounds", type=int, default=1, help="critique-and-revise rounds")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="in-process batch; server concurrency")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    parser.add_argument("--skip-plain-server", action="store_true", help="only the continuous-batching server")
    args = parser.parse_args()

    import os

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server process
    from servers import start_transformers_serve

    from cai import models
    from cai.config import load_config
    from cai.execute.executor import run_one

    folder = models.resolve(args.model)
    work = Path(tempfile.mkdtemp(prefix="cai-bench-server-"))

    def stage(name: str, *overrides: str) -> tuple[float, dict]:
        run = load_config(ROOT / "configs" / "demo.yaml", [
            f"run_dir={work / name}", f"model={args.model}", f"threads={args.threads}",
            f"prompts.max_red_team={args.prompts}", f"critique.num_revisions={args.rounds}",
            f"critique.max_new_tokens={args.max_new_tokens}", f"critique.critique_max_new_tokens={args.max_new_tokens}",
            f"critique.batch_size={args.batch_size}", *overrides])
        began = time.perf_counter()
        manifest = run_one(run, "critique")
        seconds = time.perf_counter() - began
        return seconds, manifest

    results = {}
    seconds, manifest = stage("in-process")
    results["in-process"] = (seconds, manifest["counts"]["tokens_generated_this_session"], manifest)
    modes = [("server, continuous batching", ["--continuous-batching"])]
    if not args.skip_plain_server:
        modes.append(("server, no continuous batching", []))
    for label, flags in modes:
        with start_transformers_serve(folder, work / "hub-cache", *flags) as serve:
            server = (f"servers={{gen: {{base_url: '{serve.base_url}', model: '{serve.model}', "
                      f"max_concurrency: {args.batch_size}, timeout: 600}}}}")
            seconds, manifest = stage(label.replace(" ", "-").replace(",", ""), server, "critique.model=server:gen")
        results[label] = (seconds, manifest["counts"]["tokens_generated_this_session"], manifest)

    print(f"critique stage: {args.model}, {args.prompts} prompts, {args.rounds} round(s), "
          f"max_new_tokens={args.max_new_tokens}, batch/concurrency={args.batch_size}, threads={args.threads}")
    base = results["in-process"][0]
    print(f"{'engine':34s} {'seconds':>8s} {'tokens':>7s} {'tok/s':>7s} {'time vs in-process':>19s}  kept rounds")
    for label, (seconds, tokens, manifest) in results.items():
        print(f"{label:34s} {seconds:8.1f} {tokens:7d} {tokens / seconds:7.1f} {seconds / base:18.2f}x  "
              f"{manifest['counts']['kept_rounds']}")
    (work / "results.json").write_text(json.dumps({k: v[:2] for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
