"""The calibration set travels in the bundle, hashed in the manifest, and the coordinator aligns on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alignfed import manifest as mf
from alignfed.cli import main
from alignfed.errors import BundleError
from alignfed.text import load_texts
from coordinator.calibration import CalibrationRunner, builtin_texts

OWNER_TEXT = "\n \n".join(f"Field note {i}: the pump at station {i} ran for {3 * i} minutes." for i in range(40))


@pytest.fixture(scope="module")
def owner_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, Path]:
    """A bundle exported through the CLI with `--calibration FILE` (raw text, 40 paragraphs)."""
    work = tmp_path_factory.mktemp("calib-bundle")
    notes = work / "notes.txt"
    notes.write_text(OWNER_TEXT, encoding="utf-8")
    rc = main(["export", "--model", str(tiny_model), "--out", str(work / "bundle"), "--calibration", str(notes)])
    assert rc == 0
    return work / "bundle", notes


def test_export_stores_the_chosen_set_with_its_hash(owner_bundle: tuple[Path, Path]) -> None:
    bundle, notes = owner_bundle
    m = mf.load(bundle)
    mf.verify(bundle, m)  # the set is one of the hashed files
    stored = bundle / mf.CALIB_DATA
    assert m.files[mf.CALIB_DATA] == mf.sha256_file(stored) == m.calibration["sha256"]
    assert m.calibration["source"] == "notes.txt" and m.calibration["examples"] == 40
    assert [json.loads(line)["text"] for line in stored.read_text().splitlines()] == load_texts(notes)


def test_the_coordinator_aligns_on_the_bundles_set_unless_configured(owner_bundle: tuple[Path, Path]) -> None:
    bundle, notes = owner_bundle
    m = mf.load(bundle)
    carried = CalibrationRunner.from_bundle(bundle, m, None, 64)
    from_file = CalibrationRunner.from_bundle(bundle, m, notes, 64)
    np.testing.assert_array_equal(carried.batch.input_ids, from_file.batch.input_ids)
    other = bundle.parent / "other.jsonl"
    other.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_texts(0)))
    configured = CalibrationRunner.from_bundle(bundle, m, other, 64)
    assert configured.batch.input_ids.shape != carried.batch.input_ids.shape or not np.array_equal(
        configured.batch.input_ids, carried.batch.input_ids
    )


def test_a_bundle_exported_without_a_choice_carries_the_builtin_corpora(tiny_bundle: Path) -> None:
    m = mf.load(tiny_bundle)
    assert m.calibration["source"] == "built-in generated corpora"
    assert load_texts(tiny_bundle / mf.CALIB_DATA) == builtin_texts(0)  # what the coordinator used before


def test_a_changed_set_is_refused(owner_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    bundle, _ = owner_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with open(copy / mf.CALIB_DATA, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "an example slipped in after export"}) + "\n")
    with pytest.raises(BundleError, match="sha256 differs"):
        CalibrationRunner.from_bundle(copy, mf.load(copy), None, 64)
