"""Synthetic 4-D scans with a planted, known effect, for the demo and the tests.

Four kinds of effect (``EFFECTS``): ``mixed`` (the default: an amplitude and a coupling effect of sex, an amplitude
effect of the cognitive score), ``amplitude``, ``coupling`` (connectivity only) and ``lagged`` (only the direction
of a lag carries the label). Every kind but ``mixed`` also plants a control: the same kind of signal, unrelated to
any label. ``derivatives/planted/planted_effects.json`` says which masks are the truth for which target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal, get_args

import numpy as np

Effect = Literal["mixed", "amplitude", "coupling", "lagged"]
EFFECTS: tuple[str, ...] = get_args(Effect)   # the one list of effect kinds (``brainmt synth --effect`` reads it)
DEFAULT_LAG = 4          # frames between the two regions of a ``lagged`` pair
AMPLITUDE = 2.0          # amplitude of the added slow signal in the effect regions (the noise: AR(1), 0.7 a voxel)
SLOW_RHO = 0.9           # AR(1) coefficient of the planted slow signals
MIN_SIZE = 8             # the smallest grid size along any axis


def brain_mask(volume_shape: tuple[int, int, int] | list[int]) -> np.ndarray:
    """An ellipsoid 'brain' filling most of the volume: bool array of ``volume_shape``."""
    axes = [np.linspace(-1, 1, s) for s in volume_shape]
    grid = np.meshgrid(*axes, indexing="ij")
    return sum(g**2 for g in grid) <= 0.85**2


PLANTED = {
    "region-a": "slow signal s_a (coupled with region-b)",
    "region-b": "g * (c * s_a + sqrt(1 - c^2) * s_b) with c = 0.9, g = 2 for males (sex M) and c = 0.1, g = 1 for "
                "females: sex changes region b's coupling with region a and its amplitude",
    "region-c": "amplitude (1 + 0.5 * z(cognition)) * s_c: cognition scales this region's slow signal",
}

NOTATION = ("s_x: independent AR(1) slow signals (rho 0.9, unit variance); z = (cognition - 100) / 15; L = lag_frames; "
            "coupling and lagged: both regions of a pair rescaled to unit variance in every subject")
DESCRIPTIONS: dict[str, dict[str, str]] = {
    "mixed": PLANTED,
    "amplitude": {
        "region-a": "g * 2 * s_a with g = 2 for males (sex M) and g = 1 for females: sex doubles region a's amplitude",
        "region-c": "2 * max(0.1, 1 + 0.5 * z) * s_c: the cognitive score scales region c's amplitude",
        "region-e": "3 * s_e in everyone (control: the same kind of signal, unrelated to any label)",
    },
    "coupling": {
        "region-a": "2 * s_a",
        "region-b": "2 * s_a for males (region a's signal), 2 * s_b for females (its own, same amplitude): sex "
                    "changes only the a-b coupling, no region's variance",
        "region-c": "2 * s_c",
        "region-d": "2 * (k * s_c + sqrt(1 - k^2) * s_d) with k = clip(0.5 + 0.3 * z, 0, 0.95): the cognitive score "
                    "scales the c-d coupling, variances equal",
        "region-e": "2 * s_e (control)",
        "region-f": "2 * (0.5 * s_e + sqrt(0.75) * s_f) in everyone (control: coupled with e alike in everyone)",
    },
    "lagged": {
        "region-a": "2 * s_a(t)",
        "region-b": "2 * s_a(t - L) for males (b lags a by L frames), 2 * s_a(t + L) for females (b leads a): "
                    "the zero-lag a-b correlation (the autocorrelation of s_a at L) is the same in both sexes",
        "region-c": "2 * s_c(t)",
        "region-d": "2 * (p * s_c(t - L) + q * s_c(t + L) + r * s_d(t)) with w = clip(0.5 * z, -1, 1), p = (1 + w) / 2, "
                    "q = (1 - w) / 2, r = sqrt(1 - p^2 - q^2 - 2pq * acf_c(2L)): the score sets how much of d lags "
                    "rather than leads c; zero-lag c-d correlation (acf_c(L)) and d's variance do not depend on it",
        "region-e": "2 * s_e(t) (control)",
        "region-f": "2 * s_e(t - L) in everyone (control: f lags e by L frames in everyone)",
    },
}

# which regions carry which effect; a tuple of region names per role
ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    "mixed": {"sex": ("region-a", "region-b"), "score": ("region-c",), "control": ()},
    "amplitude": {"sex": ("region-a",), "score": ("region-c",), "control": ("region-e",)},
    "coupling": {"sex": ("region-a", "region-b"), "score": ("region-c", "region-d"), "control": ("region-e", "region-f")},
    "lagged": {"sex": ("region-a", "region-b"), "score": ("region-c", "region-d"), "control": ("region-e", "region-f")},
}
# the new effects' region centres (fractions of the grid): an octahedron, pairs on opposite ends of one axis
_OFFSET = 0.275
CENTRES = {
    "region-a": (0.5 - _OFFSET, 0.5, 0.5), "region-b": (0.5 + _OFFSET, 0.5, 0.5),
    "region-c": (0.5, 0.5 - _OFFSET, 0.5), "region-d": (0.5, 0.5 + _OFFSET, 0.5),
    "region-e": (0.5, 0.5, 0.5 - _OFFSET), "region-f": (0.5, 0.5, 0.5 + _OFFSET),
}


def _sphere(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum((g - c * (s - 1)) ** 2 for g, c, s in zip(grid, centre, shape)) <= radius**2


def planted_regions(shape: tuple[int, int, int], effect: str = "mixed") -> dict[str, np.ndarray]:
    """The regions carrying ``effect``'s planted signals, as disjoint bool masks (inside :func:`brain_mask`)."""
    radius = max(1.5, min(shape) / 7)
    if effect == "mixed":
        return {
            "region-a": _sphere(shape, (0.32, 0.55, 0.55), radius),
            "region-b": _sphere(shape, (0.68, 0.55, 0.55), radius),
            "region-c": _sphere(shape, (0.5, 0.3, 0.4), radius),
        }
    if effect not in ROLES:
        raise ValueError(f"unknown effect {effect!r}; one of {', '.join(EFFECTS)}")
    names = sorted(name for role in ROLES[effect].values() for name in role)
    spheres = {name: _sphere(shape, CENTRES[name], radius) for name in names}
    claimed = sum(s.astype(np.int8) for s in spheres.values())
    return {name: s & (claimed == 1) for name, s in spheres.items()}


def mni_like_affine(shape: tuple[int, int, int], voxel: float = 2.0) -> np.ndarray:
    """An FSL-style MNI affine (x flipped: LAS on disk) centred on the volume."""
    aff = np.diag([-voxel, voxel, voxel, 1.0])
    aff[:3, 3] = [voxel * (shape[0] - 1) / 2, -voxel * (shape[1] - 1) / 2, -voxel * (shape[2] - 1) / 2]
    return aff


def _slow(rng: np.random.Generator, frames: int, rho: float = SLOW_RHO) -> np.ndarray:
    x = np.empty(frames)
    x[0] = rng.standard_normal()
    for t in range(1, frames):
        x[t] = rho * x[t - 1] + np.sqrt(1 - rho**2) * rng.standard_normal()
    return (x - x.mean()) / (x.std() + 1e-8)


def _coupled_pair(rng: np.random.Generator, frames: int, k: float, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """(s, k * s + sqrt(1 - k^2) * n): slow signals with correlation ``k``, both of unit variance (``lag`` unused)."""
    s, n = _slow(rng, frames), _slow(rng, frames)
    y = k * s + np.sqrt(1 - k**2) * n
    return s, y / (y.std() + 1e-8)


def _lagged_pair(rng: np.random.Generator, frames: int, w: float, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """(s(t), p s(t - lag) + q s(t + lag) + r n(t)), p = (1 + w) / 2, q = (1 - w) / 2, r keeping the variance ~1.

    w = 1: the second lags the first by ``lag`` frames; w = -1: it leads. Their zero-lag covariance is
    (p + q) acf(lag) = acf(lag), the same for every w.
    """
    s, n = _slow(rng, frames + 2 * lag), _slow(rng, frames)
    now, past, future = s[lag:lag + frames], s[:frames], s[2 * lag:]
    p, q = (1 + w) / 2, (1 - w) / 2
    acf = float(np.mean(past * future))              # acf of s at 2 * lag (s has zero mean, unit variance)
    r = np.sqrt(max(0.0, 1 - p**2 - q**2 - 2 * p * q * acf))
    y = p * past + q * future + r * n
    return now / (now.std() + 1e-8), y / (y.std() + 1e-8)        # both of unit variance in every subject


def planted_signals(rng: np.random.Generator, frames: int, sex: int, cognition_z: float, effect: str = "mixed",
                    lag: int = DEFAULT_LAG) -> dict[str, np.ndarray]:
    """Each planted region's added slow signal (T,) for one subject: ``DESCRIPTIONS[effect]`` in numbers."""
    if effect == "mixed":      # exactly the original draws and arithmetic: the default scans stay bit-identical
        s_a, s_b, s_c = (_slow(rng, frames).astype(np.float32) for _ in range(3))
        coupling, gain = (0.9, 2.0) if sex == 1 else (0.1, 1.0)
        return {
            "region-a": 2.0 * s_a,
            "region-b": 2.0 * gain * (coupling * s_a + np.sqrt(1 - coupling**2) * s_b),
            "region-c": 2.0 * max(0.1, 1.0 + 0.5 * cognition_z) * s_c,
        }
    if effect == "amplitude":
        s_a, s_c, s_e = (_slow(rng, frames) for _ in range(3))
        return {"region-a": AMPLITUDE * (2.0 if sex == 1 else 1.0) * s_a,
                "region-c": AMPLITUDE * max(0.1, 1.0 + 0.5 * cognition_z) * s_c,
                "region-e": AMPLITUDE * 1.5 * s_e}
    if effect == "coupling":
        pair, strengths = _coupled_pair, (1.0 if sex == 1 else 0.0, float(np.clip(0.5 + 0.3 * cognition_z, 0, 0.95)), 0.5)
    elif effect == "lagged":
        pair, strengths = _lagged_pair, (1.0 if sex == 1 else -1.0, float(np.clip(0.5 * cognition_z, -1, 1)), 1.0)
    else:
        raise ValueError(f"unknown effect {effect!r}; one of {', '.join(EFFECTS)}")
    out = {}
    for (first, second), k in zip(("ab", "cd", "ef"), strengths):
        x, y = pair(rng, frames, k, lag)
        out[f"region-{first}"], out[f"region-{second}"] = AMPLITUDE * x, AMPLITUDE * y
    return {name: series.astype(np.float32) for name, series in out.items()}


def synthetic_scan(rng: np.random.Generator, shape: tuple[int, int, int], frames: int, sex: int, cognition_z: float,
                   patterns: np.ndarray, regions: dict[str, np.ndarray], mask: np.ndarray,
                   anatomy: np.ndarray | None = None, effect: str = "mixed", lag: int = DEFAULT_LAG) -> np.ndarray:
    """One 4-D scan (X, Y, Z, T) float32: smooth networks, AR(1) noise, drift, planted effects; 0 outside the brain.

    ``anatomy`` (n_brain,) is a smooth baseline intensity map shared by all subjects (default flat).
    """
    n_vox = int(mask.sum())
    tcs = np.stack([_slow(rng, frames, 0.8) for _ in range(len(patterns))], axis=1)   # (T, K)
    signal = (tcs @ patterns).astype(np.float32)                                       # (T, n_vox)
    noise = rng.standard_normal((frames, n_vox)).astype(np.float32)
    for t in range(1, frames):
        noise[t] = 0.5 * noise[t - 1] + 0.87 * noise[t]
    signal += 0.7 * noise
    local = planted_signals(rng, frames, sex, cognition_z, effect, lag)
    for name, series in local.items():
        in_brain = regions[name][mask]
        signal[:, in_brain] += series[:, None]
    drift = np.linspace(0, 1, frames, dtype=np.float32)[:, None] * rng.normal(0, 0.5, n_vox).astype(np.float32)
    shared = np.zeros(n_vox, np.float32) if anatomy is None else anatomy
    baseline = 800 + 100 * shared + 5 * rng.standard_normal(n_vox).astype(np.float32)
    vol = np.zeros((frames, *shape), dtype=np.float32)
    vol[:, mask] = baseline + 10.0 * (signal + drift)
    return np.moveaxis(vol, 0, -1)


class SynthArgumentError(ValueError):
    """A bad argument of :func:`write_synthetic_bids`; ``option`` names it (``frames``, ``shape``, ``out``...)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


def min_frames(effect: str = "mixed", lag: int = DEFAULT_LAG) -> int:
    """The fewest frames a scan of ``effect`` may have: ``lagged`` needs room for its lag twice and two frames more."""
    return 2 * lag + 2 if effect == "lagged" else 1


def check_synth_args(out: str | Path, subjects: int, frames: int, shape: tuple[int, int, int] | list[int],
                     effect: str = "mixed", lag: int = DEFAULT_LAG) -> None:
    """Raise :class:`SynthArgumentError` for the first bad argument of :func:`write_synthetic_bids`; writes nothing."""
    if effect not in EFFECTS:
        raise SynthArgumentError("effect", f"must be one of {', '.join(EFFECTS)} (got {effect!r})")
    if subjects < 1:
        raise SynthArgumentError("subjects", f"must be at least 1 (got {subjects})")
    if lag < 1:
        raise SynthArgumentError("lag", f"must be at least 1 frame (got {lag})")
    need = min_frames(effect, lag)
    if frames < need:
        why = f" for effect 'lagged' with a lag of {lag} frames" if effect == "lagged" else ""
        raise SynthArgumentError("frames", f"must be at least {need}{why} (got {frames})")
    if len(shape) != 3 or min(shape) < MIN_SIZE:
        raise SynthArgumentError("shape", f"needs 3 sizes, each at least {MIN_SIZE} (got {'x'.join(map(str, shape))})")
    path = Path(out)
    while not path.exists() and path != path.parent:
        path = path.parent
    if path.exists() and not path.is_dir():
        what = "is an existing file" if path == Path(out) else f"lies under {path}, an existing file"
        raise SynthArgumentError("out", f"{out} {what}, not a directory")


def write_synthetic_bids(out: str | Path, subjects: int, frames: int, shape: tuple[int, int, int] | list[int],
                         seed: int = 0, tr: float = 0.735, workers: int = 1, compress: bool = True,
                         effect: str = "mixed", lag: int = DEFAULT_LAG) -> Path:
    """Write a BIDS dataset of synthetic resting-state scans with planted ``effect`` (one of ``EFFECTS``); returns ``out``.

    Layout: ``sub-XXXX/func/sub-XXXX_task-rest_bold.nii.gz`` (int16 with scaling, LAS like FSL's MNI
    files), ``participants.tsv`` (participant_id, sex, cognition, family_id), and ``derivatives/planted/``:
    ``region-*_mask.nii.gz``, ``truth-sex_mask.nii.gz``, ``truth-score_mask.nii.gz``, ``control_mask.nii.gz``
    (not for ``mixed``) and ``planted_effects.json`` describing each region's signal. Bad arguments raise
    :class:`SynthArgumentError` before anything is written; a failure later removes the folders it created.
    """
    check_synth_args(out, subjects, frames, shape, effect, lag)
    out = Path(out)
    created = out if not out.exists() else None
    while created is not None and not created.parent.exists():
        created = created.parent
    try:
        _write_dataset(out, subjects, frames, tuple(int(s) for s in shape), seed, tr, workers, compress, effect, lag)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return out


def _write_dataset(out: Path, subjects: int, frames: int, shape: tuple[int, int, int], seed: int, tr: float,
                   workers: int, compress: bool, effect: str, lag: int) -> None:
    rng = np.random.default_rng(seed)
    mask = brain_mask(shape)
    regions = {k: v & mask for k, v in planted_regions(shape, effect).items()}
    affine = mni_like_affine(shape)
    # smooth "network" patterns: Gaussian blobs, shared by all subjects
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij"), -1)[mask]
    centres = rng.random((8, 3)) * 0.6 + 0.2
    patterns = np.exp(-((grid[None] - centres[:, None]) ** 2).sum(-1) / (2 * 0.12**2)).astype(np.float32)
    tissue = rng.random((6, 3)) * 0.6 + 0.2   # a smooth "anatomy": baseline intensity shared by all subjects
    anatomy = np.exp(-((grid[None] - tissue[:, None]) ** 2).sum(-1) / (2 * 0.2**2)).sum(0).astype(np.float32)
    sexes = rng.permutation(np.arange(subjects) % 2)
    cognition = rng.normal(100, 15, subjects)
    families, fam = [], 0
    while len(families) < subjects:
        size = int(rng.choice([1, 1, 2, 3]))
        families += [f"fam{fam:04d}"] * size
        fam += 1
    families = families[:subjects]
    _write_planted(out / "derivatives" / "planted", regions, affine, effect, seed, lag)
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "brainmt synthetic resting state", "BIDSVersion": "1.9.0", "DatasetType": "raw"}, indent=1) + "\n")
    rows = ["participant_id\tsex\tcognition\tfamily_id"]
    jobs = []
    for i in range(subjects):
        sid = f"sub-{i + 1:04d}"
        rows.append(f"{sid}\t{'M' if sexes[i] else 'F'}\t{cognition[i]:.2f}\t{families[i]}")
        name = f"{sid}_task-rest_bold.nii{'.gz' if compress else ''}"
        jobs.append((out / sid / "func" / name, int(rng.integers(2**31)), int(sexes[i]),
                     float((cognition[i] - 100) / 15)))
    args = [(path, s, frames, shape, sex, cz, patterns, regions, mask, affine, tr, anatomy, effect, lag)
            for path, s, sex, cz in jobs]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, args))
    else:
        for a in args:
            _write_one(a)
    (out / "participants.tsv").write_text("\n".join(rows) + "\n")


def _write_planted(folder: Path, regions: dict[str, np.ndarray], affine: np.ndarray, effect: str, seed: int,
                   lag: int) -> None:
    """Each region's mask, the truth masks (sex, score), the control's and ``planted_effects.json``."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)

    def save(mask: np.ndarray, name: str) -> str:
        nib.save(nib.Nifti1Image(np.flip(mask, 0).astype(np.uint8), affine), folder / name)
        return name

    masks = {name: save(region, f"{name}_mask.nii.gz") for name, region in regions.items()}
    roles = ROLES[effect]
    union = {role: np.logical_or.reduce([regions[n] for n in names]) for role, names in roles.items() if names}
    columns = {"sex": "sex", "score": "cognition"}
    info = {"seed": seed, "effect": effect, "notation": NOTATION, "effects": DESCRIPTIONS[effect], "masks": masks,
            "truth": {role: {"column": columns[role], "regions": list(roles[role]),
                             "mask": save(union[role], f"truth-{role}_mask.nii.gz")} for role in ("sex", "score")}}
    if effect == "lagged":
        info["lag_frames"] = lag
    if roles["control"]:
        info["control"] = {"regions": list(roles["control"]), "mask": save(union["control"], "control_mask.nii.gz"),
                           "note": "the same kind and amplitude of added slow signal, unrelated to any label"}
    else:
        info["control"] = None
        info["control_note"] = ("no control region: adding one would change the default ('mixed') scans, which stay "
                                "identical to those of earlier versions for the same seed")
    info["orientation"] = "masks are stored like the scans (LAS)"
    (folder / "planted_effects.json").write_text(json.dumps(info, indent=1) + "\n")


def _write_one(args: tuple) -> None:
    import nibabel as nib

    path, seed, frames, shape, sex, cz, patterns, regions, mask, affine, tr, anatomy, effect, lag = args
    vol = synthetic_scan(np.random.default_rng(seed), shape, frames, sex, cz, patterns, regions, mask, anatomy,
                         effect, lag)
    img = nib.Nifti1Image(np.flip(vol, 0), affine)   # stored LAS, as FSL writes MNI data
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
