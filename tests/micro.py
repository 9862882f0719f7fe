"""One micro model configuration shared by the tests: seconds on a CPU, every code path real."""

MICRO_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
MICRO_DECODER_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
MICRO_ENCODER = {"name": "vit_base_patch16_224", "model_kwargs": dict(MICRO_VIT_KWARGS)}
MICRO_DECODER = {"config": dict(MICRO_DECODER_CONFIG)}
MICRO_MODEL = {
    "tokenizer": "tiny",
    "encoder": MICRO_ENCODER,
    "connector": {"kind": "resampler", "num_queries": 4},
    "decoder": MICRO_DECODER,
}
