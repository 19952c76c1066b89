import dataclasses
import hashlib
import json
import time

import numpy as np
import pytest
from PIL import Image

from miniclip.data.captions import read_caption_file
from miniclip.data.synthetic import COLORS, POSITIONS, SyntheticSpec, ensure_synthetic, manifest_hash

SPEC = SyntheticSpec(n_train=24, n_val=8, n_test=10, image_size=64)


def _file_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic(tmp_path):
    a = ensure_synthetic(tmp_path / "a", SPEC)
    b = ensure_synthetic(tmp_path / "b", SPEC)
    hashes = _file_hashes(a.root)
    assert len(hashes) == 24 + 8 + 10 + 3 + 1  # images, three JSON files, the manifest
    assert hashes == _file_hashes(b.root)
    assert manifest_hash(a.root) == manifest_hash(b.root)
    other = ensure_synthetic(tmp_path / "c", dataclasses.replace(SPEC, seed=1))
    assert manifest_hash(other.root) != manifest_hash(a.root)


def test_second_call_reuses_the_cache(tmp_path):
    data = ensure_synthetic(tmp_path / "set", SPEC)
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [data.root, *data.root.rglob("*")]}
    start = time.perf_counter()
    again = ensure_synthetic(tmp_path / "set", SPEC)
    assert time.perf_counter() - start < 1.0  # reads the manifest and stats four files
    # Nothing rewritten or replaced: same inodes (the folder too: no regenerate-and-rename) and modification times.
    assert again == data and {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stamps} == stamps
    assert not [p for p in tmp_path.iterdir() if p.name != "set"]  # no temporary folders left behind


def test_regenerates_when_the_spec_changes_or_the_set_is_incomplete(tmp_path):
    root = tmp_path / "set"
    ensure_synthetic(root, SPEC)
    bigger = dataclasses.replace(SPEC, n_test=12)
    ensure_synthetic(root, bigger)
    assert len(json.loads((root / "test.json").read_text())) == 12
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["spec"]["version"] = 0  # written by an older generator
    (root / "manifest.json").write_text(json.dumps(manifest))
    ensure_synthetic(root, bigger)
    assert json.loads((root / "manifest.json").read_text())["spec"]["version"] == bigger.version
    (root / "images" / "test_00011.jpg").unlink()
    ensure_synthetic(root, bigger)
    assert (root / "images" / "test_00011.jpg").is_file()


def test_captions_in_english_and_chinese_match_the_picture(tmp_path):
    data = ensure_synthetic(tmp_path / "set", SPEC)
    for split_file, n in ((data.train_file, 24), (data.validation_file, 8), (data.test_file, 10)):
        records = read_caption_file(split_file)  # the tutorial's format, paths relative to the JSON
        assert len(records) == n
        for record in records:
            english = [c for c in record.captions if c.isascii()]
            chinese = [c for c in record.captions if any("\u4e00" <= ch <= "\u9fff" for ch in c)]
            assert len(english) == 2 and len(chinese) == 2 and len(set(record.captions)) == 4
            # The pixel at the named position has the named colour (the shape covers its anchor point).
            color = next(name for name in COLORS if f" {name} " in f" {english[0]} ".replace(",", " "))
            position = next(name for name, (en, _, _) in POSITIONS.items() if en in english[0].lower())
            assert all(COLORS[color][0] in c for c in chinese) and all(POSITIONS[position][1] in c for c in chinese)
            image = np.asarray(Image.open(record.image).convert("RGB"), dtype=float)
            fx, fy = POSITIONS[position][2]
            pixel = image[int(fy * 64), int(fx * 64)]
            assert np.abs(pixel - COLORS[color][1]).max() < 60, (record, pixel)


def test_held_out_splits_use_distinct_combinations(tmp_path):
    data = ensure_synthetic(tmp_path / "set", SPEC)
    for split_file in (data.validation_file, data.test_file):
        attrs = [_attributes(r.captions) for r in read_caption_file(split_file)]
        assert len(set(attrs)) == len(attrs)


def _attributes(captions):
    english = next(c for c in captions if c.isascii()).replace(",", " ")
    words = set(english.lower().split())
    return tuple(sorted(words & {"circle", "square", "triangle", "star", "diamond", "red", "green", "blue", "yellow",
                                 "purple", "orange", "left", "right", "top", "bottom", "center", "small", "big"}))


def test_empty_split_is_refused_up_front():
    from miniclip.data.synthetic import SyntheticSpec
    with pytest.raises(ValueError, match=r"SyntheticSpec.n_test=0 must be >= 1"):
        SyntheticSpec(n_test=0)
