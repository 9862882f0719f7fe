"""`lit-mllm-export`: a training checkpoint reloads as its module and exports in both formats."""

from __future__ import annotations

import torch
from export_models import inputs, llava_logits, micro_module, our_logits, write_checkpoint

from lit_mllm.export import load_checkpoint, load_pretrained, main


def test_cli_exports_a_lightning_checkpoint_in_both_formats(tmp_path, capsys) -> None:
    from transformers import LlavaForConditionalGeneration

    module = micro_module("mlp", train="lora")
    write_checkpoint(module, tmp_path / "run.ckpt")
    reloaded = load_checkpoint(tmp_path / "run.ckpt")
    for name, value in module.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name

    ckpt = ["--ckpt", str(tmp_path / "run.ckpt")]
    assert main([*ckpt, "--out", str(tmp_path / "native")]) == 0
    assert main([*ckpt, "--out", str(tmp_path / "hf"), "--format", "llava"]) == 0
    assert "wrote llava export" in capsys.readouterr().out
    args = inputs(module)
    expected = our_logits(module, *args)
    assert torch.equal(our_logits(load_pretrained(tmp_path / "native"), *args), expected)
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(llava_logits(llava, *args), expected, rtol=1e-4, atol=1e-4)


def test_cli_names_a_missing_checkpoint(tmp_path, capsys) -> None:
    assert main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == f"lit-mllm-export: error: checkpoint {str(tmp_path / 'nope.ckpt')!r} not found\n"
