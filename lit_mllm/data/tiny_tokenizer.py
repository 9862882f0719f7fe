"""The tiny byte-level BPE tokenizer shipped with the package, so the default recipe runs offline.

A ~1k vocabulary keeps the embedding and output layers of a CPU-sized decoder small. Byte-level
BPE makes ``decode(encode(text)) == text`` for any text, and the fast tokenizer gives the offset
mapping that label masking relies on. Training is deterministic: fixed synthetic text, one thread.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lit_mllm.data.chat_template import DEFAULT_CHAT_TEMPLATE, ROLE_MARKERS
from lit_mllm.data.synthetic import iter_synthetic_texts
from lit_mllm.tokens import IMAGE_SPECIAL_TOKENS

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, *ROLE_MARKERS, *IMAGE_SPECIAL_TOKENS)
TINY_VOCAB_SIZE = 1024
TEXT_SEED = 1234
TEXT_SCENES = 3000
# General text (everyday caption words, digits, punctuation), given twice so its pairs reach
# min_frequency: the tokenizer then also encodes COCO-style text compactly, not only shape words.
EVERYDAY_WORDS = """
a an the of in on at to with and or is are was were be been this that these those there here it
its his her their they he she we you i my your our one two three four five six seven eight nine
ten many some several few all each other another more most very small large big little tall
short long old young new white black red green blue yellow orange purple pink brown gray grey
man woman men women person people boy girl child children baby player group family crowd
dog dogs cat cats horse horses cow cows sheep bird birds elephant elephants giraffe giraffes
zebra zebras bear bears animal animals car cars bus buses truck trucks train trains bike
bicycle motorcycle plane airplane boat boats street road sidewalk city building buildings
house room kitchen bathroom bedroom living table tables chair chairs couch bed desk window
door wall floor field grass tree trees water beach ocean sea lake river sky snow mountain
hill park food pizza sandwich plate bowl cake fruit banana bananas apple apples orange
vegetables broccoli carrot cup glass bottle phone computer laptop keyboard mouse television
screen clock sign traffic light umbrella bag ball frisbee kite surfboard skateboard skis
tennis racket baseball bat game shirt hat hair face hand hands head top bottom side front back
sitting standing walking running riding holding eating playing looking flying parked
laying lying wearing carrying watching using waiting driving talking smiling jumping
next near behind under over above below beside between inside outside around through down up
filled covered full empty open closed together alone while who which what where when how
picture photo image view close shot shows showing appears seems looks there
"""
EXTRA_TEXT = (
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 1000 2024 2025",
    "The quick brown fox jumps over the lazy dog. A man is riding a horse on the beach.",
    "Question: What is in this image? Answer: A photo of a cat sitting on a table.",
    "You are a helpful assistant. Please answer the question about the picture.",
    "yes no maybe, (left) [right] {top} <bottom> - _ / \\ | ! ? ' \" : ; * + = % & # @ ~ `",
    *EVERYDAY_WORDS.split("\n"),
    *EVERYDAY_WORDS.title().split("\n"),
)


def _training_texts() -> list[str]:
    return [*iter_synthetic_texts(TEXT_SEED, TEXT_SCENES), *EXTRA_TEXT, *EXTRA_TEXT]


def build_tiny_tokenizer(
    out_dir: str | Path, vocab_size: int = TINY_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train the tiny tokenizer on synthetic text, save it in HF format to ``out_dir``, return it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets then tile the text exactly, leading spaces included.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[*ROLE_MARKERS, *IMAGE_SPECIAL_TOKENS],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        padding_side="right",
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast
