"""Checkpoints, one job per file; nothing here imports the LightningModule.

* ``atomic``: ``AtomicModelCheckpoint`` and the CheckpointIO that write ``.partial`` + rename.
* ``rng``: random generator states saved with a checkpoint and restored on resume.
* ``safe_load``: every checkpoint read (local only, checksums first, no code run).
* ``integrity``: CRC32 checks of files and the checksum manifest of sharded folders.
* ``sharded``: sharded (FSDP) folders read without unpickling code.
* ``resume_settings``: model settings that conflict with a ``--ckpt_path``'s own.
* ``frozen``: which weights a checkpoint or export keeps; ``init_from``: another run's weights.
* ``native`` and ``llava``: the two export formats (``lit_mllm.export`` adds the module).
"""

from lit_mllm.checkpoints.atomic import AtomicModelCheckpoint

__all__ = ["AtomicModelCheckpoint"]
