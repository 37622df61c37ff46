"""Which parcellation a region table uses: the built-in lobes, a user NIfTI atlas, or a standard atlas by name.

``--atlas`` (``analysis.atlas``) takes ``lobes`` (the default), a name from :data:`STANDARD_ATLASES`
(Harvard-Oxford, Schaefer 2018 with 100-1000 parcels, AAL) or the path of an integer-labelled NIfTI.

A named atlas comes through nilearn's fetcher. It is first looked up in nilearn's data directory with every
download refused, so a cached atlas never touches the network. When it is not there, the source host is tried
for a few seconds (through the proxy when one is set); if it answers, nilearn downloads the atlas into its data
directory, and if not, the error names that directory and the one-line command that fills it on a machine with
network (a login node). Nothing here waits longer than :data:`CONNECT_TIMEOUT_S` on a machine without network.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmt.analysis.maps import BrainGrid
from brainmt.analysis.regions import AtlasError, builtin_lobes, labels_on_grid, load_atlas, named_labels

LOBES = "lobes"
LOBES_DESCRIPTION = "built-in coarse lobes (brainmt.analysis.regions.builtin_lobes)"
CONNECT_TIMEOUT_S = 5.0      # how long the source host of an uncached atlas may take to accept a connection


@dataclass(frozen=True)
class StandardAtlas:
    """A deterministic parcellation that nilearn fetches: ``nilearn.datasets.<fetcher>(**kwargs)``."""

    name: str                                  # the --atlas value
    title: str
    fetcher: str
    kwargs: tuple[tuple[str, object], ...]

    def call(self) -> str:
        """The fetcher call as Python source, e.g. ``fetch_atlas_aal(version='SPM12')``."""
        return f"{self.fetcher}({', '.join(f'{k}={v!r}' for k, v in self.kwargs)})"


def _standard_atlases() -> dict[str, StandardAtlas]:
    atlases = [
        StandardAtlas("harvard-oxford", "Harvard-Oxford cortical atlas, lateralised (max. probability, 25% threshold, 2 mm)",
                      "fetch_atlas_harvard_oxford", (("atlas_name", "cortl-maxprob-thr25-2mm"),)),
        StandardAtlas("harvard-oxford-sub", "Harvard-Oxford subcortical atlas (max. probability, 25% threshold, 2 mm)",
                      "fetch_atlas_harvard_oxford", (("atlas_name", "sub-maxprob-thr25-2mm"),)),
        StandardAtlas("aal", "AAL, SPM12 version (116 regions)", "fetch_atlas_aal", (("version", "SPM12"),)),
    ]
    for parcels in range(100, 1001, 100):
        for networks in (7, 17):
            atlases.append(StandardAtlas(f"schaefer-{parcels}" + ("-17" if networks == 17 else ""),
                                         f"Schaefer 2018, {parcels} parcels, {networks} networks (2 mm)",
                                         "fetch_atlas_schaefer_2018",
                                         (("n_rois", parcels), ("yeo_networks", networks), ("resolution_mm", 2))))
    return {a.name: a for a in atlases}


STANDARD_ATLASES = _standard_atlases()
ATLAS_CHOICES = ("lobes, harvard-oxford, harvard-oxford-sub, aal, schaefer-100 ... schaefer-1000 (in steps of 100; "
                 "7 networks, add -17 for 17: schaefer-400-17) or the path of an integer-labelled NIfTI")


@dataclass
class Parcellation:
    """An atlas on the brain voxels: (n_brain,) labels (0: none), their names, and how to cite it."""

    labels: np.ndarray
    names: dict[int, str]
    description: str       # summary.json and the printed table
    short: str             # chart titles


def atlas_kind(spec: str | None) -> str:
    """``lobes``, ``standard`` or ``file`` for an ``--atlas`` value; an unknown name is an :class:`AtlasError`."""
    if spec is None or spec == LOBES:
        return LOBES
    if spec in STANDARD_ATLASES:
        return "standard"
    path = Path(spec)
    if path.exists():
        return "file"
    if os.sep in spec or "/" in spec or spec.lower().endswith((".nii", ".nii.gz")):
        raise AtlasError(f"{spec}: atlas file not found")
    raise AtlasError(f"unknown atlas {spec!r}: not a file, and not one of the named atlases; --atlas takes {ATLAS_CHOICES}")


def _kind_with_labels(spec: str | None, labels_path: str | None) -> str:
    kind = atlas_kind(spec)
    if kind != "file" and labels_path:
        raise AtlasError(f"--atlas-labels goes with a NIfTI atlas; {spec or LOBES} brings its own region names")
    return kind


def check_atlas(spec: str | None, labels_path: str | None = None) -> str:
    """Make sure the atlas can be used before any work: a known name (fetched now when it is not cached), or an
    existing file (and label file); returns its description."""
    kind = _kind_with_labels(spec, labels_path)
    if kind == LOBES:
        return LOBES_DESCRIPTION
    if kind == "file":
        if labels_path and not Path(labels_path).exists():
            raise AtlasError(f"{labels_path}: label file not found")
        return str(spec)
    atlas = STANDARD_ATLASES[str(spec)]
    fetch_standard(atlas)
    return atlas.title


def resolve_atlas(spec: str | None, labels_path: str | None, grid: BrainGrid) -> Parcellation:
    """The parcellation of ``--atlas`` on ``grid``'s brain voxels (named atlases are fetched or read from the cache)."""
    kind = _kind_with_labels(spec, labels_path)
    if kind == LOBES:
        labels, names = builtin_lobes(grid)
        return Parcellation(labels, names, LOBES_DESCRIPTION, "built-in lobes")
    if kind == "file":
        labels, names = load_atlas(str(spec), labels_path, grid)
        return Parcellation(labels, names, str(spec), Path(str(spec)).name)
    atlas = STANDARD_ATLASES[str(spec)]
    fetched = fetch_standard(atlas)
    labels, names = fetched_atlas(fetched, grid, f"atlas {atlas.name}")
    maps = fetched["maps"]
    where = fetched.get("filename") or (str(maps) if isinstance(maps, (str, os.PathLike)) else None)
    return Parcellation(labels, names, f"{atlas.title}; nilearn.datasets.{atlas.call()}" + (f", {where}" if where else ""),
                        atlas.name)


def fetched_atlas(fetched: Mapping, grid: BrainGrid, source: str) -> tuple[np.ndarray, dict[int, str]]:
    """A fetched atlas (nilearn's ``maps`` image or path, and ``lut`` / ``indices`` + ``labels``) on the brain
    voxels: (n_brain,) labels and their names."""
    import nibabel as nib

    maps = fetched["maps"]
    img = nib.load(str(maps)) if isinstance(maps, (str, os.PathLike)) else maps
    packed = labels_on_grid(np.asarray(img.dataobj), img.affine, grid, source)
    return packed, named_labels(packed, fetched_label_names(fetched))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def fetched_label_names(fetched: Mapping) -> dict[int, str]:
    """Label value -> name of a fetched atlas: from its ``lut`` (nilearn >= 0.11), its ``indices`` (AAL), or the
    ``labels`` list (value = position, counting from 0 when the list starts with the background)."""
    lut = fetched.get("lut")
    if lut is not None:
        pairs = zip(lut["index"], lut["name"])
    elif fetched.get("indices") is not None:
        pairs = zip(fetched["indices"], fetched["labels"])
    else:
        labels = list(fetched["labels"])
        first = _text(labels[0]).lower() if labels else ""
        pairs = enumerate(labels, start=0 if first in ("background", "unknown") else 1)
    names = {int(value): _text(name).strip() for value, name in pairs}
    names.pop(0, None)
    return names


def nilearn_data_dirs() -> list[str]:
    """Where nilearn looks for (and stores) datasets: NILEARN_SHARED_DATA, NILEARN_DATA, else ~/nilearn_data."""
    from nilearn.datasets import get_data_dirs

    return [str(d) for d in get_data_dirs()]


class _DownloadRefused(Exception):
    """Raised in place of a download while an atlas is looked up in nilearn's data directory only."""


@contextlib.contextmanager
def _cache_only() -> Iterator[list[str]]:
    """Refuse every HTTP(S)/FTP request nilearn makes (all go through ``requests.Session.send``); yields the URLs."""
    import requests

    refused: list[str] = []
    original = requests.Session.send

    def refuse(self: requests.Session, request: requests.PreparedRequest, **kwargs: object) -> None:
        refused.append(request.url)
        raise _DownloadRefused(request.url)

    requests.Session.send = refuse
    try:
        yield refused
    finally:
        requests.Session.send = original


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host (or to the proxy configured for it) opens within ``timeout``
    seconds; a name lookup that hangs counts as unreachable."""
    parsed = urllib.parse.urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and parsed.hostname and not urllib.request.proxy_bypass(parsed.hostname):
        parsed = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
    if not parsed.hostname:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 21 if parsed.scheme == "ftp" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def fetch_standard(atlas: StandardAtlas) -> Mapping:
    """nilearn's fetch of a named atlas: from its data directory when it is there (no network touched), else
    downloaded when the source host answers; otherwise an :class:`AtlasError` that says how to fill the cache."""
    import nilearn.datasets

    fetcher = getattr(nilearn.datasets, atlas.fetcher)
    kwargs = dict(atlas.kwargs)
    with _cache_only() as refused:
        try:
            return fetcher(**kwargs, verbose=0)
        except Exception as exc:   # nilearn may wrap the refusal; a refused request is what tells it apart
            if not refused:
                raise AtlasError(f"atlas {atlas.name}: nilearn could not read it from {', '.join(nilearn_data_dirs())} "
                                 f"({type(exc).__name__}: {exc}); delete its folder there to fetch it again") from None
    url = refused[0]
    if not reachable(url):
        raise AtlasError(not_cached_message(atlas, url))
    try:
        return fetcher(**kwargs, verbose=0)
    except Exception as exc:
        raise AtlasError(f"atlas {atlas.name}: the download from {url} failed ({type(exc).__name__}: {exc}).\n"
                         + fill_instructions(atlas)) from None


def fill_instructions(atlas: StandardAtlas) -> str:
    """How to put a named atlas into nilearn's data directory from a machine with network."""
    dirs = nilearn_data_dirs()
    return (f"nilearn keeps atlases in {dirs[0]}" + (f" (it also looks in {', '.join(dirs[1:])})" if dirs[1:] else "")
            + "; the environment variables NILEARN_DATA / NILEARN_SHARED_DATA move it (default ~/nilearn_data). "
            f"Fill it once on a machine with network that sees the same directory (a login node):\n"
            f"  NILEARN_DATA={dirs[0]} python -c \"from nilearn import datasets; datasets.{atlas.call()}\"\n"
            f"then run this again with the same NILEARN_DATA (in a container, bind that directory too), or pass "
            f"--atlas PATH.nii.gz (with --atlas-labels) instead.")


def not_cached_message(atlas: StandardAtlas, url: str) -> str:
    """The error for a named atlas that is neither cached nor downloadable from here."""
    host = urllib.parse.urlparse(url).hostname or url
    return (f"atlas {atlas.name} ({atlas.title}) is not in nilearn's data directory, and {host} cannot be reached "
            f"from this machine within {CONNECT_TIMEOUT_S:g} s (no network on a compute node?).\n"
            + fill_instructions(atlas))
