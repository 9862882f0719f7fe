"""Image paths kept inside image_root (lit_mllm/data/readers/image_paths.py), through a reader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from reader_files import LLAVA_GOOD, image_root, real, touch, write_json

from lit_mllm.data.readers import BadSampleError, MissingImageError, load_llava


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return image_root(tmp_path)


def test_missing_image_error_and_check_images_off(tmp_path, root):
    rec = {"id": "gone", "image": "sub/nope.jpg", "conversations": LLAVA_GOOD[0]["conversations"]}
    path = write_json(tmp_path / "d.json", [rec])
    with pytest.raises(
        MissingImageError, match=r"d\.json: record 0 \(id 'gone'\): image file .*nope"
    ) as e:
        load_llava(path, root)
    assert isinstance(e.value, FileNotFoundError) and e.value.sample_id == "gone"
    store = load_llava(path, root, check_images=False)
    assert store[0].image_paths == (real(root, "sub/nope.jpg"),)


def test_path_escape_symlinks_always_refused(tmp_path, root):
    outside = tmp_path / "outside"
    touch(outside, "secret.jpg")
    os.symlink(outside / "secret.jpg", root / "link.jpg")  # file link leaving the root
    os.symlink(outside, root / "linkdir")  # directory link leaving the root
    os.symlink(root / "a.jpg", root / "inside_link.jpg")  # link staying inside: allowed
    conv = LLAVA_GOOD[0]["conversations"]
    names = [
        "link.jpg",
        "linkdir/secret.jpg",
        str(outside / "secret.jpg"),
        "sub/../../outside/secret.jpg",
    ]
    for check in (True, False):
        for name in names:
            path = write_json(
                tmp_path / "s.json", [{"id": "s", "image": name, "conversations": conv}]
            )
            with pytest.raises(BadSampleError, match="outside image_root") as e:
                load_llava(path, root, check_images=check)
            assert e.value.reason == "path_escape"
    ok = [
        {"id": f"ok{k}", "image": n, "conversations": conv}
        for k, n in enumerate(("inside_link.jpg", str(root / "sub/d.jpg")))
    ]
    store = load_llava(write_json(tmp_path / "ok.json", ok), root)
    assert [s.image_paths for s in store] == [(real(root, "a.jpg"),), (real(root, "sub/d.jpg"),)]
