"""A group |IG| map scored against the planted truth of a synthetic cohort (``brainmt analyze --truth``).

``brainmt synth`` writes ``derivatives/planted/``: each region's mask, the truth mask of each label (``sex``,
``score``), a control region carrying the same kind of added signal unrelated to any label (not in the
``mixed`` cohort) and ``planted_effects.json``. Two numbers say whether the map points at what drives the label:

- ``truth_auroc``: brain voxels ranked by the map, the label's truth mask against every other brain voxel;
- ``effect_vs_control_auroc``: the truth voxels against the control's only. |IG| follows signal variance
  wherever the model looks, so a map can find the planted regions without the model having learned the
  label; only this comparison tells the two apart.

Both are given for the group mean |IG| map, for the group mean |net IG| (``net``: ``group_mean_abs_net_ig``, each
subject's signed map, its attributions summed over the frames, made absolute and averaged over the subjects), for
the absolute value of the contrast map (``group_contrast_ig``:
the signed maps' difference between the classes, or their slope on a score), which cancels what every subject
shares, and, for a class label, for the class means (``class_means``: each class's mean signed map, its absolute
value averaged over the classes). The net map and the class means drop what |IG| keeps from attributions that
cancel within a subject (|IG| takes the absolute value of each frame's attribution before summing them); the class
means also drop what cancels between the subjects of a class, and keep a region the model reads alike in both
classes, which the contrast cancels. Where these are specific and |IG| is not, the model does not read the
control: |IG| there is the control's variance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from brainmt.train.metrics import auroc


class TruthError(ValueError):
    """The truth folder is missing, or does not fit the map; the message names the file."""


def _load_on_grid(path: Path, like: nib.Nifti1Image | None = None) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A NIfTI and its values (float64); with ``like``, it must be on that image's grid."""
    if not Path(path).exists():
        raise TruthError(f"{path}: not found")
    img = nib.load(path)
    if like is not None and (img.shape[:3] != like.shape[:3] or not np.allclose(img.affine, like.affine, atol=1e-3)):
        raise TruthError(f"{path}: grid {img.shape[:3]} (affine {np.round(img.affine, 2).tolist()}) differs from the "
                         f"map's {like.shape[:3]} (affine {np.round(like.affine, 2).tolist()}): not the same cohort?")
    return img, np.asarray(img.dataobj, dtype=np.float64)


def _load_mask(path: Path, like: nib.Nifti1Image) -> np.ndarray:
    return _load_on_grid(path, like)[1] > 0


def read_truth(planted_dir: str | Path) -> dict:
    """``planted_effects.json`` of a planted folder; a clear error when it is not one."""
    info_path = Path(planted_dir) / "planted_effects.json"
    if not info_path.exists():
        raise TruthError(f"{info_path}: not found (--truth takes the derivatives/planted folder brainmt synth writes)")
    try:
        return json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise TruthError(f"{info_path}: not valid JSON ({exc})") from None


def truth_scores(map_path: str | Path, planted_dir: str | Path, target: str, contrast_path: str | Path | None = None,
                 class_mean_paths: Sequence[str | Path] = (), net_path: str | Path | None = None) -> dict:
    """Voxel AUROCs of ``map_path`` (brain voxels: where it is non-zero) for the truth of ``target``; with
    ``net_path`` (``group_mean_abs_net_ig``) the same two AUROCs of it, under ``net``; with
    ``contrast_path`` (``group_contrast_ig``) those of its absolute value, under ``contrast``; with two
    or more ``class_mean_paths`` (``group_<class>_mean_ig``) those of their absolute values' mean, under
    ``class_means``."""
    planted_dir = Path(planted_dir)
    info_path = planted_dir / "planted_effects.json"
    info = read_truth(planted_dir)
    role = next((r for r, truth in info.get("truth", {}).items() if truth.get("column") == target), None)
    if role is None:
        raise TruthError(f"{info_path}: no truth for target {target!r} (it has {sorted(info.get('truth', {}))})")
    img, values = _load_on_grid(Path(map_path))
    brain = values != 0
    truth = _load_mask(planted_dir / info["truth"][role]["mask"], img) & brain
    control = info.get("control")
    control_mask = _load_mask(planted_dir / control["mask"], img) & brain & ~truth if control else None

    def aurocs(v: np.ndarray) -> dict:
        both = None if control_mask is None else truth | control_mask
        return {"truth_auroc": auroc(truth[brain], v[brain]),
                "effect_vs_control_auroc": None if both is None else auroc(truth[both], v[both])}

    scores = {"map": str(map_path), "target": target, "effect": info.get("effect"),
              "truth_regions": info["truth"][role]["regions"], "truth_voxels": int(truth.sum()), **aurocs(values)}
    if control:
        scores["control_regions"] = control["regions"]
    if net_path is not None:
        scores["net"] = {"map": str(net_path), **aurocs(_load_on_grid(Path(net_path), img)[1])}
    if contrast_path is not None:
        scores["contrast"] = {"map": str(contrast_path), **aurocs(np.abs(_load_on_grid(Path(contrast_path), img)[1]))}
    if len(class_mean_paths) >= 2:
        means = np.mean([np.abs(_load_on_grid(Path(p), img)[1]) for p in class_mean_paths], axis=0)
        scores["class_means"] = {"maps": [str(p) for p in class_mean_paths], **aurocs(means)}
    scores["region_mean"] = {name: float(values[_load_mask(planted_dir / file, img) & brain].mean())
                             for name, file in info["masks"].items()}
    scores["brain_mean"] = float(values[brain].mean())
    return scores


def truth_text(scores: dict) -> str:
    """The console lines: the group |IG| map, and the net map, the contrast map and the class means when there are
    some."""
    def line(what: str, found: dict) -> str:
        control = found["effect_vs_control_auroc"]
        return (f"{what}: voxel AUROC {found['truth_auroc']:.3f}"
                + (f"; against the control ({'+'.join(scores['control_regions'])}) {control:.3f}" if control is not None
                   else "; no control region in this cohort"))

    head = f"truth ({scores['effect']} cohort, target '{scores['target']}', {'+'.join(scores['truth_regions'])})"
    lines = [line(f"{head}, group |IG|", scores)]
    if scores.get("net"):
        lines.append(line(f"{head}, group |net IG|", scores["net"]))
    if scores.get("contrast"):
        lines.append(line(f"{head}, |contrast|", scores["contrast"]))
    if scores.get("class_means"):
        lines.append(line(f"{head}, |class means|", scores["class_means"]))
    return "\n".join(lines)
