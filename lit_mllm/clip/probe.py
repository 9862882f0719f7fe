"""Linear probes: how much of each caption fact a frozen encoder's patch tokens expose.

For held-out synthetic images with one shape each, a multinomial logistic regression reads the
frozen patch tokens (all of them, in grid order, so where a shape is stays visible) and predicts
the shape's kind, colour, size and grid cell. A connector is about as strong as a linear map of
these tokens, so the accuracies say what the multimodal model can hope to caption.

``lit-mllm-probe --checkpoint DIR ...`` prints them for an encoder (and for the same
architecture at random init, the baseline).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_mllm.data.transforms import build_image_transform, load_rgb_image
from lit_mllm.models.vision import VisionEncoder

FACTS = ("kind", "colour", "size", "cell")


def scene_labels(scenes: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """Class index of each fact of each single-shape scene (the synthetic set's ``scene``)."""
    from lit_mllm.data.synthetic import COLOURS, GRID, KINDS, SIZES

    rows: dict[str, list[int]] = {fact: [] for fact in FACTS}
    for scene in scenes:
        if len(scene["shapes"]) != 1:
            raise ValueError(f"probe scenes need exactly one shape, got {len(scene['shapes'])}")
        shape = scene["shapes"][0]
        rows["kind"].append(KINDS.index(shape["kind"]))
        rows["colour"].append(list(COLOURS).index(shape["colour"]))
        rows["size"].append(SIZES.index(shape["size"]))
        rows["cell"].append(shape["row"] * GRID + shape["col"])
    return {fact: torch.tensor(values) for fact, values in rows.items()}


@torch.no_grad()
def patch_features(encoder: VisionEncoder, pixels: Tensor, batch_size: int = 256) -> Tensor:
    """(N, 3, H, W) -> (N, tokens * width): every patch token, flattened in grid order."""
    chunks = [
        encoder(pixels[i : i + batch_size])[0].float() for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(chunks).flatten(1)


def fit_softmax_regression(
    x: Tensor, y: Tensor, l2: float = 1e-3, num_classes: int | None = None
) -> tuple[Tensor, Tensor]:
    """Weight (D, classes) and bias of an L2-regularised softmax regression, L-BFGS from zero.

    With fewer rows than columns (probes: hundreds of images, ~18k features) it is fitted in
    the rows' own orthonormal basis ``V``: the optimum lies in their span (the gradient of the
    loss does), and lengths and inner products are the same there, so it is the same problem
    (weight ``V @ B``) with N instead of D columns per product: L-BFGS's curvature pairs are
    unchanged, only its first step size (1 / L1 norm of the gradient) and its stopping tests
    (largest entry) read coordinates. The products no longer stream the (N, D) features."""
    basis = None
    if x.shape[1] > x.shape[0]:
        basis = torch.linalg.svd(x, full_matrices=False).Vh.T  # (D, N), orthonormal columns
        x = x @ basis
    classes = num_classes or int(y.max()) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=300, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return (weight if basis is None else basis @ weight), bias


def fit_linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, l2: float = 1e-3
) -> float:
    """Test accuracy of an L2-regularised softmax regression fitted with L-BFGS (deterministic)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight, bias = fit_softmax_regression(train_x, train_y, l2, num_classes=classes)
    return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


def load_probe_split(folder: str | Path, split: str, transform: Any) -> tuple[Tensor, list[dict]]:
    """Pixels and scenes of a synthetic split written with ``--max-shapes 1``."""
    folder = Path(folder)
    coco = json.loads((folder / f"captions_{split}.json").read_text())
    images = coco["images"]
    pixels = torch.stack(
        [
            transform(load_rgb_image(str(folder / "images" / split / im["file_name"])))
            for im in images
        ]
    )
    return pixels, [im["scene"] for im in images]


def probe_encoder(
    encoder: VisionEncoder,
    data_dir: str | Path,
    train_split: str = "train",
    test_split: str = "val",
) -> dict[str, float]:
    """Accuracy per fact on ``test_split`` of probes fitted on ``train_split``."""
    transform = build_image_transform(encoder.data_config, crop_pct=1.0)
    train_pixels, train_scenes = load_probe_split(data_dir, train_split, transform)
    test_pixels, test_scenes = load_probe_split(data_dir, test_split, transform)
    train_x, test_x = patch_features(encoder, train_pixels), patch_features(encoder, test_pixels)
    train_y, test_y = scene_labels(train_scenes), scene_labels(test_scenes)
    return {fact: fit_linear_probe(train_x, train_y[fact], test_x, test_y[fact]) for fact in FACTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lit-mllm-probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="synthetic set written with --max-shapes 1")
    parser.add_argument(
        "--checkpoint", help="encoder weights (file or folder); omit for random init"
    )
    parser.add_argument("--name", default="vit_base_patch16_224", help="timm model name")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON dict")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    encoder = VisionEncoder(
        args.name, checkpoint_path=args.checkpoint, model_kwargs=args.model_kwargs
    )
    scores = probe_encoder(encoder, args.data)
    label = args.checkpoint or f"random init (seed {args.seed})"
    print(json.dumps({"encoder": label, **{k: round(v, 4) for k, v in scores.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
