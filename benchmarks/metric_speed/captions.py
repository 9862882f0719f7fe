"""Seeded synthetic COCO-style captions: references per image, and predictions that partly
overlap them, with a long tail of rare words so that CIDEr's IDF weights spread as on COCO."""

from __future__ import annotations

import random


def _words(text: str) -> list[str]:
    return text.split()


ARTICLES = ["a", "an", "the", "two", "three", "some", "several", "A", "The"]
ADJECTIVES = _words(
    "red blue green yellow small large young old wooden white black brown tall little "
    "happy busy empty crowded shiny dirty striped colorful metal plastic open closed wet "
    "dry sunny snowy grassy sandy tiny huge fluffy modern vintage"
)
NOUNS = _words(
    "man woman person dog cat child boy girl bus train car bicycle horse table plate "
    "pizza sandwich bench tree building street field beach kite umbrella clock giraffe "
    "elephant zebra sheep cow bird skateboard surfboard laptop phone kitchen bathroom "
    "sink toilet bed couch window door sign truck motorcycle boat airplane banana apple "
    "cake bowl cup bear frisbee racket ball player tennis baseball wave vase flowers "
    "oven fridge teddy chair desk mirror"
)
VERBS = _words(
    "sitting standing walking riding holding eating playing looking flying lying running "
    "parked driving carrying watching throwing catching cutting jumping crossing waiting"
)
PREPOSITIONS = _words("on in near under behind beside across with along at inside over")
PUNCTUATION = ["", "", ".", " .", "!", ",", "..."]


def _phrase(rng: random.Random, rare: list[str]) -> str:
    words = [rng.choice(ARTICLES)]
    if rng.random() < 0.6:
        words.append(rng.choice(ADJECTIVES))
    # Zipf-like: mostly common nouns, a long tail of rare ones (realistic CIDEr IDF spread)
    words.append(rng.choice(rare) if rng.random() < 0.08 else rng.choice(NOUNS))
    return " ".join(words)


def _caption(rng: random.Random, rare: list[str]) -> str:
    words = [_phrase(rng, rare), rng.choice(["is", "are", ""]), rng.choice(VERBS)]
    words += [rng.choice(PREPOSITIONS), _phrase(rng, rare)]
    if rng.random() < 0.4:
        words += [rng.choice(PREPOSITIONS), _phrase(rng, rare)]
    text = " ".join(w for w in words if w) + rng.choice(PUNCTUATION)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def make_references(n_images: int, seed: int, n_refs: int = 5) -> dict[int, list[str]]:
    """``n_refs`` captions per image id (COCO-like ids from 100000), the same for a seed."""
    rng = random.Random(seed)
    rare = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, 9))) for _ in range(3000)
    ]
    return {100_000 + i: [_caption(rng, rare) for _ in range(n_refs)] for i in range(n_images)}


def make_predictions(references: dict[int, list[str]], seed: int) -> dict[int, str]:
    """Per image: a reference with some words dropped/replaced, or an unrelated caption."""
    rng = random.Random(seed)
    vocabulary = NOUNS + ADJECTIVES + VERBS
    predictions = {}
    for image_id, refs in references.items():
        if rng.random() < 0.1:
            predictions[image_id] = _caption(rng, vocabulary)
            continue
        words = [w for w in rng.choice(refs).split() if rng.random() > 0.1]
        words = [w if rng.random() < 0.75 else rng.choice(vocabulary) for w in words]
        predictions[image_id] = " ".join(words)
    return predictions
