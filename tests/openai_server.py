"""A small OpenAI-compatible chat server for tests, faithful to vLLM's where it matters.

Why this exists: the judge-over-a-server path needs per-token log-probabilities from a
remote OpenAI-style endpoint. `transformers serve` ignores `logprobs`, and vLLM is not
installable on the CPU-only test machines, so the tests and the benchmark run this
stand-in instead. It serves one local model folder (saved with `save_pretrained`, with a
chat template), fully offline and without ever loading code from that folder, and
reproduces the parts of vLLM's `/v1/chat/completions` that a client depends on:

- the response shape (`chat.completion`, `finish_reason`, `usage`, OpenAI-style
  `logprobs.content[*].top_logprobs`), with log-probabilities of the *raw* logits
  (vLLM's default), whatever the sampling settings;
- vLLM's chat-template extensions `add_generation_prompt` and `continue_final_message`
  (an open final assistant turn is a "prefill" the model continues);
- OpenAI-style error bodies (400 for a bad request, 404 for an unknown model, 401 for a
  missing or wrong API key when `--api-key` is given).

It also has a fault-injection side door (`POST /control`, `GET /stats`) so tests can
check a client's retries, timeouts and handling of broken answers against a real
socket.

    python tests/openai_server.py --model DIR [--served-model-name NAME] [--host 127.0.0.1]
                                  [--port 0] [--threads 1] [--api-key KEY]

Once listening it prints exactly one line, `READY <port>`, to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Never reach for the hub: the model is a local folder and the test machines are offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

# The request fields this server understands. Anything else is rejected with a 400 that
# names the field, so a client typo fails loudly instead of being silently ignored.
# `max_completion_tokens` is OpenAI's newer name for `max_tokens` (vLLM takes either).
ACCEPTED_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "seed", "logprobs", "top_logprobs", "continue_final_message",
    "add_generation_prompt", "n", "stream", "stop", "user", "presence_penalty",
    "frequency_penalty",
})
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default `max_logprobs`
FAULT_KEYS = frozenset({"status", "retry_after", "delay", "malformed", "drop_logprobs", "die"})

# OpenAI/vLLM error `type` for each status we send.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class APIError(Exception):
    """A request the server answers with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


# ---------------------------------------------------------------------------------------
# Request validation


def _check_type(body: dict, name: str, kinds: tuple, what: str):
    """body[name] if present and of one of `kinds` (bool never counts as a number)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise APIError(400, f"`{name}` must be {what}.", name)
    if not isinstance(value, kinds):
        raise APIError(400, f"`{name}` must be {what}.", name)
    return value


def _message_text(content, index: int) -> str:
    """A message's content as a string; OpenAI text parts are joined with newlines (as vLLM)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{index}].content: only text parts are supported.",
                               "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts.",
                   "messages")


def parse_request(body, served_name: str) -> dict:
    """Validate a chat-completion body; return the normalised parameters or raise APIError."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    unknown = sorted(set(body) - ACCEPTED_FIELDS)
    if unknown:
        raise APIError(400, f"Unsupported field(s): {', '.join(unknown)}.", unknown[0])
    if body.get("stream"):
        raise APIError(400, "`stream` is not supported by this test server.", "stream")
    n = _check_type(body, "n", (int,), "an integer")
    if n is not None and n != 1:
        raise APIError(400, "Only `n` = 1 is supported by this test server.", "n")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "`messages` is required and must be a non-empty list.", "messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string `role`.",
                           "messages")
        clean.append({"role": message["role"], "content": _message_text(message.get("content"), i)})

    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "`model` is required and must be a string.", "model")
    if model != served_name:
        raise APIError(404, f"The model `{model}` does not exist.", "model")

    max_tokens = _check_type(body, "max_completion_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = _check_type(body, "max_tokens", (int,), "an integer")
    max_tokens = 16 if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise APIError(400, "`max_tokens` must be at least 1.", "max_tokens")

    temperature = _check_type(body, "temperature", (int, float), "a number")
    temperature = 1.0 if temperature is None else float(temperature)
    if temperature < 0:
        raise APIError(400, "`temperature` must be non-negative.", "temperature")
    top_p = _check_type(body, "top_p", (int, float), "a number")
    top_p = 1.0 if top_p is None else float(top_p)
    if not 0 < top_p <= 1:
        raise APIError(400, "`top_p` must be in (0, 1].", "top_p")
    top_k = _check_type(body, "top_k", (int,), "an integer") or 0
    if top_k < -1:  # vLLM: -1 and 0 both mean "off"
        raise APIError(400, "`top_k` must be -1, 0 (off) or positive.", "top_k")
    seed = _check_type(body, "seed", (int,), "an integer")

    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = _check_type(body, name, (int, float), "a number")
        value = 0.0 if value is None else float(value)
        if not -2 <= value <= 2:
            raise APIError(400, f"`{name}` must be in [-2, 2].", name)
        penalties[name] = value

    logprobs = _check_type(body, "logprobs", (bool,), "a boolean") or False
    top_logprobs = _check_type(body, "top_logprobs", (int,), "an integer") or 0
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}.",
                       "top_logprobs")
    if top_logprobs and not logprobs:  # vLLM's rule, same words
        raise APIError(400, "when using `top_logprobs`, `logprobs` must be set to true.",
                       "top_logprobs")

    continue_final = _check_type(body, "continue_final_message", (bool,), "a boolean") or False
    add_gen = _check_type(body, "add_generation_prompt", (bool,), "a boolean")
    add_gen = True if add_gen is None else add_gen
    if continue_final and add_gen:  # vLLM's rule: the two ask for contradictory prompts
        raise APIError(400, "Cannot set both `continue_final_message` and "
                            "`add_generation_prompt` to True.", "continue_final_message")

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "`stop` must be a string or a list of strings.", "stop")
    _check_type(body, "user", (str,), "a string")

    return {
        "messages": clean, "max_tokens": max_tokens, "temperature": temperature,
        "top_p": top_p, "top_k": max(top_k, 0), "seed": seed, "logprobs": logprobs,
        "top_logprobs": top_logprobs, "continue_final_message": continue_final,
        "add_generation_prompt": add_gen, "stop": [s for s in stop if s], **penalties,
    }


# ---------------------------------------------------------------------------------------
# The model


class Engine:
    """One model, one request at a time, token by token with the KV cache.

    A hand-written loop rather than `model.generate` so the log-probabilities are exactly
    what vLLM reports: log_softmax of the raw logits at each step, independent of the
    temperature / top-k / top-p used to pick the token.
    """

    def __init__(self, model_dir: str):
        # local_files_only + no trust_remote_code: nothing is fetched, nothing from the
        # folder is executed.
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=False)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, local_files_only=True, trust_remote_code=False)
        self.model.eval()
        self.eos_ids = self._eos_ids()
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)
        # The HTTP server is threaded; the model, its cache and the (Rust) tokenizer are
        # not meant to be driven from several threads at once.
        self.lock = threading.Lock()

    def _eos_ids(self) -> set[int]:
        """The tokenizer's EOS plus the generation config's (an int or a list), as vLLM."""
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        config = getattr(self.model, "generation_config", None)
        extra = getattr(config, "eos_token_id", None) if config is not None else None
        if isinstance(extra, int):
            ids.add(extra)
        elif extra:
            ids.update(int(i) for i in extra)
        return ids

    def render(self, req: dict) -> list[int]:
        """The prompt ids: the chat template rendered to text, then tokenized as vLLM does."""
        try:
            text = self.tokenizer.apply_chat_template(
                req["messages"], tokenize=False,
                add_generation_prompt=req["add_generation_prompt"],
                continue_final_message=req["continue_final_message"])
        except Exception as exc:  # template errors are the request's fault (e.g. bad roles)
            raise APIError(400, f"Could not apply the chat template: {exc}", "messages") from exc
        # The template already wrote any BOS; adding special tokens again would double it.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "The rendered prompt is empty.", "messages")
        return ids

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        # vLLM clamps -inf to -9999.0 so the JSON stays valid.
        return {"token": text, "logprob": max(logprob, -9999.0),
                "bytes": list(text.encode("utf-8", errors="replace"))}

    @staticmethod
    def _pick(logits: torch.Tensor, req: dict, counts: torch.Tensor | None,
              generator: torch.Generator | None) -> int:
        """The next token from the (processed) logits, in vLLM's order:
        penalties, then temperature, then top-k, then top-p, then sample."""
        if counts is not None:
            logits = (logits - req["frequency_penalty"] * counts
                      - req["presence_penalty"] * (counts > 0).float())
        if req["temperature"] == 0:
            return int(torch.argmax(logits))
        logits = logits / req["temperature"]
        if 0 < req["top_k"] < logits.numel():
            kth = torch.topk(logits, req["top_k"]).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if req["top_p"] < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the mass before it already reaches top_p; the most likely
            # token always stays.
            drop = (torch.cumsum(probs, dim=-1) - probs) > req["top_p"]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    def generate(self, req: dict) -> dict:
        """Run one request; the fields of the choice and the usage counts."""
        with self.lock, torch.inference_mode():
            prompt = self.render(req)
            if self.max_len and len(prompt) + req["max_tokens"] > self.max_len:
                raise APIError(  # vLLM's message
                    400, f"This model's maximum context length is {self.max_len} tokens. "
                         f"However, you requested {len(prompt) + req['max_tokens']} tokens "
                         f"({len(prompt)} in the messages, {req['max_tokens']} in the "
                         "completion). Please reduce the length of the messages or completion.",
                    "max_tokens")

            generator = None
            if req["temperature"] != 0:
                generator = torch.Generator()
                seed = req["seed"] if req["seed"] is not None else time.time_ns()
                generator.manual_seed(seed % (2**63))  # manual_seed wants a 64-bit value
            counts = None
            if req["presence_penalty"] or req["frequency_penalty"]:
                counts = torch.zeros(self.model.config.vocab_size)

            generated: list[int] = []
            entries: list[dict] = []
            finish, stop_reason, eos_seen = "length", None, False
            text = None
            step_input = torch.tensor([prompt])
            past = None
            for _ in range(req["max_tokens"]):
                # All positions' logits, not `logits_to_keep=1`: the smaller matmul rounds
                # differently (~1e-5), and tests compare with a plain forward pass.
                out = self.model(input_ids=step_input, cache=past, use_cache=True)
                past = out.cache
                logits = out.logits[0, -1].float()
                token = self._pick(logits, req, counts, generator)

                if token in self.eos_ids:
                    # Ends the answer; like vLLM it is neither in the text nor (here, per
                    # this server's contract) in the logprobs list. It is counted in usage.
                    finish, eos_seen = "stop", True
                    stop_reason = None if token == self.tokenizer.eos_token_id else token
                    break

                generated.append(token)
                if counts is not None:
                    counts[token] += 1
                if req["logprobs"]:
                    logp = torch.log_softmax(logits, dim=-1)  # raw logits: vLLM's default
                    entry = self._entry(token, float(logp[token]))
                    entry["top_logprobs"] = []
                    if req["top_logprobs"]:
                        top = torch.topk(logp, req["top_logprobs"])  # sorted, descending
                        entry["top_logprobs"] = [
                            self._entry(int(i), float(v))
                            for v, i in zip(top.values.tolist(), top.indices.tolist())]
                    entries.append(entry)

                if req["stop"]:
                    # Stop strings are matched on the decoded text, as vLLM does; the
                    # text is cut before the match and the match is not returned.
                    text = self.tokenizer.decode(generated, skip_special_tokens=True)
                    hits = [(text.find(s), s) for s in req["stop"] if s in text]
                    if hits:
                        cut, stop_reason = min(hits)
                        text, finish = text[:cut], "stop"
                        break
                    text = None
                step_input = torch.tensor([[token]])

            if text is None:
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
            completion_tokens = len(generated) + (1 if eos_seen else 0)
            return {
                "content": text, "finish_reason": finish, "stop_reason": stop_reason,
                "logprobs": {"content": entries} if req["logprobs"] else None,
                "prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
            }


# ---------------------------------------------------------------------------------------
# HTTP


class State:
    """What the handlers share: the engine, the fault queue and the counters."""

    def __init__(self, engine: Engine, served_name: str, api_key: str | None):
        self.engine = engine
        self.served_name = served_name
        self.api_key = api_key
        self.lock = threading.Lock()  # guards everything below (not the model)
        self.faults: deque[dict] = deque()
        self.chat_requests = 0
        self.completed = 0
        self.next_id = 0

    def take_request(self) -> tuple[dict | None, int]:
        """Count a chat request, pop its fault (if any) and give it an id number."""
        with self.lock:
            self.chat_requests += 1
            self.next_id += 1
            return (self.faults.popleft() if self.faults else None), self.next_id


def _validate_faults(faults) -> list[dict]:
    if not isinstance(faults, list):
        raise APIError(400, "`faults` must be a list of objects.", "faults")
    for fault in faults:
        if not isinstance(fault, dict) or not fault or set(fault) - FAULT_KEYS:
            raise APIError(400, f"Bad fault {fault!r}; keys are {sorted(FAULT_KEYS)}.",
                           "faults")
    return faults


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive, as OpenAI clients expect; every response
    # therefore carries a Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "cai-test-openai-server"
    state: State  # set on the class by main()

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass  # quiet: tests read stdout, and per-request lines are noise on stderr

    # -- plumbing ------------------------------------------------------------------------

    def _send(self, status: int, payload, headers: dict | None = None) -> bool:
        """Send a JSON (or, for the malformed fault, raw) body; False if the client left."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError):
            # A client that timed out and hung up (the delay fault does this on purpose).
            self.close_connection = True
            return False

    def _read_body(self) -> bytes:
        """The request body, by Content-Length or chunked, so keep-alive stays in step."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    @staticmethod
    def _json(raw: bytes):
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"The request body is not valid JSON: {exc}") from exc

    def _authorised(self) -> bool:
        key = self.state.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._send(401, error_body(401, "Invalid or missing API key."))
        return False

    def _not_found(self):
        self._send(404, {"detail": "Not Found"})  # FastAPI's (so vLLM's) unknown-route body

    # -- routes --------------------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, {"status": "ok"})
        elif path == "/stats":
            with self.state.lock:
                stats = {"chat_requests": self.state.chat_requests,
                         "completed": self.state.completed,
                         "faults_pending": len(self.state.faults)}
            self._send(200, stats)
        elif path == "/v1/models":
            if self._authorised():
                self._send(200, {"object": "list", "data": [
                    {"id": self.state.served_name, "object": "model", "owned_by": "cai-tests"}]})
        else:
            self._not_found()

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        try:
            raw = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True  # a broken body leaves the stream out of step
            self._send(400, error_body(400, "Could not read the request body."))
            return
        try:
            if path == "/v1/chat/completions":
                self._chat(raw)
            elif path == "/control":
                self._control(raw)
            else:
                self._not_found()
        except APIError as exc:
            self._send(exc.status, exc.body())
        except Exception as exc:  # noqa: BLE001 - a bug here should surface as a 500, not a hung client
            print(f"openai_server: error on {path}: {exc!r}", file=sys.stderr, flush=True)
            self._send(500, error_body(500, f"Internal error: {exc}"))

    def _control(self, raw: bytes):
        body = self._json(raw)
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        faults = _validate_faults(body.get("faults", []))
        with self.state.lock:
            if body.get("clear"):
                self.state.faults.clear()
            self.state.faults.extend(faults)
            pending = len(self.state.faults)
        self._send(200, {"faults_pending": pending})

    def _chat(self, raw: bytes):
        fault, number = self.state.take_request()
        fault = fault or {}
        # Faults act before anything else, so they hit whatever request comes next.
        if fault.get("die"):
            os._exit(3)  # a crash: no answer, no cleanup
        if "status" in fault:
            status = int(fault["status"])
            headers = {}
            if "retry_after" in fault:
                headers["Retry-After"] = str(fault["retry_after"])
            self._send(status, error_body(status, f"Injected fault: HTTP {status}."), headers)
            return
        if fault.get("malformed"):
            self._send(200, b'{"id": "chatcmpl-%d", "choices": [' % number)
            return
        if fault.get("delay"):
            time.sleep(float(fault["delay"]))  # outside the model lock: others go on

        if not self._authorised():
            return
        req = parse_request(self._json(raw), self.state.served_name)
        result = self.state.engine.generate(req)
        logprobs = None if fault.get("drop_logprobs") else result["logprobs"]
        response = {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.state.served_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": result["content"]},
                "logprobs": logprobs,
                "finish_reason": result["finish_reason"],
                # vLLM's extra field: None (EOS), a stop token id or the stop string.
                "stop_reason": result["stop_reason"],
            }],
            "usage": {
                "prompt_tokens": result["prompt_tokens"],
                "completion_tokens": result["completion_tokens"],
                "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
            },
        }
        if self._send(200, response):
            with self.state.lock:
                self.state.completed += 1


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local model folder")
    parser.add_argument("--served-model-name", default=None,
                        help="the `model` clients must send (default: --model as given)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--api-key", default=None,
                        help="if set, /v1/* requests need `Authorization: Bearer KEY`")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    # Keep stderr to real problems: no load progress bars or advisory warnings.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    engine = Engine(args.model)

    Handler.state = State(engine, args.served_model_name or args.model, args.api_key)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True  # open keep-alive connections must not block exit

    def stop(signum, frame):
        # shutdown() waits for serve_forever() to notice, so it cannot run on the thread
        # that is inside serve_forever() (this one); hand it to another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
