"""CLIP-style pretraining of the tiny default's image encoder on the synthetic captions."""
