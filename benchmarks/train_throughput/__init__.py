"""Training throughput: a plain transformers LLaVA loop vs lit-mllm, on the same sizes and data.

Rows (one process, one command):

* ``baseline``: ``LlavaForConditionalGeneration`` (CLIP ViT-L/14-336 frozen, MLP projector,
  Qwen2 decoder) trained the way a transformers user would: fp32 weights under bf16 autocast,
  SDPA attention, right-padded batches with ``-100`` labels, full-vocabulary loss, AdamW.
* ``mlp`` / ``resampler``: ``MLLMModule`` with the same sizes, stepped as
  ``module(batch) -> loss; loss.backward(); fused AdamW.step()`` with its optimisations on:
  packing (one row per micro-batch), loss on supervised positions only, frozen encoder in bf16
  under ``no_grad``, a varlen attention kernel for packed rows (or SDPA), regional
  ``torch.compile`` when it wins, and the largest micro-batch that the memory budget allows.
* ``resampler-sliced`` / ``resampler-sliced-padded`` (only when ``--rows`` names them): the
  ``resampler`` model reading every image as a thumbnail + slices (MiniCPM-V adaptive slicing,
  1 to 9 views per image), packed, and the same model on right-padded batches.

Every row reads the same seeded stream of synthetic conversations (one image each, text lengths
long-tailed, about 30 % supervised tokens); pixels and token ids are random, which changes
nothing in the arithmetic. Also measured: batched greedy captioning speed and the speed of the
project's data loader on JPEG files. ``--tiny`` runs micro sizes on CPU in seconds (smoke test).

Usage: python -m benchmarks.train_throughput --out results.md [--decoders 0.5b,1.5b] ...

Modules: ``sizes`` (model sizes per scale), ``stream`` (the synthetic samples), ``trainee`` /
``baseline`` / ``lit`` (the rows), ``device``, ``measure``, ``generation``, ``profiling`` (what
is measured), ``rows`` (probes and the final run of one row), ``loader`` (data-loader speed),
``report`` / ``notes`` (the markdown), ``run`` (one whole run), ``__main__`` (the command line),
``sliced`` (the sliced-image rows).
"""

import os

# Variable-length packed batches fragment the caching allocator; expandable segments avoid it
# (applies to every row alike). Set on import of the package, before any submodule imports
# torch, so it is in place before CUDA is initialised.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
