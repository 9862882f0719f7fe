"""What the report states about the run: device, versions and how every number was measured."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform

import torch
from transformers.utils import is_flash_attn_2_available

from benchmarks.train_throughput.sizes import Sizes, is_sliced
from lit_mllm.models.fa4_varlen import fa4_installed


def versions() -> str:
    """Python and library versions, and which varlen attention kernels exist."""
    import timm
    import transformers

    flash = is_flash_attn_2_available()
    varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, timm {timm.__version__}, flash-attn "
        f"{'installed' if flash else 'not installed'}, torch varlen_attn "
        f"{'available' if varlen else 'absent'}, flash-attn-4 "
        f"{'installed' if fa4_installed() else 'not installed'}"
    )


def host_cpu() -> str:
    """The host processor's model name: the naive row is launch-bound, so it sets its speed."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB); host CPU {host_cpu()}"
    return f"CPU ({host_cpu()})"


def build_notes(args: argparse.Namespace, sizes: Sizes, device: torch.device) -> list[str]:
    """The Notes section: enough to read the numbers without the code."""
    cuda = device.type == "cuda"
    precision = "bf16 autocast" if cuda else "float32 (CPU, tiny sizes)"
    # by the flag, not by identity with REAL: --text-tokens runs on a modified copy of it
    vision = f"a micro CLIP ({sizes.clip})" if args.tiny else "CLIP ViT-L/14-336"
    vocab = sorted({int(d["vocab_size"]) for d in sizes.decoders.values()})
    memory = (
        "peak allocated GPU memory over the timed steps, weights and optimizer included"
        if cuda
        else "on CPU: the process's peak resident set, not comparable between rows"
    )
    notes = [
        f"Timing: {args.warmup} warm-up steps excluded, then {args.steps} timed steps per row at "
        f"its best micro-batch; probes use {args.probe_warmup} warm-up + {args.probe_steps} "
        "timed steps. Batches are collated before the clock starts (the loader is measured on "
        "its own below). A micro-batch fits when it neither runs out of memory nor exceeds the "
        f"memory budget. Peak mem: {memory}.",
        f"Data: the same seeded stream for every row: text lengths lognormal(median "
        f"{sizes.text_median}, sigma {sizes.text_sigma}) clipped to [{sizes.text_min}, "
        f"{sizes.text_max}] tokens, 1-4 user/assistant turns, assistant share ~Beta(3,7) (mean "
        f"30 %), one {sizes.image_size}px image per sample ({sizes.patches} patches); random "
        "token ids and pixels.",
        f"Naive baseline: transformers LlavaForConditionalGeneration(LlavaConfig({vision}, "
        f"Qwen2 text config, MLP projector, vision_feature_layer -2)), fp32 weights, {precision}, "
        "attn_implementation='sdpa', vision tower requires_grad False, right-padded batches with "
        "attention_mask and -100 labels, loss from model(labels=...) (full-vocabulary logits), "
        "torch.optim.AdamW (default foreach), plain loop.",
        "Best transformers: the same LLaVA with padding-free rows from transformers' "
        "DataCollatorWithFlattening (position ids restart per sample; transformers derives the "
        "block-diagonal mask: 'sdpa' dense, 'flex_attention' block-sparse; 'flash_attention_4' "
        "(where flash-attn-4 runs) reads them as varlen segments; the fastest kept), "
        "two variants: regional torch.compile of the decoder layers (kept when it wins, as for "
        "lit-mllm), or liger-kernel (eager: its autograd Functions fail under torch.compile; its "
        "LLaVA patch fails with transformers 5.24, so liger's Qwen2 RMSNorm + SwiGLU on the "
        "language model and its fused linear cross-entropy on the hidden states; CUDA only); "
        "the frozen vision tower in bf16, fused AdamW; the faster variant is the bar. "
        "flash-attn 2/3 (transformers' other varlen backends) are not installed.",
        f"lit-mllm: MLLMModule (timm {sizes.encoder_name}, pretrained false, feature_layer -2; "
        f"decoder from a Qwen2 `config:` dict, vocab {vocab[0]}, train full) stepped "
        f"as module(batch) -> loss; loss.backward(); AdamW(fused={cuda}).step(): packing (one row "
        "per micro-batch, position_ids restarting per sample, attention_mask None), "
        + (
            "the collator's TokenLayout (image slots, supervised positions, segments: a forward "
            "without host syncs), "
            if args.lit_layout == "on"
            else "positions found on the device (--lit-layout off), "
        )
        + f"chunked loss on supervised positions only, frozen encoder in {'bf16' if cuda else 'fp32'} "
        f"weights under no_grad, trainable weights fp32 under {precision}, residual stream "
        + (
            "in the autocast dtype (--residual-dtype autocast)."
            if args.residual_dtype == "autocast"
            else "in float32."
        ),
        "Attention for packed rows: 'sdpa' = transformers' block-diagonal mask from position_ids "
        "(dense SDPA over the whole packed row); 'varlen' = PyTorch's built-in flash-attention "
        "varlen kernel (torch.nn.attention.varlen.varlen_attn) registered as a transformers "
        "attention function by this script; 'flash_attention_2' only when flash-attn is "
        "installed. Compile = torch.compile of every decoder layer (dynamic shapes) and encoder "
        "block; kept only when it wins the probe by more than 2 %. 'varlen-fa4' = the same "
        "packed path with FlashAttention-4's varlen kernels (flash-attn-4, CuTe DSL; "
        "attn_implementation lit_varlen_fa4).",
        "MLP kernel of the lit rows: "
        + (
            "quack's GEMMs with the SwiGLU and its derivative in their epilogues "
            "(--mlp-kernel quack, model.decoder.mlp_kernel)."
            if args.mlp_kernel == "quack"
            else "transformers' (cuBLAS GEMMs, the SwiGLU compiled with the layer)."
        ),
        "Linear layers of the decoder layers: "
        + (
            f"float8 GEMMs, torchao {args.float8} scaling (--float8, model.decoder.float8), in "
            "the lit and best-transformers rows (the naive row stays bf16; with --mlp-kernel "
            "quack the lit rows' MLPs keep quack's bf16 GEMMs). MFU counts the same FLOPs "
            "against the bf16 peak."
            if args.float8 != "none"
            else "bf16 GEMMs under autocast."
        ),
        "MFU = model FLOPs per step / step time / peak dense bf16 FLOP/s of the device "
        "(lit_mllm.flops): per image encoder forward only 2*N_enc*T + 4*L_enc*D_enc*T^2 "
        "(T = patches + CLS); connector 6*N_conn*P (+ 12*Q*P*D for the resampler); decoder "
        "6*N_body*sum(S_i) + 12*L*D_attn*sum(S_i^2) with S_i the real sample lengths (padding "
        "not counted), plus the LM head 6*V*D per supervised token. Same formula for every row. "
        "MFU (PaLM) charges the LM head on every token instead.",
        f"Captioning: batched greedy decoding of exactly {args.gen_tokens} new tokens "
        "(min_new_tokens = max_new_tokens) from a 12-token prompt with one image, training "
        "weights under the same autocast, KV cache on; lit-mllm via MultimodalLM.generate "
        "(SDPA, uncompiled), baseline via LlavaForConditionalGeneration.generate; first batch "
        "is warm-up.",
        "Data loader: MLLMDataModule (task instruct, packing, tiny tokenizer, the encoder's timm "
        "transform) over the synthetic set written as JPEG; the first batch (worker start-up) is "
        "excluded. It must exceed the training samples/s to keep the GPU fed.",
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for all rows (set by the script).",
    ]
    if any(is_sliced(row) for row in args.rows):
        notes.append(sliced_note(sizes))
    return notes


def sliced_note(sizes: Sizes) -> str:
    """How the sliced rows' images and FLOPs are made."""
    s = sizes.slicing
    side, top = s.scale_resolution, max(sizes.max_views - 1, 1)
    return (
        f"Sliced rows: the resampler row's model with image_slicing(max_slices={s.max_slices}, "
        f"scale_resolution={side}, patch_size={s.patch_size}) (MiniCPM-V adaptive slicing, "
        "lit_mllm.data.slicing.plan_slices). Each sample's image size (its own seeded generator, "
        f"so the text is the same as in the other rows): area multiple m uniform in 1..{top} "
        f"(area uniform in ((m-1), m] x {side}^2, 0.5..1 for m = 1), aspect log-uniform 1:3..3:1, "
        f"drawn again when its plan has more than {sizes.max_views} views; pixels random, one "
        "tensor per view size on the device (ImageViews grouped by size, as MLLMCollator "
        f"groups them). Token layout lit_mllm.data.turns.image_group: {sizes.resampler_queries} "
        "patch slots per view in <im_start>/<im_end> (thumbnail) or <slice_start>/<slice_end> "
        "(slices), a newline after each row of slices. 'resampler-sliced' packs the micro-batch "
        "into one row; 'resampler-sliced-padded' right-pads one row per sample with an "
        "attention_mask (the varlen backend falls back to SDPA with a padding mask). FLOPs: "
        "encoder and resampler per view at that view's patch grid (T = its patches + CLS; the "
        "resampler's key padding across view sizes is not counted), decoder on the real sample "
        "lengths (delimiters included). padding % = decoder pad tokens. Captioning speed is not "
        "measured for these rows."
    )
