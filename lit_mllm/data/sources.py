"""Old home of the readers, now ``lit_mllm.data.readers``; kept for ``lit_mllm/clip/data.py``.

Remove it once that file imports ``load_source`` from ``lit_mllm.data.readers``.
"""

from lit_mllm.data.readers import load_source

__all__ = ["load_source"]
