"""The CUDA-graph decoding loop (``model.generation.cache: cuda_graph``) decodes transformers'
greedy tokens: same tokens, same stop, same padding of finished rows. On the CPU its step runs
eagerly (float32, exact comparison with ``generate``); the graph replay itself is compared with
the eager step in the GPU tests."""

from __future__ import annotations

import copy
import inspect
import pickle
from pathlib import Path

import pytest
import torch
from test_decoding import _save_decoder
from test_model import _prompt_items, micro_module
from transformers import GenerationConfig

from lit_mllm.config import DecodingConfig
from lit_mllm.data.collate import MLLMCollator
from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.models.graphed_decoding import (
    GraphedGreedyDecoding,
    GreedySettings,
    bucket,
    cache_keyword,
)
from lit_mllm.module import MLLMModule
from lit_mllm.tokens import add_image_tokens

NEW_TOKENS = 12


def _module(tmp_path: Path, cache: str = "dynamic", **overrides) -> MLLMModule:
    """The micro model with a wide-init decoder: its greedy captions differ per prompt."""
    folder = tmp_path / "dec"
    if not folder.exists():
        tokenizer = load_tokenizer("tiny")
        add_image_tokens(tokenizer)
        _save_decoder(folder, len(tokenizer))
    module = micro_module(
        decoder={"name_or_path": str(folder), "config": None},
        generation={"max_new_tokens": NEW_TOKENS, "cache": cache},
        **overrides,
    )
    return module.eval()


def _tokens(module: MLLMModule, config: GenerationConfig, cuda_graph: bool) -> torch.Tensor:
    batch = MLLMCollator(module.tokenizer.pad_token_id)(_prompt_items(module))
    with torch.no_grad():
        return module.model.generate(
            batch["pixel_values"],
            batch["prompt_ids"],
            batch["prompt_attention_mask"],
            generation_config=config,
            cuda_graph=cuda_graph,
        )


def _config(**fields) -> GenerationConfig:
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "num_beams": 1}
    return GenerationConfig(**{**settings, **fields})


def test_without_end_tokens_every_row_gets_generates_greedy_tokens(tmp_path: Path) -> None:
    module = _module(tmp_path)
    config = _config(eos_token_id=None, pad_token_id=module.tokenizer.pad_token_id)
    reference = _tokens(module, config, cuda_graph=False)
    graphed = _tokens(module, config, cuda_graph=True)
    assert reference.shape == (len(_prompt_items(module)), NEW_TOKENS)
    assert torch.equal(graphed, reference)
    assert len({tuple(row) for row in reference.tolist()}) > 1  # the prompts matter


def test_end_tokens_stop_rows_pad_them_and_cut_the_output_where_generate_does(
    tmp_path: Path,
) -> None:
    module = _module(tmp_path)
    pad = module.tokenizer.pad_token_id
    free = _tokens(module, _config(eos_token_id=None, pad_token_id=pad), cuda_graph=False)
    # end tokens the model does emit: one row stops at step 2, others later or never
    first_row = free[0].tolist()
    ends = [first_row[2]] + [t for t in free[1].tolist()[3:] if t != first_row[2]][:1]
    for fields in (
        {"eos_token_id": ends, "pad_token_id": pad},
        {"eos_token_id": ends[0], "pad_token_id": None},  # generate pads with the end token
        {"eos_token_id": ends, "pad_token_id": pad, "min_new_tokens": 4},  # ends banned first
    ):
        config = _config(**fields)
        reference = _tokens(module, config, cuda_graph=False)
        graphed = _tokens(module, config, cuda_graph=True)
        assert torch.equal(graphed, reference), fields
    stopped = _tokens(module, _config(eos_token_id=ends, pad_token_id=pad), cuda_graph=False)
    assert (stopped[0, 3:] == pad).all()  # the stopped row is padded after its end token
    # every row ending early cuts the output short, like generate
    everyone = sorted({int(row[0]) for row in free})
    short = _config(eos_token_id=everyone, pad_token_id=pad)
    reference = _tokens(module, short, cuda_graph=False)
    assert reference.shape[1] == 1
    assert torch.equal(_tokens(module, short, cuda_graph=True), reference)


def test_module_captions_with_the_cuda_graph_cache_equal_the_dynamic_caches(
    tmp_path: Path,
) -> None:
    captions = {}
    for cache in ("dynamic", "cuda_graph"):
        module = _module(tmp_path, cache)
        batch = MLLMCollator(module.tokenizer.pad_token_id)(_prompt_items(module))
        with torch.no_grad():
            captions[cache] = module.caption(batch)
            assert module.caption(batch) == captions[cache]  # a second batch reuses the state
    assert captions["cuda_graph"] == captions["dynamic"]
    assert len(set(captions["dynamic"])) > 1
    assert len(module.model.graphed_decoding.states) == 1
    # the limit path (first rows only) is another batch size: a second state, same tokens
    with torch.no_grad():
        assert module.caption(batch, limit=2) == captions["dynamic"][:2]
    assert len(module.model.graphed_decoding.states) == 2


def test_unsupported_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="repetition_penalty"):
        GreedySettings.of(_config(repetition_penalty=1.3))
    with pytest.raises(ValueError, match="num_beams"):
        GreedySettings.of(_config(num_beams=2))
    with pytest.raises(ValueError, match="num_beams: 1"):
        DecodingConfig(num_beams=3, cache="cuda_graph")
    settings = GreedySettings.of(_config(eos_token_id=[5, 7], min_new_tokens=2))
    assert settings == GreedySettings(NEW_TOKENS, 2, (5, 7), 5)


def test_cache_lengths_are_bucketed_so_nearby_prompts_share_a_state() -> None:
    assert [bucket(n) for n in (1, 64, 65, 600, 640, 641)] == [64, 64, 128, 640, 640, 704]


def test_a_copied_or_pickled_model_starts_without_captured_state(tmp_path: Path) -> None:
    module = _module(tmp_path, "cuda_graph")
    batch = MLLMCollator(module.tokenizer.pad_token_id)(_prompt_items(module))
    with torch.no_grad():
        module.caption(batch)
    assert module.model.graphed_decoding.states
    copied = copy.deepcopy(module.model)
    assert not copied.graphed_decoding.states and copied.graphed_decoding is not (
        module.model.graphed_decoding
    )
    restored = pickle.loads(pickle.dumps(module.model.graphed_decoding))
    assert isinstance(restored, GraphedGreedyDecoding) and not restored.states


def _cuda_prompts(module: MLLMModule) -> dict[str, torch.Tensor]:
    batch = MLLMCollator(module.tokenizer.pad_token_id)(_prompt_items(module))
    names = ("pixel_values", "prompt_ids", "prompt_attention_mask")
    return {name: batch[name].cuda() for name in names}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager-step", "compiled-step"])
def test_cuda_graph_replays_decode_the_eager_steps_tokens_and_follow_weight_updates(
    tmp_path: Path, bf16: bool, compiled: bool
) -> None:
    """The replayed graph runs the eager step's kernels (or their compiled fusion): the same
    tokens, also after the weights change in place (a training step between validations),
    without a new capture. Compiled in bf16, fused kernels round differently: tokens may
    differ at near-ties, so there the share of equal tokens is checked."""
    module = _module(tmp_path).cuda()
    prompts = _cuda_prompts(module)
    config = _config(eos_token_id=None, pad_token_id=module.tokenizer.pad_token_id)
    eager = GraphedGreedyDecoding(warmup_steps=NEW_TOKENS, compile_step=False)  # no capture
    graphed = GraphedGreedyDecoding(warmup_steps=1, compile_step=compiled)

    def same(tokens: torch.Tensor, reference: torch.Tensor) -> bool:
        if compiled and bf16:
            agreement = float((tokens == reference).float().mean())
            print(f"compiled bf16 step: {agreement:.3f} of tokens as the eager step's")
            return agreement >= 0.9
        return torch.equal(tokens, reference)

    def decode(loop: GraphedGreedyDecoding) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            embeds = module.model.embed(prompts["prompt_ids"], prompts["pixel_values"])
            return loop(module.model.decoder, embeds, prompts["prompt_attention_mask"], config)

    before = decode(eager)
    assert same(decode(graphed), before)
    (state,) = graphed.states.values()
    graph = state.graph
    assert graph is not None and not state.capture_failed
    # under autocast the linear weights are cast once per call, not in every replay
    assert bool(graphed.cast_weights) == bf16
    assert all(s.graph is None for s in eager.states.values())
    with torch.no_grad():
        torch.manual_seed(0)
        for weight in module.model.decoder.parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    after = decode(eager)
    assert not torch.equal(after, before)  # the update changes the captions
    assert same(decode(graphed), after)
    assert (graphed.compiled_step is not None) == compiled
    assert graphed.states[next(iter(graphed.states))].graph is graph  # replayed, not recaptured


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_captions_agree_with_generate_in_bf16(tmp_path: Path) -> None:
    module = _module(tmp_path).cuda()
    prompts = _cuda_prompts(module)
    config = _config(eos_token_id=None, pad_token_id=module.tokenizer.pad_token_id)
    tokens = {}
    for cuda_graph in (False, True):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            tokens[cuda_graph] = module.model.generate(
                prompts["pixel_values"],
                prompts["prompt_ids"],
                prompts["prompt_attention_mask"],
                generation_config=config,
                cuda_graph=cuda_graph,
            )
    agreement = float((tokens[True] == tokens[False]).float().mean())
    print(f"bf16 token agreement with generate: {agreement:.3f}")
    assert agreement >= 0.9


def test_compile_step_setting_reaches_the_decoding_loop_and_survives_a_copy(
    tmp_path: Path,
) -> None:
    """``model.generation.compile_step`` is read at each caption call (as the other generation
    settings), and an EMA-style deep copy keeps it."""
    import copy

    module = _module(tmp_path, "cuda_graph")
    batch = MLLMCollator(module.tokenizer.pad_token_id)(_prompt_items(module))
    assert module.generation_cfg.compile_step is True
    module.generation_cfg.compile_step = False
    with torch.no_grad():
        module.caption(batch)
    decoding = module.model.graphed_decoding
    assert decoding.compile_step is False
    assert copy.deepcopy(decoding).compile_step is False
    module.generation_cfg.compile_step = True  # a new state: the old graph is not replayed
    with torch.no_grad():
        module.caption(batch)
    assert [key[-1] for key in decoding.states] == [False, True]


def test_weights_moved_or_recast_start_over_and_validation_end_frees_everything(
    tmp_path: Path,
) -> None:
    module = _module(tmp_path, "cuda_graph")
    batch = MLLMCollator(module.tokenizer.pad_token_id)(_prompt_items(module))
    decoding = module.model.graphed_decoding
    with torch.no_grad():
        module.caption(batch)
        (first,) = decoding.states.values()
        module.model.double()  # new weight tensors: the old state must not be replayed
        batch["pixel_values"] = batch["pixel_values"].double()
        captions = module.caption(batch)
        (second,) = decoding.states.values()
        assert second is not first
        module.generation_cfg.cache = "dynamic"
        assert module.caption(batch) == captions
    module.caption_metrics = None  # no metric to log (no Trainer here)
    module._report_skipped = lambda stage: None
    module.on_validation_epoch_end()
    assert not decoding.states and decoding.weights_key is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lightning_predict_in_bf16_with_compiled_blocks_writes_the_dynamic_caches_captions(
    tmp_path: Path,
) -> None:
    """The whole path of `lit-mllm predict` on CUDA: Lightning's inference mode, bf16-mixed
    autocast from the precision plugin, decoder blocks compiled for training."""
    import json

    import lightning as L
    from test_predict import write_llava

    from lit_mllm.data.datamodule import MLLMDataModule, SplitSource

    file, sample_ids = write_llava(tmp_path / "data")
    rows = {}
    for cache in ("dynamic", "cuda_graph"):
        out = tmp_path / f"{cache}.json"
        module = _module(tmp_path, cache, predictions_path=str(out))
        module.model.compile_blocks()
        data = MLLMDataModule(
            **module.data_settings(),
            predict=SplitSource(
                kind="llava", file=str(file), image_root=str(file.parent / "images")
            ),
            eval_batch_size=2,
            num_workers=0,
        )
        trainer = L.Trainer(
            accelerator="cuda",
            devices=1,
            precision="bf16-mixed",
            logger=False,
            enable_progress_bar=False,
        )
        trainer.predict(module, datamodule=data)
        rows[cache] = {r["sample_id"]: r["caption"] for r in json.loads(out.read_text())}
    decoding = module.model.graphed_decoding
    assert decoding.states and all(s.graph is not None for s in decoding.states.values())
    assert decoding.cast_weights  # bf16-mixed: the linear weights cast once per call
    assert sorted(rows["cuda_graph"]) == sorted(sample_ids)
    same = sum(rows["cuda_graph"][i] == rows["dynamic"][i] for i in sample_ids)
    print(f"captions equal to the dynamic cache's: {same} of {len(sample_ids)}")
    assert same >= len(sample_ids) - 1 and len(set(rows["dynamic"].values())) > 1


def test_the_cache_goes_to_the_argument_the_installed_transformers_reads() -> None:
    """transformers 5.25 renamed ``past_key_values`` to ``cache``; under an older version a
    ``cache=`` argument would land in ``**kwargs`` unread and every step decode without its past
    (seen on the device's transformers 5.17: 3 % of tokens as ``generate``'s)."""

    class Before(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs): ...

    class After(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs): ...

    assert cache_keyword(Before()) == "past_key_values"
    assert cache_keyword(After()) == "cache"
    decoder = micro_module().model.decoder
    assert cache_keyword(decoder) in inspect.signature(decoder.forward).parameters
