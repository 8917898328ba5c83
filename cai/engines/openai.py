"""The OpenAI-compatible engine: generate and judge with a model behind a server.

Any server that speaks OpenAI's `/v1/chat/completions` works: vLLM, SGLang, llama.cpp's
`llama-server`, `transformers serve`, a hosted API. A run config names servers once:

```yaml
servers:
  judge:
    base_url: http://127.0.0.1:8000/v1
    model: Qwen/Qwen2.5-7B-Instruct     # the served model name
    api_key_env: OPENAI_API_KEY         # optional: the key is read from this variable
label:
  feedback_model: server:judge
```

Requests run concurrently (`max_concurrency`), each with a timeout, and are retried
with exponential backoff on 429, 5xx, timeouts, connection errors and malformed
responses (`Retry-After` is honoured). A request that still fails raises `EngineError`:
the stage's chunk fails, and a rerun resumes from it.

The judge over a server reads option probabilities from the token log-probabilities
of the answer letter (`logprobs` + `top_logprobs` on chat completions), normalised over
the options exactly as in-process. Servers that return none (`transformers serve`, TGI
past 5) are refused with a clear error, unless `option_scoring: letter` opts into a
degraded mode that parses a generated letter into a hard label.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Literal

import requests

from cai import console
from cai.engines.base import Capabilities, Completion, Engine, EngineError, Sampling
from cai.schema import setting

RETRIED_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF = 30.0  # seconds between two attempts, at most


@dataclass
class ServerConfig:
    """One OpenAI-compatible server, named under `servers:` and used as `server:NAME`.
    (Ranges in the metadata are checked by `cai.schema.parse_dataclass`.)"""

    base_url: str = setting(help="the API root, e.g. http://127.0.0.1:8000/v1")
    model: str = setting(help="the served model name sent with every request")
    api_key_env: str | None = setting(
        None, "name of the environment variable holding the API key (the key itself never goes in a config)")
    max_concurrency: int = setting(8, "requests in flight at once", ge=1)
    timeout: float = setting(120.0, "seconds per request", gt=0)
    max_retries: int = setting(5, "retries of a failed request (429, 5xx, timeouts)", ge=0)
    retry_backoff: float = setting(1.0, "seconds before the first retry, doubled for each next one (at most 30)",
                                   ge=0)
    assistant_prefill: Literal["continue", "message", "none"] = setting(
        "continue", "how an open assistant turn (the judge's '(') is sent: 'continue' as the last message with "
                    "continue_final_message (vLLM, SGLang); 'message' as the last message alone (llama.cpp's "
                    "server continues it); 'none' left out, the letter read from the first generated tokens "
                    "(any server)")
    option_scoring: Literal["logprobs", "letter"] = setting(
        "logprobs", "judge scoring: 'logprobs' (soft labels from token log-probabilities) or 'letter' (degraded: "
                    "a generated letter parsed into a hard label, for servers without logprobs)")
    top_logprobs: int = setting(20, "alternatives asked per token when reading option probabilities (vLLM allows "
                                    "up to 20)", ge=2, le=20)


def _request_seed(seed: int, conversation: list[dict], prefill: str) -> int:
    """A per-request seed from the stage's seed and the request itself, so it does not
    depend on batching, concurrency or resume."""
    digest = hashlib.sha256(json.dumps([seed, conversation, prefill], sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _option_of(token: str, options: tuple[str, ...]) -> str | None:
    """The option a returned token stands for: "A", " A", "(A" and "A)" all mean A."""
    core = token.strip().strip("()[]*.:").strip()
    return core if core in options else None


_LETTER = re.compile(r"\(?\b([A-Z])\b\)?")


class OpenAIEngine(Engine):
    def __init__(self, server: ServerConfig, reference: str):
        super().__init__()
        self.server = server
        self.name = reference  # "server:NAME", what rows and manifests record
        self.url = server.base_url.rstrip("/") + "/chat/completions"
        self.capabilities = Capabilities(option_probabilities=server.option_scoring == "logprobs",
                                         seeded=False, in_process=False)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.options_missing = 0  # an option absent from a position's top_logprobs (bounded, see score_options)
        self.letters_unparsed = 0  # letter mode: no option letter in the answer (scored as a tie)

    def describe(self) -> dict:
        return {"engine": "OpenAIEngine", "server": self.name, "base_url": self.server.base_url,
                "model": self.server.model, "option_scoring": self.server.option_scoring,
                "requests": self.requests, "retries": self.retries, "options_missing": self.options_missing,
                "letters_unparsed": self.letters_unparsed}

    # ------------------------------------------------------------ HTTP

    def _api_key(self) -> str | None:
        variable = self.server.api_key_env
        if not variable:
            return None
        key = os.environ.get(variable)
        if not key:
            raise EngineError(f"{self.name}: the environment variable {variable} (api_key_env) is not set")
        return key

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            key = self._api_key()
            if key:
                session.headers["Authorization"] = f"Bearer {key}"
        return session

    def _post(self, body: dict, retries: int | None = None) -> dict:
        """POST a chat completion; retry what can pass (429, 5xx, timeouts, connection
        errors, malformed JSON); raise EngineError naming the URL for the rest."""
        retries = self.server.max_retries if retries is None else retries
        problem = ""
        for attempt in range(retries + 1):
            wait = None
            try:
                response = self._session().post(self.url, json=body, timeout=self.server.timeout)
            except requests.Timeout:
                problem = f"no answer within {self.server.timeout:g} s"
            except requests.ConnectionError as err:
                problem = f"cannot connect ({type(err).__name__})"
            except requests.RequestException as err:  # e.g. an answer cut off mid-body
                problem = f"the request failed ({type(err).__name__})"
            else:
                if response.status_code == 200:
                    try:
                        answer = response.json()
                        answer["choices"][0]["message"]
                        return answer
                    except (ValueError, KeyError, IndexError, TypeError):
                        problem = "a malformed response (not a chat completion JSON)"
                elif response.status_code in RETRIED_STATUS:
                    problem = f"HTTP {response.status_code}: {_error_text(response)}"
                    wait = _retry_after(response)
                else:
                    raise EngineError(f"{self.url}: HTTP {response.status_code} for model '{self.server.model}': "
                                      f"{_error_text(response)}")
            if attempt == retries:
                break
            with self._lock:
                self.retries += 1
            backoff = min(MAX_BACKOFF, self.server.retry_backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
            time.sleep(wait if wait is not None else backoff)
        raise EngineError(f"{self.url}: {problem} (model '{self.server.model}', {retries + 1} attempt"
                          f"{'s' if retries else ''}); rerun the same command to resume once the server answers")

    def _body(self, conversation: list[dict], max_tokens: int, temperature: float, top_p: float = 1.0,
              top_k: int = 0, seed: int | None = None, top_logprobs: int = 0) -> dict:
        messages = [{"role": t["role"], "content": t["content"]} for t in conversation]
        body: dict = {"model": self.server.model, "max_tokens": max_tokens, "temperature": temperature}
        if messages and messages[-1]["role"] == "assistant":  # an open assistant turn (a prefill)
            if self.server.assistant_prefill == "none":
                messages = messages[:-1]
            elif self.server.assistant_prefill == "continue":
                body.update(continue_final_message=True, add_generation_prompt=False)
        body["messages"] = messages
        if temperature > 0:
            body["top_p"] = top_p
            if top_k:
                body["top_k"] = top_k
        if seed is not None:
            body["seed"] = seed
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        return body

    def _map(self, function, items: list, desc: str | None) -> list:
        """`function` over `items`, `max_concurrency` at a time, results in input order.
        The first failure cancels what has not started and is raised."""
        if not items:
            return []
        began = time.perf_counter()
        results = [None] * len(items)
        with ThreadPoolExecutor(max_workers=min(self.server.max_concurrency, len(items))) as pool:
            futures = {pool.submit(function, item): i for i, item in enumerate(items)}
            bar = console.bar(total=len(items), desc=desc, disable=desc is None, unit="request")
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            finally:
                bar.close()
        self.seconds += time.perf_counter() - began
        with self._lock:
            self.requests += len(items)
        return results

    # ------------------------------------------------------------ the engine calls

    def check(self, judge: bool = False) -> None:
        """Before any work: is the server there, does it serve the model, and (for a
        judge) does it take the judge's open answer turn as `assistant_prefill` sends it
        and return log-probabilities? 1-token requests, few retries. The advice of a
        failure names every setting the server needs, so following it works."""
        logprobs = 2 if judge and self.capabilities.option_probabilities else 0
        body = self._body([{"role": "user", "content": "Say OK."}], max_tokens=1, temperature=0.0,
                          top_logprobs=logprobs)
        answer = self._post(body, retries=min(1, self.server.max_retries))
        prefill_refused = None
        if judge and self.server.assistant_prefill != "none":
            try:  # the judge's request shape: the question, then an open answer turn "("
                self._post(self._body([{"role": "user", "content": "Say OK."}, {"role": "assistant", "content": "("}],
                                      max_tokens=1, temperature=0.0, top_logprobs=logprobs), retries=0)
            except EngineError as err:
                prefill_refused = str(err)
        if "logprobs" in body and not (answer["choices"][0].get("logprobs") or {}).get("content"):
            raise EngineError(self._no_logprobs(prefill_refused))
        if prefill_refused is not None:
            raise EngineError(f"{prefill_refused}. The judge's open answer turn is refused as assistant_prefill: "
                              f"{self.server.assistant_prefill} sends it: {self._prefill_advice()}")

    def _prefill_advice(self) -> str:
        return ("set assistant_prefill: none on this server (the letter is then read from the first generated "
                "tokens; llama.cpp's server also takes assistant_prefill: message)")

    def _no_logprobs(self, prefill_refused: str | None = None) -> str:
        advice = "set option_scoring: letter on this server"
        if prefill_refused is not None:  # the letter mode sends the same open turn: it needs both settings
            advice = (f"set option_scoring: letter AND assistant_prefill: none on this server (it also refuses "
                      f"the judge's open answer turn as assistant_prefill: {self.server.assistant_prefill} sends "
                      f"it: {prefill_refused})")
        return (f"{self.url} returned no token log-probabilities for model '{self.server.model}': the judge reads "
                f"its soft labels from them (vLLM, SGLang and llama.cpp's server return them; transformers serve "
                f"and TGI past 5 do not). Use such a server, or {advice} to parse a generated letter into a hard "
                f"label instead (degraded: no soft labels)")

    def generate(self, conversations: list[list[dict]], sampling: Sampling, seed: int,
                 desc: str | None = None, prefill: str = "") -> list[Completion]:
        def one(conversation: list[dict]) -> Completion:
            turns = conversation + ([{"role": "assistant", "content": prefill}] if prefill else [])
            answer = self._post(self._body(turns, sampling.max_new_tokens, sampling.temperature, sampling.top_p,
                                           sampling.top_k, seed=_request_seed(seed, conversation, prefill)))
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
            if prefill and self.server.assistant_prefill != "none" and text.startswith(prefill):
                text = text[len(prefill):]  # some servers echo the continued turn
            tokens = (answer.get("usage") or {}).get("completion_tokens")
            return Completion(text.strip(), int(tokens) if tokens is not None else len(text.split()),
                              choice.get("finish_reason") == "stop")

        completions = self._map(one, conversations, desc)
        self.tokens_generated += sum(c.num_tokens for c in completions)
        return completions

    def score_options(self, questions: list[list[dict]], options: tuple[str, ...] = ("A", "B"),
                      desc: str | None = None) -> list[tuple[float, ...]]:
        """Each option's probability at the first generated position that is not bare
        punctuation (with a prefill honoured: the first token), summed over the
        top_logprobs entries that spell it (" A", "A", "(A"), normalised over the options.
        An option outside the returned top_logprobs gets the smallest returned
        probability (an upper bound) and is counted in `options_missing`."""
        if self.server.option_scoring == "letter":
            return self._score_by_letter(questions, options, desc)
        max_tokens = 1 if self.server.assistant_prefill != "none" else 4

        def one(question: list[dict]) -> tuple[float, ...]:
            answer = self._post(self._body(question, max_tokens, 0.0, top_logprobs=self.server.top_logprobs))
            content = (answer["choices"][0].get("logprobs") or {}).get("content")
            if not content:
                raise EngineError(self._no_logprobs())
            position = next((p for p in content if re.search(r"\w", p.get("token", ""))), content[0])
            listed = position.get("top_logprobs") or [position]
            mass = {option: 0.0 for option in options}
            for entry in listed:
                option = _option_of(entry.get("token", ""), options)
                if option is not None:
                    mass[option] += math.exp(entry["logprob"])
            floor = min(math.exp(entry["logprob"]) for entry in listed)
            missing = [o for o in options if mass[o] == 0.0]
            if missing:
                with self._lock:
                    self.options_missing += len(missing)
                for option in missing:
                    mass[option] = floor
            total = sum(mass.values())
            return tuple(mass[o] / total for o in options)

        return self._map(one, questions, desc)

    def _score_by_letter(self, questions, options, desc) -> list[tuple[float, ...]]:
        """Degraded mode: the generated letter is the answer (1 for it, 0 for the
        others); no letter in the answer is a tie, counted in `letters_unparsed`."""

        def one(question: list[dict]) -> tuple[float, ...]:
            answer = self._post(self._body(question, 4, 0.0))
            text = answer["choices"][0]["message"].get("content") or ""
            prefill = question[-1]["content"] if question[-1]["role"] == "assistant" else ""
            found = [m for m in _LETTER.findall(prefill[-1:] + text) if m in options]
            if not found:
                with self._lock:
                    self.letters_unparsed += 1
                return tuple(1.0 / len(options) for _ in options)
            return tuple(float(o == found[0]) for o in options)

        return self._map(one, questions, desc)


def _error_text(response: requests.Response) -> str:
    """The server's own words about an error, short."""
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message") or error.get("detail") if isinstance(error, dict) else error
        text = str(message if message is not None else body)
    except ValueError:
        text = response.text
    return " ".join(text.split())[:300] or response.reason or "no details"


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return min(MAX_BACKOFF, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None
