"""The LightningDataModule: sources -> tokenised samples -> batches."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from lit_mllm.data.collate import MLLMCollator
from lit_mllm.data.conversation import ConversationTokenizer
from lit_mllm.data.dataset import MLLMDataset, SampleProcessor
from lit_mllm.data.length_check import check_max_length
from lit_mllm.data.options import CropMode, OnBadSample, check_int
from lit_mllm.data.readers import DEFAULT_CAPTION_PROMPT, load_source
from lit_mllm.data.records import SampleStore
from lit_mllm.data.sampler import ResumableSampler
from lit_mllm.data.slicing import ImageSlicing, SlicedImageTransform
from lit_mllm.data.streaming.source import StreamSource, as_streams
from lit_mllm.data.synthetic.settings import SyntheticSettings
from lit_mllm.data.synthetic.writer import ensure_written
from lit_mllm.data.tokenizer import load_tokenizer
from lit_mllm.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, build_image_transform

Stage = Literal["train", "val", "test", "predict"]
STAGES: tuple[Stage, ...] = ("train", "val", "test", "predict")


@dataclass
class SplitSource:
    """Where one split comes from: a reader kind, its file and the folder its image paths are in.

    ``split`` is only used by Karpathy files (train/restval/val/test inside one JSON).
    """

    kind: Literal["coco", "karpathy", "llava"]
    file: str
    image_root: str
    split: str | None = None


# The name configs, notebooks and scripts know ``data.synthetic``'s type by.
SyntheticData = SyntheticSettings
# A split: one annotation file, or shard folders streamed with LitData (several mix by weight).
Source = SplitSource | StreamSource | list[StreamSource]


def synthetic_source(settings: SyntheticSettings, stage: Stage) -> SplitSource:
    """Which file of the synthetic set a stage reads: captions, or conversations to train on
    when ``task`` is ``instruct``; predict reads the val images."""
    split = {"train": "train", "val": "val", "test": "test", "predict": "val"}[stage]
    root = str(Path(settings.dir) / "images")
    if stage == "train" and settings.task == "instruct":
        return SplitSource("llava", str(Path(settings.dir) / "llava_train.json"), root)
    return SplitSource(
        "coco", str(Path(settings.dir) / f"captions_{split}.json"), f"{root}/{split}"
    )


class MLLMDataModule(L.LightningDataModule):
    """Builds loaders for fit/validate/test/predict.

    Settings that belong to the model (``tokenizer``, ``num_image_tokens``, the encoder's
    ``image_data_config``, ``chat_template_kwargs``) come from it explicitly: LightningCLI links
    them from the built model; in Python, ``MLLMDataModule(**module.data_settings(), ...)``.
    """

    def __init__(
        self,
        synthetic: SyntheticSettings | None = None,
        train: Source | None = None,
        val: Source | None = None,
        test: Source | None = None,
        predict: Source | None = None,
        caption_prompt: str = DEFAULT_CAPTION_PROMPT,
        one_sample_per_caption: bool = True,
        system_prompt: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        num_image_tokens: int | None = None,
        image_data_config: dict[str, Any] | None = None,
        crop_pct: float | None = 1.0,
        crop_mode: CropMode | None = None,
        augment: bool = False,
        max_length: int = 512,
        packing: bool = False,
        length_grouping: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        on_bad_sample: OnBadSample = "error",
        val_limit: int | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        image_slicing: ImageSlicing | None = None,
        tokens_per_view: int | None = None,
    ) -> None:
        """``max_image_pixels``: images whose header claims more pixels are refused before
        decoding (reason ``image_too_large``). The default is PIL's own limit (~89 MP); PIL still
        refuses anything over twice its process-wide limit, which is never changed here.

        ``crop_mode``: how a non-square image meets the encoder's square input (timm's
        ``center``, ``squash`` or ``border``; null: the encoder's data config, usually
        ``center``, which cuts off the ends of a wide image). Views of sliced images are
        resized to their planned sizes and never cropped.

        ``train`` / ``val`` / ``test`` / ``predict``: an annotation file (``SplitSource``), or
        shard folders written by ``lit-mllm-data shard`` and streamed with LitData
        (``{kind: stream, dir: ..., weight: ...}``, or a list of them mixed by weight; see
        :mod:`lit_mllm.data.streaming`). Streamed training data resumes mid-epoch from the
        loader state Lightning keeps in every checkpoint.

        ``length_grouping``: sort the shuffled training order by length within groups of this
        many batches, then shuffle the group's batches (LLaVA's ``group_by_modality_length``):
        padded batches of similar lengths carry less padding (0: off). Lengths are estimated
        from the records (characters of text / 4 + image tokens), without tokenising.

        ``image_slicing``: read each image at its own resolution as a thumbnail + slices
        (MiniCPM-V; :mod:`lit_mllm.data.slicing`), or null for one view at the encoder's input
        size. The model is told (the CLI links it to ``model.image_slicing``). With slicing,
        ``tokens_per_view`` (from the model: the resampler's query count, null for one token per
        ``image_slicing.patch_size`` cell) sizes every view's text block.
        """
        super().__init__()
        check_int("data.batch_size", batch_size, 1)
        check_int("data.eval_batch_size", eval_batch_size, 1, optional=True)
        check_int("data.max_length", max_length, 2)
        check_int("data.num_workers", num_workers, 0)
        check_int("data.length_grouping", length_grouping, 0)
        check_int("data.val_limit", val_limit, 1, optional=True)
        check_int("data.num_image_tokens", num_image_tokens, 1, optional=True)
        check_int("data.max_image_pixels", max_image_pixels, 1)
        check_int("data.tokens_per_view", tokens_per_view, 1, optional=True)
        if image_slicing is not None:
            image_slicing.check("data.image_slicing.")
        check_int("data.seed", seed, None)
        if crop_pct is not None and not (isinstance(crop_pct, (int, float)) and crop_pct > 0):
            raise ValueError(f"data.crop_pct must be > 0 (or null), got {crop_pct!r}")
        if crop_mode not in (None, *get_args(CropMode)):
            raise ValueError(
                f"data.crop_mode must be one of {get_args(CropMode)} or null, got {crop_mode!r}"
            )
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if synthetic is None and train is None and val is None and test is None and predict is None:
            synthetic = SyntheticSettings()
        if synthetic is not None:
            synthetic.check("data.synthetic.")
        self.synthetic = synthetic
        self.sources: dict[Stage, Source | None] = {
            stage: given or (synthetic_source(synthetic, stage) if synthetic else None)
            for stage, given in (
                ("train", train),
                ("val", val),
                ("test", test),
                ("predict", predict),
            )
        }
        if length_grouping and as_streams(self.sources["train"]) is not None:
            raise ValueError(
                "data.length_grouping sorts a map-style training set, but data.train is "
                "streamed (read in chunk order): set data.length_grouping: 0, or use "
                "data.packing to avoid padding"
            )
        self.caption_prompt = caption_prompt
        self.one_sample_per_caption = one_sample_per_caption
        self.system_prompt = system_prompt
        self.chat_template_kwargs = chat_template_kwargs
        self.tokenizer_name = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_data_config = image_data_config
        self.crop_pct = crop_pct
        self.crop_mode = crop_mode
        self.augment = augment
        self.max_length = max_length
        self.packing = packing
        self.length_grouping = length_grouping
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.on_bad_sample = on_bad_sample
        self.val_limit = val_limit
        self.seed = seed
        self.cache_dir = cache_dir
        self.max_image_pixels = max_image_pixels
        self.image_slicing = image_slicing
        self.tokens_per_view = tokens_per_view
        self.datasets: dict[Stage, Any] = {}  # MLLMDataset, or a LitData streaming dataset
        # records left out while reading each stage's file, by reason: a val report must not
        # show the train file's faults
        self.skipped_at_load: dict[Stage, Counter[str]] = {stage: Counter() for stage in STAGES}
        self.train_sampler: ResumableSampler | None = None
        self._sampler_state: dict[str, Any] | None = None  # from a checkpoint, until the loader
        self.train_stream_loader: Any = None  # a StreamLoader for streamed training data
        self._stream_state: dict[str, Any] | None = None  # its position, until it exists

    # -- preparation -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write the synthetic set once (rank 0); real data is only read. The human baseline
        of the run report is scored from the val file by whoever prints it (callbacks/report.py),
        so data never needs the metrics stack."""
        if self.synthetic is not None:
            ensure_written(self.synthetic)

    def _model_setting(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            option = "tokenizer" if name == "tokenizer_name" else name
            raise ValueError(
                f"MLLMDataModule needs data.{option}, which belongs to the model: the lit-mllm "
                "CLI links it from model.*; in Python pass MLLMDataModule(**module."
                "data_settings(), ...)"
            )
        return value

    def _conversation_tokenizer(self) -> ConversationTokenizer:
        name = self._model_setting("tokenizer_name")
        num_image_tokens = self._model_setting("num_image_tokens")
        return ConversationTokenizer(
            load_tokenizer(name),
            num_image_tokens=num_image_tokens,
            max_length=self.max_length,
            system_prompt=self.system_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
            slices=self.image_slicing is not None,
        )

    def load_samples(self, stage: Stage) -> SampleStore | None:
        source = self.sources[stage]
        if source is None or as_streams(source) is not None:
            return None
        options: dict[str, Any] = {"on_bad_sample": self.on_bad_sample, "cache_dir": self.cache_dir}
        if source.kind != "llava":
            options["prompt"] = self.caption_prompt
            options["one_sample_per_caption"] = self.one_sample_per_caption and stage == "train"
        if source.kind == "karpathy":
            options["split"] = source.split or {"train": "train", "predict": "test"}.get(
                stage, stage
            )
        samples = load_source(source.kind, source.file, source.image_root, **options)
        self.skipped_at_load[stage] = Counter(samples.skipped)
        return samples

    def setup(self, stage: str | None = None) -> None:
        wanted: dict[str | None, tuple[Stage, ...]] = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
            None: ("train", "val", "test", "predict"),
        }
        tokenize = None
        data_config = self._model_setting("image_data_config")
        for split in wanted[stage]:
            if split in self.datasets:
                continue
            streams = as_streams(self.sources[split])
            samples = self.load_samples(split)
            if samples is None and streams is None:
                continue
            tokenize = tokenize or self._conversation_tokenizer()
            source = self.sources[split]
            if samples is not None and source is not None and len(samples) > 0:
                # sliced images: the smallest image block is one view
                per_image = (self.tokens_per_view or 1) if self.image_slicing else None
                check_max_length(
                    self.max_length,
                    split,
                    source,
                    samples,
                    tokenize,
                    self.caption_prompt,
                    per_image,
                )
            transform = build_image_transform(
                data_config,
                train=split == "train",
                augment=self.augment,
                crop_pct=self.crop_pct,
                crop_mode=self.crop_mode,
            )
            slicer = None
            if self.image_slicing is not None:
                slicer = SlicedImageTransform(data_config, self.image_slicing)
            processor = SampleProcessor(
                tokenize,
                transform,
                with_prompts=split != "train",
                on_bad_sample=self.on_bad_sample,
                max_image_pixels=self.max_image_pixels,
                slicer=slicer,
                tokens_per_view=self.tokens_per_view,
            )
            if streams is not None:
                self.datasets[split] = self._streams(split, streams, processor)
            else:
                self.datasets[split] = MLLMDataset(samples, processor)
        if tokenize is not None:
            self.pad_token_id = tokenize.tokenizer.pad_token_id
            self.image_patch_id = tokenize.image_ids.patch

    def _streams(self, split: Stage, streams: list[StreamSource], processor: Any) -> Any:
        from lit_mllm.data.streaming.dataset import stream_split

        if split == "val" and self.val_limit is not None:
            raise ValueError(
                "data.val_limit cuts map-style val data; for a streamed val split use "
                "trainer.limit_val_batches"
            )
        dataset, self.skipped_at_load[split] = stream_split(
            streams,
            processor,
            caption_prompt=self.caption_prompt,
            on_bad_sample=self.on_bad_sample,
            train=split == "train",
            seed=self.seed,
            cache_dir=self.cache_dir,
        )
        return dataset

    # -- loaders ---------------------------------------------------------------------------------
    def _loader(self, split: Stage, *, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(
                f"no {split} data configured: set `data.{split}` (or `data.synthetic`) in the config"
            )
        dataset: Any = self.datasets[split]
        collate = MLLMCollator(
            self.pad_token_id,
            packing=self.packing and split == "train",
            image_patch_id=self.image_patch_id,
        )
        if as_streams(self.sources[split]) is not None:
            from lit_mllm.data.streaming.dataset import StreamLoader

            # LitData splits the chunks over ranks and workers, shuffles per epoch and keeps
            # the position (its state_dict, in every checkpoint through this DataModule's)
            loader = StreamLoader(
                dataset,
                batch_size=batch_size,
                num_workers=self.num_workers,
                collate_fn=collate,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=self.num_workers > 0,
            )
            if split == "train":
                if self._stream_state is not None:
                    loader.load_state_dict(self._stream_state)
                    self._stream_state = None
                self.train_stream_loader = loader
            return loader
        if split == "val" and self.val_limit is not None:
            dataset = Subset(dataset, range(min(self.val_limit, len(dataset))))
        sampler = self._train_sampler(len(dataset)) if split == "train" else None
        # an own generator: creating the iterator then draws worker seeds without touching the
        # global RNG, so a resumed run's model-side random stream matches an uninterrupted one
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=None if sampler is not None else shuffle,
            generator=generator if shuffle or sampler is not None else None,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=partial(_seed_worker, self.seed) if self.num_workers > 0 else None,
            drop_last=False,
        )

    def _train_sampler(self, size: int) -> ResumableSampler:
        """Seeded, sharded like DistributedSampler, and resumable mid-epoch from a checkpoint."""
        trainer = self.trainer
        world = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = ResumableSampler(
            size,
            shuffle=True,
            seed=self.seed,
            num_replicas=world.get("num_replicas", 1),
            rank=world.get("rank", 0),
            lengths=self._train_lengths() if self.length_grouping else None,
            batch_size=self.batch_size,
            group_batches=self.length_grouping,
        )
        # with workers, indices are drawn as soon as an iterator exists, before Lightning calls
        # set_epoch: start at the right epoch (a resumed one comes from the checkpoint, as
        # Lightning may build this loader before it restores its own loop counters)
        if self._sampler_state is not None:
            sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        elif trainer is not None:
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
        self.train_sampler = sampler
        return sampler

    def _train_lengths(self) -> list[int]:
        """Estimated tokens per training sample: text characters / 4 + the image tokens."""
        chars, images = self.datasets["train"].samples.sizes()
        per_image = self.tokens_per_view or self.num_image_tokens or 0
        return (chars // 4 + images * per_image).tolist()

    # -- checkpointed state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The training data position; Lightning stores it in every checkpoint.

        Consumed samples are counted from the training loop (batches *processed* in this epoch),
        not from the sampler: DataLoader workers prefetch ahead of training.
        """
        if self.train_stream_loader is not None:  # LitData counts what it handed out
            return {"train_stream": self.train_stream_loader.state_dict()}
        if self._stream_state is not None:
            return {"train_stream": self._stream_state}
        if self.train_sampler is None:
            return {"train_sampler": self._sampler_state} if self._sampler_state else {}
        trainer = self.trainer
        batches = 0
        if trainer is not None and trainer.state.fn == "fit":
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_sampler": self.train_sampler.state_dict(consumed=batches * self.batch_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training data order at the exact next batch of the saved epoch."""
        stream, state = state_dict.get("train_stream"), state_dict.get("train_sampler")
        if stream is None and state is None:
            return
        # Lightning cannot see that this loader is resumable and warns otherwise
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended")
        if stream is not None:
            if self.train_stream_loader is not None:
                self.train_stream_loader.load_state_dict(stream)
            else:
                self._stream_state = dict(stream)
        elif self.train_sampler is not None:
            self.train_sampler.load_state_dict(state)
        else:
            self._sampler_state = dict(state)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False, batch_size=self.eval_batch_size)


def _seed_worker(seed: int, worker_id: int) -> None:
    import random

    import numpy as np

    worker_seed = (seed + worker_id + torch.initial_seed()) % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
