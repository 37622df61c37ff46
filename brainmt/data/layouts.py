"""Find 4-D scans in the directory layouts users have: BIDS/fMRIPrep, UK Biobank, HCP, or any glob."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from brainmt.config import ShardLayout, literal_values
from brainmt.data.phenotypes import normalise_id

LAYOUTS = tuple(v for v in literal_values(ShardLayout) if v != "auto")   # the layouts a directory can have
UKB_GLOB = "*/fMRI/filtered_func_data_clean_MNI.nii*"
HCP_GLOB = "*/MNINonLinear/Results/rfMRI_REST1_LR/rfMRI_REST1_LR.nii*"
_BIDS_ENTITY = re.compile(r"(?:^|_)(sub|ses|task|run|space)-([A-Za-z0-9]+)")


class LayoutError(ValueError):
    """No usable scans, or an ambiguous layout; the message says what was looked for where."""


@dataclass(frozen=True)
class ScanSource:
    """One scan file: ``scan_id`` is unique and safe as a WebDataset key (no dots); ``subject`` its participant."""

    scan_id: str
    subject: str
    path: Path


def safe_key(text: str) -> str:
    """A WebDataset-safe key: letters, digits, '-' and '_' only (the key ends at the first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", text)


def _is_nifti(p: Path) -> bool:
    """A NIfTI file, or a link to one (a dangling link, e.g. a DataLad file not fetched, is found and then skipped
    with its reason, not dropped unseen)."""
    return p.name.endswith((".nii", ".nii.gz")) and (p.is_file() or p.is_symlink())


def _bids(root: Path, space: str | None) -> list[ScanSource]:
    files = sorted(p for p in root.glob("**/sub-*/**/func/*_bold.nii*") if _is_nifti(p))
    files += sorted(p for p in root.glob("sub-*/func/*_bold.nii*") if _is_nifti(p) and p not in files)
    files = sorted(set(files))
    parsed = [(p, dict(_BIDS_ENTITY.findall(p.name.split(".")[0]))) for p in files]
    if space:
        parsed = [(p, e) for p, e in parsed if e.get("space") == space]
    elif any("space" in e for _, e in parsed):  # fMRIPrep: keep the MNI outputs
        parsed = [(p, e) for p, e in parsed if e.get("space", "").startswith("MNI")]
    tasks = {e.get("task") for _, e in parsed}
    out = []
    for p, e in parsed:
        if "sub" not in e:
            continue
        parts = [f"sub-{e['sub']}"]
        if "ses" in e:
            parts.append(f"ses-{e['ses']}")
        if len(tasks) > 1 and "task" in e:
            parts.append(f"task-{e['task']}")
        if "run" in e:
            parts.append(f"run-{e['run']}")
        out.append(ScanSource(safe_key("_".join(parts)), normalise_id(e["sub"]), p))
    return out


def _by_parent(root: Path, pattern: str) -> list[ScanSource]:
    out = []
    for p in sorted(root.glob(pattern)):
        if _is_nifti(p):
            subject = p.relative_to(root).parts[0]
            out.append(ScanSource(safe_key(subject), normalise_id(subject), p))
    return out


def _glob(root: Path, pattern: str | None, regex: str | None) -> list[ScanSource]:
    if not pattern or not regex:
        raise LayoutError("--layout glob needs --glob PATTERN and --subject-regex REGEX")
    rx = re.compile(regex)
    out = []
    for p in sorted(root.glob(pattern)):
        if not _is_nifti(p):
            continue
        rel = str(p.relative_to(root))
        m = rx.search(rel)
        if not m:
            raise LayoutError(f"{p}: --subject-regex {regex!r} does not match its path {rel!r}")
        subject = m.group("subject") if "subject" in rx.groupindex else (m.group(1) if m.groups() else m.group(0))
        if not subject:
            raise LayoutError(f"{p}: --subject-regex {regex!r} matches its path {rel!r} with an empty subject")
        out.append(ScanSource(safe_key(subject), normalise_id(subject), p))
    return out


def find_scans(root: str | Path, layout: str = "auto", glob: str | None = None, subject_regex: str | None = None,
               bids_space: str | None = None) -> tuple[str, list[ScanSource]]:
    """Find the scans under ``root``; ``layout`` "auto" tries BIDS, UK Biobank and HCP. Returns (layout, scans)."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: input directory not found")
    if layout == "auto" and glob:
        layout = "glob"
    finders = {
        "bids": lambda: _bids(root, bids_space),
        "ukb": lambda: _by_parent(root, UKB_GLOB),
        "hcp": lambda: _by_parent(root, HCP_GLOB),
        "glob": lambda: _glob(root, glob, subject_regex),
    }
    if layout == "auto":
        found = {name: finders[name]() for name in ("bids", "ukb", "hcp")}
        hits = [name for name, scans in found.items() if scans]
        if len(hits) != 1:
            what = "no scans" if not hits else f"scans of several layouts ({', '.join(hits)})"
            raise LayoutError(
                f"{root}: found {what}; looked for BIDS 'sub-*/[ses-*/]func/*_bold.nii.gz', UK Biobank '{UKB_GLOB}', "
                f"HCP '{HCP_GLOB}'. Choose one with --layout, or use --glob PATTERN --subject-regex REGEX"
            )
        layout, scans = hits[0], found[hits[0]]
    elif layout in finders:
        scans = finders[layout]()
    else:
        raise LayoutError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)} or auto")
    if not scans:
        raise LayoutError(f"{root}: no scans found for layout {layout}")
    seen: dict[str, Path] = {}
    for s in scans:
        if s.scan_id in seen:
            raise LayoutError(f"two scans map to the same id '{s.scan_id}': {seen[s.scan_id]} and {s.path}")
        seen[s.scan_id] = s.path
    return layout, scans
