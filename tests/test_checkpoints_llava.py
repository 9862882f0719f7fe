"""The LLaVA export (lit_mllm.checkpoints.llava): the same logits in transformers, and a clear
refusal of what LLaVA cannot express."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_models import inputs, llava_logits, micro_module, our_logits, write_llava
from PIL import Image


@pytest.mark.parametrize(
    ("act", "train"), [(None, "full"), ("quick_gelu", "lora")], ids=["gelu", "quickgelu-lora"]
)
def test_llava_export_gives_the_same_logits_in_transformers(tmp_path, act, train) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    module = micro_module("mlp", train=train, act=act)
    write_llava(module, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    config = llava.config
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.image_token_index == module.model.image_token_ids.patch
    assert config.vision_config.hidden_act == (act or "gelu")

    args = inputs(module)
    torch.testing.assert_close(
        llava_logits(llava, *args), our_logits(module, *args), rtol=1e-4, atol=1e-4
    )

    # the processor expands one <im_patch> into the image's token count and sizes the pixels
    processor = AutoProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(np.full((48, 40, 3), 127, dtype=np.uint8))
    batch = processor(text="<im_start><im_patch><im_end> a cat", images=image, return_tensors="pt")
    assert list(batch["pixel_values"].shape[-2:]) == [32, 32]
    patch = module.model.image_token_ids.patch
    assert int((batch["input_ids"][0] == patch).sum()) == module.num_image_tokens == 16


def test_llava_export_refuses_what_llava_cannot_express(tmp_path) -> None:
    with pytest.raises(ValueError, match="MLP connector"):
        write_llava(micro_module("resampler"), tmp_path)
    module = micro_module("mlp")
    module.model.encoder.feature_layer = -1
    with pytest.raises(ValueError, match="feature_layer"):
        write_llava(module, tmp_path)
