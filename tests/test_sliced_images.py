"""Sliced images end to end (data.image_slicing): text blocks and model features agree by
construction, packing and truncation keep them whole, the resampler and the MLP read views of
any size, and the setting travels through the CLI, checkpoints and exports."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from lit_mllm.data.collate import MLLMCollator
from lit_mllm.data.conversation import ConversationTokenizer
from lit_mllm.data.records import caption_conversation
from lit_mllm.data.slicing import ImageSlicing, SlicedImageTransform
from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.data.turns import image_group
from lit_mllm.models.projector import MLPProjector
from lit_mllm.models.resampler import Resampler
from lit_mllm.models.views import ImageViews, group_views
from lit_mllm.module import MLLMModule
from lit_mllm.tokens import IM_PATCH, SLICE_END, SLICE_START

# micro encoder: 8 px patches; the MLP merges 2x2 of them, so its views are cut in 16 px cells
SLICING = {
    "resampler": ImageSlicing(max_slices=9, scale_resolution=32, patch_size=8),
    "mlp": ImageSlicing(max_slices=9, scale_resolution=32, patch_size=16),
}
CONNECTOR = {"resampler": None, "mlp": {"kind": "mlp", "merge": 2}}


def sliced_module(kind: str) -> MLLMModule:
    torch.manual_seed(0)
    return MLLMModule(preset="micro", connector=CONNECTOR[kind], image_slicing=SLICING[kind]).eval()


def sliced_items(module: MLLMModule, sizes: list[tuple[int, int]], max_length: int | None = None):
    """Dataset items as MLLMDataset writes them, for images of the given (width, height)."""
    tokenize = ConversationTokenizer(
        load_tokenizer(module.tokenizer_name),
        num_image_tokens=module.num_image_tokens,
        max_length=max_length,
        slices=True,
    )
    slicer = SlicedImageTransform(module.image_data_config, module.image_slicing)
    unit = module.image_slicing.patch_size
    items = []
    for index, (width, height) in enumerate(sizes):
        colour = tuple(random.Random(index).randrange(256) for _ in range(3))
        plan, views = slicer(Image.new("RGB", (width, height), colour))
        per_view = [module.tokens_per_view or (w // unit) * (h // unit) for w, h in plan.view_sizes]
        block = image_group(per_view, plan.grid)
        conversation = caption_conversation("Describe the image.", f"a picture {index}")
        tokenized = tokenize(conversation, image_blocks=[block], sample_id=str(index))
        prompt = tokenize.generation_prompt(conversation, image_blocks=[block])
        items.append(
            {
                "input_ids": tokenized.input_ids,
                "labels": tokenized.labels,
                "pixel_values": None,
                "pixel_views": views if tokenized.num_images else [],
                "sample_id": str(index),
                "prompt_ids": prompt,
                "plan": plan,
                "per_view": per_view,
            }
        )
    return items


@pytest.mark.parametrize("kind", ["resampler", "mlp"])
def test_patch_slots_equal_feature_rows_for_1000_random_image_sizes(kind: str) -> None:
    """The fuzz test of issue 18: for every image, the <im_patch> count of its text equals the
    feature rows the model produces for it (one micro encoder, CPU)."""
    module = sliced_module(kind)
    patch_id = module.model.image_token_ids.patch
    rng = random.Random(18)
    sizes = [(rng.randint(4, 240), rng.randint(4, 240)) for _ in range(1000)]
    sizes += [(32, 32), (1, 1), (240, 4), (4, 240), (33, 31)]
    collate = MLLMCollator(module.tokenizer.pad_token_id, packing=True)
    checked = 0
    with torch.no_grad():
        for start in range(0, len(sizes), 100):
            items = sliced_items(module, sizes[start : start + 100])
            batch = collate(items)
            views = batch["pixel_values"]
            per_view = module.model.encode_views(views)
            cursor = 0
            for item in items:
                slots = int((item["input_ids"] == patch_id).sum())
                rows = sum(len(f) for f in per_view[cursor : cursor + len(item["pixel_views"])])
                assert slots == rows == sum(item["per_view"]), (item["plan"], slots, rows)
                assert [len(f) for f in per_view[cursor : cursor + len(item["pixel_views"])]] == (
                    item["per_view"]
                )
                cursor += len(item["pixel_views"])
                checked += 1
            features = module.model.image_features(views)
            assert features.shape[0] == int((batch["input_ids"] == patch_id).sum())
    assert checked == 1005


def test_the_token_layout_is_minicpm_v_2_5s() -> None:
    """Thumbnail as an image block, each slice in slice tokens, a newline after each row."""
    text = image_group([2, 1, 1, 1, 1, 1, 1], (3, 2))
    row = (SLICE_START + IM_PATCH + SLICE_END) * 3 + "\n"
    assert text == "<im_start>" + IM_PATCH * 2 + "<im_end>" + row + row
    assert image_group([3], None) == "<im_start>" + IM_PATCH * 3 + "<im_end>"
    with pytest.raises(ValueError, match="7 views for a thumbnail"):
        image_group([1] * 7, (2, 2))


@pytest.mark.parametrize("kind", ["resampler", "mlp"])
def test_packed_and_padded_losses_are_equal_with_mixed_view_counts(kind: str) -> None:
    module = sliced_module(kind)
    sizes = [(32, 32), (96, 32), (20, 90), (100, 100), (40, 41)]  # 1, 4, 4, 10, 3 views
    items = sliced_items(module, sizes)
    assert sorted({len(i["pixel_views"]) for i in items}) == [1, 3, 4, 10]
    pad = module.tokenizer.pad_token_id
    padded_batch = MLLMCollator(pad, packing=False)(items)
    packed_batch = MLLMCollator(pad, packing=True)(items)
    assert packed_batch["num_padded_tokens"] == packed_batch["num_tokens"]
    with torch.no_grad():
        padded, padded_count = module(padded_batch)
        packed, packed_count = module(packed_batch)
    assert int(padded_count) == int(packed_count) > 0
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_truncation_keeps_a_sliced_image_group_whole() -> None:
    """A cut that would fall inside the slices moves before the whole group; with nothing left
    to supervise that is a clear error."""
    module = sliced_module("resampler")
    full = sliced_items(module, [(100, 40), (100, 40)])[0]
    ids = full["input_ids"]
    tokenizer = module.tokenizer
    starts = [
        i for i, t in enumerate(ids.tolist()) if t == tokenizer.convert_tokens_to_ids("<im_start>")
    ]
    assert len(starts) == 1
    ends = (ids == tokenizer.convert_tokens_to_ids(SLICE_END)).nonzero().flatten().tolist()
    first_slice_end = ends[0]
    # put the caption before the image, so a cut inside the group still keeps a reply
    tokenize = ConversationTokenizer(
        load_tokenizer("tiny"),
        num_image_tokens=module.num_image_tokens,
        max_length=None,
        slices=True,
    )
    slicer = SlicedImageTransform(module.image_data_config, module.image_slicing)
    plan, _ = slicer(Image.new("RGB", (100, 40)))
    block = image_group([module.tokens_per_view] * len(plan.view_sizes), plan.grid)
    conversation = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "<image>\nAnd this?"},
        {"role": "assistant", "content": "a picture"},
    ]
    whole = tokenize(conversation, image_blocks=[block])
    start = int((whole.input_ids == tokenize.image_ids.start).nonzero()[0])
    last = int((whole.input_ids == tokenize.image_ids.slice_end).nonzero()[-1])
    for cut in (start + 1, start + 5 + module.tokens_per_view, last):  # inside the group
        tokenize.max_length = cut
        kept = tokenize(conversation, image_blocks=[block])
        assert len(kept.input_ids) == start and kept.num_images == 0
        assert not torch.isin(kept.input_ids, torch.tensor([4, 5, 6, 1024, 1025])).any()
    tokenize.max_length = last + 1  # the whole group fits
    kept = tokenize(conversation, image_blocks=[block])
    assert kept.num_images == 1 and len(kept.input_ids) == last + 1
    assert first_slice_end > 0
    # the image first: a cut inside its group leaves nothing to supervise, an error naming why
    tokenize.max_length = start + 3
    with pytest.raises(ValueError, match="image blocks are never cut"):
        tokenize(
            [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "x"}],
            image_blocks=[block],
        )


def test_resampler_on_non_square_grids_with_padding_equals_each_view_alone() -> None:
    torch.manual_seed(0)
    resampler = Resampler(num_queries=4, embed_dim=32, kv_dim=16, kv_grid=(4, 4), num_heads=4)
    grids = [(3, 5), (4, 4), (1, 7), (6, 2)]
    features = [torch.randn(n, h * w, 16) for n, (h, w) in zip((2, 1, 3, 1), grids, strict=True)]
    together = resampler.forward_groups(features, grids)
    for x, grid, out in zip(features, grids, together, strict=True):
        alone = resampler(x, grid)
        assert out.shape == (x.shape[0], 4, 32)
        torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    # padding really is masked: garbage in the padded keys changes nothing
    grid = (2, 3)
    x = torch.randn(1, 6, 16)
    padded = torch.cat([x, 1e3 * torch.randn(1, 10, 16)], dim=1)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[:, 6:] = True
    kv = resampler.key_pos_embed(grid)
    keys = torch.cat([kv, torch.zeros(10, 32)])
    out = resampler._attend(padded, keys, ~mask)
    torch.testing.assert_close(out, resampler(x, grid), rtol=1e-5, atol=1e-5)


def test_mlp_pixel_shuffle_merges_each_2x2_block_into_one_token() -> None:
    torch.manual_seed(0)
    mlp = MLPProjector(3, 5, merge=2)
    grid = (2, 4)
    x = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    shuffled = mlp.pixel_shuffle(x, grid)
    assert shuffled.shape == (2, 2, 12)
    # token 1 = the block of rows 0-1, columns 2-3: patches 2, 3, 6, 7 in row-major order
    expected = torch.cat([x[0, 2], x[0, 3], x[0, 6], x[0, 7]])
    torch.testing.assert_close(shuffled[0, 1], expected)
    assert mlp(x, grid).shape == (2, 2, 5)
    with pytest.raises(ValueError, match="does not divide into 2x2 blocks"):
        mlp(torch.zeros(1, 3 * 4, 3), (3, 4))


def test_views_are_grouped_by_size_and_come_back_in_text_order() -> None:
    views = [torch.full((3, h, w), float(i)) for i, (h, w) in enumerate([(8, 8), (8, 16), (8, 8)])]
    grouped = group_views(views)
    assert isinstance(grouped, ImageViews) and grouped.num_views == 3
    assert [tuple(g.shape) for g in grouped.groups] == [(2, 3, 8, 8), (1, 3, 8, 16)]
    assert grouped.positions == [[0, 2], [1]]
    back = grouped.in_text_order(grouped.groups)
    assert [float(v[0, 0, 0]) for v in back] == [0.0, 1.0, 2.0]


def test_slicing_settings_that_do_not_fit_the_encoder_are_refused() -> None:
    with pytest.raises(ValueError, match="must equal the encoder patch 8 x model.connector.merge"):
        MLLMModule(
            preset="micro",
            connector={"kind": "mlp", "merge": 2},
            image_slicing=ImageSlicing(scale_resolution=32, patch_size=8),
        )
    with pytest.raises(ValueError, match="must be a multiple of the encoder patch 8"):
        MLLMModule(preset="micro", image_slicing=ImageSlicing(scale_resolution=36, patch_size=12))


def test_a_datamodule_slicing_otherwise_than_the_model_is_refused(tmp_path: Path) -> None:
    from lit_mllm.data.datamodule import MLLMDataModule

    module = sliced_module("resampler")
    settings = module.data_settings()
    assert settings["image_slicing"] == SLICING["resampler"]
    assert settings["tokens_per_view"] == module.connector_cfg.num_queries
    module.check_data_agrees(MLLMDataModule(**settings))
    settings["image_slicing"] = None
    with pytest.raises(ValueError, match="data.image_slicing None differs from the model's"):
        module.check_data_agrees(MLLMDataModule(**settings))


def test_the_cli_takes_slicing_from_data_and_gives_it_to_the_model(tmp_path: Path) -> None:
    from lit_mllm.cli import MLLMCLI
    from lit_mllm.data.datamodule import MLLMDataModule

    cli = MLLMCLI(
        MLLMModule,
        MLLMDataModule,
        run=False,
        args=[
            "--model.preset",
            "micro",
            "--data.synthetic.dir",
            str(tmp_path / "synthetic"),
            "--data.image_slicing.max_slices",
            "4",
            "--data.image_slicing.scale_resolution",
            "32",
            "--data.image_slicing.patch_size",
            "8",
        ],
    )
    assert cli.model.image_slicing == ImageSlicing(max_slices=4, scale_resolution=32, patch_size=8)
    assert cli.datamodule.image_slicing == cli.model.image_slicing
    assert cli.datamodule.tokens_per_view == cli.model.connector_cfg.num_queries
    assert cli.model.hparams["image_slicing"]["max_slices"] == 4


def test_native_export_stores_slicing_and_llava_export_refuses_it(tmp_path: Path) -> None:
    from lit_mllm.checkpoints.llava import to_llava
    from lit_mllm.export import load_pretrained, save_pretrained

    module = sliced_module("mlp")
    out = save_pretrained(module, tmp_path / "native")
    stored = json.loads((out / "config.json").read_text())["hyper_parameters"]["image_slicing"]
    assert stored == {
        "max_slices": 9,
        "scale_resolution": 32,
        "patch_size": 16,
        "never_split": False,
    }
    loaded = load_pretrained(out)
    assert loaded.image_slicing == module.image_slicing
    items = sliced_items(module, [(70, 30), (30, 30)])
    batch = MLLMCollator(module.tokenizer.pad_token_id)(items)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)[0], module(batch)[0])
    with pytest.raises(ValueError, match="reads sliced images"):
        to_llava(
            module.model,
            tmp_path / "llava",
            tokenizer=module.tokenizer,
            num_image_tokens=module.num_image_tokens,
            image_data_config=module.image_data_config,
        )


def test_throughput_monitor_counts_the_flops_of_every_view() -> None:
    """MFU of sliced batches: the encoder and connector terms are charged per view, at each
    view's own patch grid, exactly what ``step_flops`` gives for that list of patch counts."""
    from types import SimpleNamespace

    from lit_mllm.callbacks import ThroughputMonitor
    from lit_mllm.flops import sample_lengths, spec_from_model, step_flops, supervised_token_count

    module = sliced_module("resampler")
    items = sliced_items(module, [(96, 32), (32, 32)])  # thumbnail + 3 slices; one view
    batch = MLLMCollator(module.tokenizer.pad_token_id, packing=True)(items)
    assert isinstance(batch["pixel_values"], ImageViews) and batch["pixel_values"].num_views == 5
    patches = sorted(
        (h // 8) * (w // 8)
        for i in items
        for _, h, w in map(tuple, (v.shape for v in i["pixel_views"]))
    )  # noqa: E501
    spec = spec_from_model(module.model)
    expected = step_flops(
        spec,
        view_patches=patches,
        sample_lengths=sample_lengths(batch),
        supervised_tokens=int(supervised_token_count(batch["labels"])),
    )
    one_size = step_flops(
        spec,
        num_images=5,
        patches_per_image=16,
        sample_lengths=sample_lengths(batch),
        supervised_tokens=int(supervised_token_count(batch["labels"])),
    )
    assert patches != [16] * 5 and expected != one_size  # the views really differ in size

    logged: dict[str, float] = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    trainer = SimpleNamespace(global_step=0, world_size=1, precision="32-true")
    monitor = ThroughputMonitor(window=1, peak_flops=1e12)
    monitor.on_fit_start(trainer, module)
    monitor.on_train_batch_start(trainer, module, batch, 0)
    trainer.global_step = 1
    monitor.on_train_batch_end(trainer, module, None, batch, 0)
    seconds = logged["perf/step_time_s"]
    tflops = logged["perf/model_tflops_per_device"]
    assert tflops * 1e12 * seconds == pytest.approx(expected, rel=1e-6)


def test_captions_of_the_first_rows_of_a_sliced_batch_read_their_own_views() -> None:
    """``caption(batch, limit)`` keeps the first rows' image groups (of different view counts)
    out of views grouped by size across all rows: as if those rows were the whole batch."""
    module = sliced_module("resampler")
    items = sliced_items(module, [(96, 32), (32, 32), (100, 100), (40, 41)])
    collate = MLLMCollator(module.tokenizer.pad_token_id)
    batch, first_two = collate(items), collate(items[:2])
    features = module.model.image_features(batch["pixel_values"])
    with torch.no_grad():
        limited = module.caption(batch, limit=2)
        assert limited == module.caption(batch, 2, image_features=features)
        assert limited == module.caption(first_two)
