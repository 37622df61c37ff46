"""nilearn figures and named atlases, without the network: a missing atlas names nilearn's data directory, a cached
one is read with every download refused, a labelled atlas goes through the fetched-atlas code, bad names are clear.

The end-to-end figures and the region table of a named atlas on a trained model are in test_analysis.py (they
share its demo run).
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import requests

from brainmt.analysis import atlases
from brainmt.analysis.atlases import (
    STANDARD_ATLASES,
    atlas_kind,
    check_atlas,
    fetch_standard,
    fetched_label_names,
    resolve_atlas,
)
from brainmt.analysis.figures import brain_map_figures, figure_threshold
from brainmt.analysis.maps import BrainGrid
from brainmt.analysis.regions import AtlasError
from brainmt.cli import main
from brainmt.data.loader import ShardSet

MNI_2MM = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])   # FSL's MNI152 2 mm grid


@pytest.fixture
def offline(tmp_path, monkeypatch) -> dict:
    """An empty nilearn data directory of this test, and a network that is never reached (reachable() records
    the URL it was asked about and answers False)."""
    data = tmp_path / "nilearn_data"
    monkeypatch.setenv("NILEARN_DATA", str(data))
    monkeypatch.delenv("NILEARN_SHARED_DATA", raising=False)
    asked: list[str] = []

    def unreachable(url: str, timeout: float = 5.0) -> bool:
        asked.append(url)
        return False

    monkeypatch.setattr(atlases, "reachable", unreachable)
    return {"data": data, "asked": asked}


def test_uncached_atlas_without_network_names_the_cache_directory(offline, capsys):
    started = time.perf_counter()
    with pytest.raises(AtlasError) as info:
        check_atlas("schaefer-200")
    message = str(info.value)
    print(message)
    assert time.perf_counter() - started < 5                          # refused at once, no download attempted
    assert "atlas schaefer-200 (Schaefer 2018, 200 parcels, 7 networks (2 mm)) is not in nilearn's data directory" in message
    assert f"nilearn keeps atlases in {offline['data']}" in message and "login node" in message
    assert (f'NILEARN_DATA={offline["data"]} python -c "from nilearn import datasets; '
            'datasets.fetch_atlas_schaefer_2018(n_rois=200, yeo_networks=7, resolution_mm=2)"') in message
    assert len(offline["asked"]) == 1 and "githubusercontent.com" in offline["asked"][0]
    assert "raw.githubusercontent.com cannot be reached" in message
    # the same through `brainmt analyze`, before any run or subject is looked at
    assert main(["analyze", "--run", "no-such-run", "--atlas", "aal"]) == 1
    err = capsys.readouterr().err
    assert "brainmt analyze: error: atlas aal (AAL, SPM12 version (116 regions)) is not in nilearn's data directory" in err
    assert str(offline["data"]) in err and "fetch_atlas_aal(version='SPM12')" in err


def _fake_schaefer_cache(data: Path) -> None:
    """Schaefer 2018 (100 parcels, 7 networks, 2 mm) as nilearn stores it: 1-4 in the middle of the brain by
    quadrant (x < 0 or not, y < 0 or not), 5-100 in a corner far from it, background in another."""
    folder = data / "schaefer_2018"
    folder.mkdir(parents=True)
    ijk = np.indices((91, 109, 91)).reshape(3, -1)
    x, y, _ = MNI_2MM[:3, :3] @ ijk + MNI_2MM[:3, 3:4]
    labels = (1 + (x >= 0) + 2 * (y >= 0)).reshape(91, 109, 91).astype(np.int16)
    labels[:10, :10, :10] = (5 + np.arange(1000) % 96).reshape(10, 10, 10)
    labels[-10:, -10:, -10:] = 0                                                    # background
    nib.save(nib.Nifti1Image(labels, MNI_2MM), folder / "Schaefer2018_100Parcels_7Networks_order_FSLMNI152_2mm.nii.gz")
    (folder / "Schaefer2018_100Parcels_7Networks_order.txt").write_text(
        "".join(f"{i}\t7Networks_{'LH' if i % 2 else 'RH'}_Parcel_{i}\t120\t18\t134\t0\n" for i in range(1, 101)))


def test_cached_atlas_is_read_without_the_network(small_shards, offline):
    _fake_schaefer_cache(offline["data"])
    grid = BrainGrid(ShardSet(small_shards))
    parcellation = resolve_atlas("schaefer-100", None, grid)
    assert not offline["asked"]                                        # found in the cache: the network never asked
    ijk = np.indices(grid.canonical_shape).reshape(3, -1)
    x, y, _ = (grid.canonical_affine[:3, :3] @ ijk + grid.canonical_affine[:3, 3:4])
    want = grid.pack((1 + (x >= 0) + 2 * (y >= 0)).reshape(grid.canonical_shape))
    np.testing.assert_array_equal(parcellation.labels, want)
    assert {v: parcellation.names[v] for v in range(1, 5)} == {1: "7Networks_LH_Parcel_1", 2: "7Networks_RH_Parcel_2",
                                                               3: "7Networks_LH_Parcel_3", 4: "7Networks_RH_Parcel_4"}
    assert parcellation.short == "schaefer-100" and parcellation.description.startswith("Schaefer 2018, 100 parcels")
    assert "fetch_atlas_schaefer_2018(n_rois=100, yeo_networks=7, resolution_mm=2)" in parcellation.description
    assert check_atlas("schaefer-100") == STANDARD_ATLASES["schaefer-100"].title


def test_uncached_atlas_is_downloaded_when_the_host_answers(monkeypatch, offline):
    """The first, cache-only call is refused at its request; the host answers; the second call downloads."""
    import nilearn.datasets

    calls: list[str] = []
    atlas = {"maps": "aal.nii", "labels": ["Background", "Precentral_L"], "indices": ["0", "2001"]}

    def fake_fetch(version: str, verbose: int = 1) -> dict:
        calls.append(version)
        if len(calls) == 1:      # what nilearn does for a missing file: a request through a requests session
            requests.Session().send(requests.Request("GET", "https://atlas.example/aal_for_SPM12.tar.gz").prepare())
        return atlas

    monkeypatch.setattr(nilearn.datasets, "fetch_atlas_aal", fake_fetch)
    monkeypatch.setattr(atlases, "reachable", lambda url, timeout=5.0: offline["asked"].append(url) or True)
    assert fetch_standard(STANDARD_ATLASES["aal"]) is atlas
    assert calls == ["SPM12", "SPM12"] and offline["asked"] == ["https://atlas.example/aal_for_SPM12.tar.gz"]
    assert requests.Session.send.__name__ == "send"                     # the refusal is undone
    assert fetched_label_names(atlas) == {2001: "Precentral_L"}


def test_label_names_of_fetched_atlases():
    lut = pd.DataFrame({"index": [0, 1, 2], "name": ["Background", "Frontal Pole", "Insular Cortex"]})
    assert fetched_label_names({"lut": lut, "labels": list(lut["name"])}) == {1: "Frontal Pole", 2: "Insular Cortex"}
    assert fetched_label_names({"labels": ["Background", "a", "b"]}) == {1: "a", 2: "b"}
    assert fetched_label_names({"labels": [b"7Networks_LH_Vis_1", b"7Networks_LH_Vis_2"]}) == {  # older nilearn: bytes
        1: "7Networks_LH_Vis_1", 2: "7Networks_LH_Vis_2"}


def test_bad_atlas_names_are_clear_errors(tmp_path, capsys):
    assert main(["analyze", "--run", "no-such-run", "--atlas", "bogus"]) == 1
    err = capsys.readouterr().err
    assert "unknown atlas 'bogus'" in err and "harvard-oxford" in err and "schaefer-100 ... schaefer-1000" in err
    assert main(["analyze", "--run", "no-such-run", "--atlas", str(tmp_path / "atlas.nii.gz")]) == 1
    assert f"{tmp_path / 'atlas.nii.gz'}: atlas file not found" in capsys.readouterr().err
    assert main(["analyze", "--run", "no-such-run", "--atlas", "schaefer-400", "--atlas-labels", "names.txt"]) == 1
    assert "--atlas-labels goes with a NIfTI atlas; schaefer-400 brings its own region names" in capsys.readouterr().err
    with pytest.raises(AtlasError, match="unknown atlas 'schaefer-150'"):
        atlas_kind("schaefer-150")
    assert atlas_kind(None) == atlas_kind("lobes") == "lobes" and atlas_kind("schaefer-1000-17") == "standard"


def test_brain_map_figures_draw_maps_outside_mni(small_shards, tmp_path):
    """A map whose grid is 3 mm voxels 60 mm away from the MNI origin (scanner space) still draws, thresholded at
    the percentile of its |values| over the brain."""
    grid = BrainGrid(ShardSet(small_shards))
    grid.affine = grid.affine @ np.diag([1.5, 1.5, 1.5, 1.0]) + np.array([[0, 0, 0, 60]] * 3 + [[0, 0, 0, 0]])
    values = np.random.default_rng(0).standard_normal(grid.n_brain).astype(np.float32)
    records = brain_map_figures(grid, values, tmp_path / "figures" / "scanner_space", "random map", True, 75.0)
    assert figure_threshold(values, 75.0) == pytest.approx(np.quantile(np.abs(values), 0.75))
    assert [Path(r["file"]).name for r in records] == ["scanner_space_stat.png", "scanner_space_glass.png"]
    for record in records:
        assert Path(record["file"]).stat().st_size > 20_000 and record["threshold"] == figure_threshold(values, 75.0)
    zeros = brain_map_figures(grid, np.zeros(grid.n_brain), tmp_path / "zeros", "a t-map of one subject", True)
    assert all(Path(r["file"]).exists() and r["threshold"] == 0 for r in zeros)
