"""Greedy captions with one CUDA-graph replay per new token.

transformers' ``generate`` with a static cache compiles the decoder's forward, but every token
still passes through its Python loop (input preparation, mask building, logits processors,
stopping criteria): on an H200 that host work, not the GPU, sets the pace of a 1.5B decoder.
Here the whole per-token step (embedding lookup, decoder forward over transformers'
``StaticCache``, greedy choice, end-token bookkeeping) is captured once as a CUDA graph and
replayed; the host checks for finished rows every few tokens only.

The step is transformers' own forward and mask code (capture-safe: ``is_tracing`` is true while
a stream captures), so the tokens are those of ``generate``'s greedy search: the prompt's
position ids are its ``cumsum - 1``, finished rows continue with the pad token, and
``min_new_tokens`` bans the end tokens as its logits processor does. Off CUDA the same loop
runs eagerly, which is what the CPU tests compare with ``generate``.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.profiler import record_function
from transformers import GenerationConfig, PreTrainedModel, StaticCache

log = logging.getLogger(__name__)

# GenerationConfig fields this loop implements; any other non-default field (beam search,
# sampling, repetition penalty, banned words ...) needs transformers' generate
SUPPORTED_FIELDS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "do_sample",
        "num_beams",
        "cache_implementation",
        "use_cache",
        "transformers_version",
        "_from_model_config",
    }
)


@dataclass(frozen=True)
class GreedySettings:
    """The part of a GenerationConfig that greedy decoding with end tokens uses."""

    max_new_tokens: int
    min_new_tokens: int
    end_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def of(cls, config: GenerationConfig) -> GreedySettings:
        """Raises ValueError naming the fields this loop does not implement."""
        unsupported = sorted(
            k for k, v in config.to_diff_dict().items() if k not in SUPPORTED_FIELDS and v
        )
        if config.num_beams != 1 or config.do_sample:
            unsupported.append("num_beams/do_sample")
        if unsupported:
            raise ValueError(
                "the CUDA-graph decoding loop is greedy search with end tokens only; "
                f"these generation settings need transformers' generate: {unsupported}"
            )
        if config.max_new_tokens is None:
            raise ValueError("the CUDA-graph decoding loop needs max_new_tokens")
        eos = config.eos_token_id
        end_ids = tuple(int(t) for t in ([eos] if isinstance(eos, int) else (eos or [])))
        pad = config.pad_token_id
        if pad is None:  # as generate: the first end token pads finished rows
            pad = end_ids[0] if end_ids else 0
        return cls(config.max_new_tokens, int(config.min_new_tokens or 0), end_ids, int(pad))


def bucket(length: int, multiple: int = 64) -> int:
    """Cache lengths are rounded up, so prompts of nearby lengths share one captured graph."""
    return -(-length // multiple) * multiple


class _DecodingState:
    """Static tensors of one (batch, cache length) shape: the cache, the step's inputs and the
    outputs, all at fixed addresses so that a graph captured over them can be replayed."""

    def __init__(
        self, decoder: PreTrainedModel, batch: int, cache_len: int, settings: GreedySettings
    ):
        device = decoder.device
        self.cache = StaticCache(config=decoder.config, max_cache_len=cache_len)
        self.cache_argument = cache_keyword(decoder)  # read once per shape, not per token
        self.attention_mask = torch.ones(batch, cache_len, dtype=torch.long, device=device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)  # tokens generated so far
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.tokens = torch.full(
            (batch, settings.max_new_tokens), settings.pad_id, dtype=torch.long, device=device
        )
        self.end_ids = torch.tensor(settings.end_ids, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_failed = False


class GraphedGreedyDecoding:
    """Greedy decoding whose per-token step is a CUDA-graph replay (eager off CUDA).

    Keeps the captured graphs of the last ``keep`` shapes (validation's full batches and its
    last, smaller one), keyed also by the weights' addresses and the autocast setting, so a
    moved or re-cast model is captured again instead of replaying stale pointers.

    ``compile_step``: on CUDA the captured step is ``torch.compile``'d first (static shapes),
    so a replay runs a few fused kernels per layer instead of the eager step's dozens of tiny
    ones (norms, rotary embedding, casts, cache writes), which set a 1.5B decoder's pace at
    batch 32. Each new shape compiles once, in its warm-up steps.
    """

    def __init__(
        self,
        check_every: int = 8,
        keep: int = 2,
        warmup_steps: int = 2,
        compile_step: bool = True,
    ) -> None:
        self.check_every = check_every
        self.keep = keep
        self.warmup_steps = warmup_steps
        self.compile_step = compile_step
        self.compiled_step: Callable[..., None] | None = None
        self.states: OrderedDict[tuple, _DecodingState] = OrderedDict()
        # autocast's low-precision copies of the linear layers' float32 weights, refreshed once
        # per call instead of cast at every replayed step (autocast caches casts only within
        # one eager call); the same rounding, so the same numbers. Shared by all shapes
        self.cast_weights: dict[str, Tensor] = {}
        self.weights_key: tuple | None = None

    def __deepcopy__(self, memo: dict) -> GraphedGreedyDecoding:
        # a copied model (EMA, averaging callbacks) captures its own graphs
        return GraphedGreedyDecoding(
            self.check_every, self.keep, self.warmup_steps, self.compile_step
        )

    def __getstate__(self) -> dict[str, Any]:
        return {
            "check_every": self.check_every,
            "keep": self.keep,
            "warmup_steps": self.warmup_steps,
            "compile_step": self.compile_step,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def clear(self) -> None:
        """Free the caches, graphs and cast weights (e.g. after validation, for training)."""
        self.states.clear()
        self.cast_weights = {}
        self.weights_key = None

    @torch.no_grad()
    def __call__(
        self,
        decoder: PreTrainedModel,
        prompt_embeds: Tensor,
        prompt_attention_mask: Tensor,
        config: GenerationConfig,
    ) -> Tensor:
        """New tokens (batch, steps) for left-padded prompt embeddings; ``steps`` stops at the
        token where every row has ended, as ``generate``'s output does."""
        settings = GreedySettings.of(config)
        batch, prompt_len = prompt_attention_mask.shape
        self._follow_weights(decoder)
        state = self._state(decoder, batch, prompt_len, settings)
        state.cache.reset()
        state.attention_mask.fill_(1)
        state.attention_mask[:, :prompt_len].copy_(prompt_attention_mask)
        state.count.zero_()
        state.finished.zero_()
        state.tokens.fill_(settings.pad_id)

        with record_function("lit_mllm/prefill"):  # a profiler's phase; free without one
            positions = prompt_attention_mask.long().cumsum(-1) - 1
            positions = positions.masked_fill(prompt_attention_mask == 0, 0)
            out = self._forward(
                decoder,
                inputs_embeds=self._hidden(prompt_embeds),
                attention_mask=state.attention_mask,
                position_ids=positions,
                state=state,
                use_cache=True,
                logits_to_keep=1,
            )
            state.position.copy_(positions[:, -1:])
            self._choose(state, out.logits[:, -1], settings)
            del out
        done = 1
        with record_function("lit_mllm/decode_steps"):
            while done < settings.max_new_tokens:
                steps = min(self.check_every, settings.max_new_tokens - done)
                done += self._run_steps(decoder, state, settings, steps)
                if state.end_ids.numel() and bool(state.finished.all()):
                    break
        return trim_after_end(state.tokens[:, :done].clone(), state.end_ids)

    def _follow_weights(self, decoder: PreTrainedModel) -> None:
        """Graphs hold the addresses of the weights (or of their cast copies): moved, re-cast
        or replaced weights, or another autocast setting, start over; weights updated in
        place (training between validations) only refresh the cast copies."""
        autocast = decoder.device.type == "cuda" and torch.is_autocast_enabled("cuda")
        key = (
            str(decoder.device),
            autocast and torch.get_autocast_dtype("cuda"),
            torch.is_inference_mode_enabled(),  # inference tensors cannot be updated outside it
            tuple(p.data_ptr() for p in decoder.parameters()),
        )
        if key != self.weights_key:
            self.clear()
            self.weights_key = key
        refresh_cast_weights(decoder, self.cast_weights)

    def _state(
        self, decoder: PreTrainedModel, batch: int, prompt_len: int, settings: GreedySettings
    ) -> _DecodingState:
        # compile_step in the key: switching it captures the other step, not the old graph
        key = (batch, bucket(prompt_len + settings.max_new_tokens), settings, self.compile_step)
        state = self.states.get(key)
        if state is None:
            state = _DecodingState(decoder, batch, key[1], settings)
            self.states[key] = state
            while len(self.states) > self.keep:
                self.states.popitem(last=False)
        self.states.move_to_end(key)
        return state

    def _step(self, decoder: PreTrainedModel, state: _DecodingState, settings: GreedySettings):
        """One token: forward of the last chosen token, then the greedy choice. No host sync."""
        state.position.add_(1)
        out = self._forward(
            decoder,
            inputs_embeds=self._hidden(decoder.get_input_embeddings()(state.token)),
            attention_mask=state.attention_mask,
            position_ids=state.position,
            state=state,
            use_cache=True,
            logits_to_keep=1,
        )
        self._choose(state, out.logits[:, -1], settings)

    @staticmethod
    def _hidden(embeds: Tensor) -> Tensor:
        """Under CUDA autocast the decoder gets its embeddings in the autocast dtype, in the
        prefill and in every step: rotary keys then come out in the value states' dtype, which a
        static cache needs (transformers 5.17 allocates values in the keys' dtype; float32
        embeddings would give float32 keys beside autocast values and the cache refuses them),
        and all steps write one dtype. Float32 runs (and the CPU) are unchanged."""
        if embeds.is_cuda and torch.is_autocast_enabled("cuda"):
            return embeds.to(torch.get_autocast_dtype("cuda"))
        return embeds

    def _forward(self, decoder: PreTrainedModel, state: _DecodingState, **inputs: Any) -> Any:
        inputs[state.cache_argument] = state.cache
        if not self.cast_weights:
            return decoder(**inputs)
        return functional_call(decoder, self.cast_weights, kwargs=inputs, tie_weights=False)

    @staticmethod
    def _choose(state: _DecodingState, logits: Tensor, settings: GreedySettings) -> None:
        scores = logits.float()
        has_ends = len(settings.end_ids) > 0
        if has_ends and settings.min_new_tokens > 0:
            banned = scores.index_fill(1, state.end_ids, float("-inf"))
            scores = torch.where(state.count < settings.min_new_tokens, banned, scores)
        chosen = scores.argmax(-1)
        if has_ends:
            chosen = torch.where(state.finished, settings.pad_id, chosen)
            state.finished |= (chosen[:, None] == state.end_ids).any(-1)
        state.tokens.index_copy_(1, state.count, chosen[:, None])
        state.token.copy_(chosen[:, None])
        state.count.add_(1)

    def _run_steps(
        self, decoder: PreTrainedModel, state: _DecodingState, settings: GreedySettings, steps: int
    ) -> int:
        """``steps`` tokens: graph replays on CUDA once captured; the first call of a shape runs
        ``warmup_steps`` steps (a compiled step: at least two) on a side stream, as capture
        requires, then captures."""
        if decoder.device.type != "cuda" or state.capture_failed:
            for _ in range(steps):
                self._step(decoder, state, settings)
            return steps
        done = 0
        if state.graph is None:
            # a compiled step warms up twice: a recompile on its second call happens here, not
            # inside the capture
            warm = min(max(self.warmup_steps, 2 if self.compile_step else 0), steps)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            warm_step = self._cuda_step("default")  # a compiled step compiles on its first call
            with torch.cuda.stream(side), capture_autocast():
                for _ in range(warm):
                    warm_step(decoder, state, settings)
            torch.cuda.current_stream().wait_stream(side)
            done = warm
            if done == steps:
                return done
            capture_step = self._cuda_step("fail_on_recompile")
            state.graph = self._capture(decoder, state, settings, capture_step)
            if state.graph is None:
                return done + self._run_steps(decoder, state, settings, steps - done)
        for _ in range(steps - done):
            state.graph.replay()
        return steps

    def _cuda_step(self, stance: str) -> Callable[..., None]:
        """The step that warms up and is captured: compiled (``compile_step``) or eager. The
        caller runs compiled blocks eager (``set_stance("force_eager")``); this step's own
        compilation is wanted: under ``default`` in the warm-up, and under
        ``fail_on_recompile`` in the capture, where compiling (inductor runs and benchmarks
        kernels) would break the capture and the CUDA RNG state with it; the error becomes an
        uncaptured, eager decoding instead."""
        if not self.compile_step:
            return self._step
        if self.compiled_step is None:
            self.compiled_step = torch.compile(self._step, dynamic=False)
        compiled = self.compiled_step

        def step(*args: Any) -> None:
            with torch.compiler.set_stance(stance):
                compiled(*args)

        return step

    def _capture(
        self,
        decoder: PreTrainedModel,
        state: _DecodingState,
        settings: GreedySettings,
        step: Callable[..., None],
    ) -> torch.cuda.CUDAGraph | None:
        graph = torch.cuda.CUDAGraph()
        try:
            with capture_autocast(), torch.cuda.graph(graph):
                step(decoder, state, settings)
        except Exception as error:  # a step that syncs or allocates on the host cannot be captured
            state.capture_failed = True
            log.warning(
                "decoding step not capturable as a CUDA graph (%s); running it eagerly", error
            )
            return None
        return graph


def capture_autocast() -> torch.autocast:
    """The autocast setting of the warm-up steps and the capture: the caller's, with the cast
    cache off. Weights outside ``cast_weights`` that autocast casts (e.g. linear subclasses)
    would otherwise have this call's copies baked into the graph; uncached, the casts are
    kernels of the graph and follow weight updates. Warm-up and capture share it, so a compiled
    step's guards hold: a recompile during capture (inductor benchmarks kernels) would fail."""
    return torch.autocast(
        "cuda",
        dtype=torch.get_autocast_dtype("cuda"),
        enabled=torch.is_autocast_enabled("cuda"),
        cache_enabled=False,
    )


def cache_keyword(decoder: nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` since transformers 5.25 (which
    still accepts ``past_key_values``, deprecated), ``past_key_values`` before. An unknown name
    would land in ``**kwargs`` unread, and every step would decode without its past."""
    return (
        "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    )


def trim_after_end(tokens: Tensor, end_ids: Tensor) -> Tensor:
    """Cut the columns after the step at which every row had ended (``generate``'s length)."""
    if end_ids.numel() == 0 or tokens.shape[1] == 0:
        return tokens
    ended = torch.isin(tokens, end_ids)
    if not bool(ended.any(1).all()):
        return tokens
    last = int(ended.int().argmax(1).max())
    return tokens[:, : last + 1]


def refresh_cast_weights(decoder: nn.Module, cast: dict[str, Tensor]) -> None:
    """Fill ``cast`` with autocast's copies of the float32 weights and biases of the decoder's
    plain ``nn.Linear`` layers (CUDA autocast on; otherwise leave it empty). Only linear layers:
    autocast casts their inputs anyway, while a norm's or embedding's float32 weight also sets
    its output dtype, which a cast copy would change."""
    if not (torch.is_autocast_enabled("cuda") and next(decoder.parameters()).is_cuda):
        cast.clear()
        return
    dtype = torch.get_autocast_dtype("cuda")
    for name, module in decoder.named_modules():
        if type(module) is not nn.Linear:  # subclasses (quantised layers) keep their own math
            continue
        for kind, tensor in (("weight", module.weight), ("bias", module.bias)):
            if tensor is None or tensor.dtype != torch.float32:
                continue
            key = f"{name}.{kind}"
            if key in cast:
                cast[key].copy_(tensor.detach())
            else:
                cast[key] = tensor.detach().to(dtype)
