"""A record's image path -> a path inside ``image_root``, refusing every way out of the root.

Why: annotation files come from elsewhere; ``../``, absolute paths or symlinks in them must not
make training read (or a report show) files outside the folder the user named.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from lit_mllm.data.readers.validation import InvalidRecord


class ImageResolver:
    """Maps a record's image path to a path inside ``image_root``, refusing any escape.

    Symlinks are resolved (directories once each, cached; the file itself when it is a link),
    so ``../``, absolute paths and links pointing outside the root are all refused.
    """

    def __init__(self, image_root: str | Path, check_images: bool):
        self.root = os.path.realpath(image_root)
        self.prefix = self.root if self.root.endswith(os.sep) else self.root + os.sep
        self.check_images = check_images
        self._dirs: dict[str, str] = {}
        if check_images and not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"image_root {str(image_root)!r} is not a directory; fix the path "
                "(or pass check_images=False to build the store without the images)"
            )

    def __call__(self, name: Any) -> str:
        """Return the resolved path relative to the real root."""
        if not isinstance(name, str):
            raise InvalidRecord(
                "bad_type", f"image path must be a string, got {type(name).__name__}"
            )
        if not name or "\x00" in name:
            raise InvalidRecord("bad_value", f"image path {name!r} is empty or contains a NUL byte")
        head, tail = os.path.split(os.path.join(self.root, name))
        if tail in ("", ".", ".."):
            raise InvalidRecord("bad_value", f"image path {name!r} names a directory, not a file")
        real_dir = self._dirs.get(head)
        if real_dir is None:
            real_dir = self._dirs[head] = os.path.realpath(head)
        real = os.path.join(real_dir, tail)
        try:
            st: os.stat_result | None = os.lstat(real)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(real)
        if not real.startswith(self.prefix):
            raise InvalidRecord(
                "path_escape",
                f"image path {name!r} resolves to {real!r}, outside image_root {self.root!r} "
                "(symlinks are resolved; point image_root at the real directory)",
            )
        if self.check_images and (st is None or not os.path.isfile(real)):
            raise InvalidRecord("missing_image", f"image file {real!r} does not exist")
        return real[len(self.prefix) :]
