"""Participants tables (TSV/CSV): ids, targets, sex coding, families; and family-aware, seeded splits."""

from __future__ import annotations

import csv
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from brainmt.config import SPLIT_NAMES

MISSING = {"", "na", "n/a", "nan", "none", "null", "."}
ID_COLUMNS = ("participant_id", "subject_id", "subject", "eid", "id", "sub")
FAMILY_COLUMNS = ("family_id", "family", "familyid", "family_ID")
SEX_COLUMNS = ("sex", "gender")
SEX_CODES = {"m": 1.0, "male": 1.0, "1": 1.0, "1.0": 1.0, "f": 0.0, "female": 0.0, "0": 0.0, "0.0": 0.0}


class PhenotypeError(ValueError):
    """The phenotype table cannot be used as a whole; the message names the file and the problem."""


def normalise_id(raw: str) -> str:
    """Subject id as used everywhere: stripped, without a BIDS ``sub-`` prefix."""
    raw = raw.strip()
    return raw[4:] if raw.startswith("sub-") else raw


@dataclass
class Phenotypes:
    """Per-subject values read from a participants table."""

    path: str
    targets: list[str]
    sex_column: str | None
    family_column: str | None
    values: dict[str, dict[str, float | None]] = field(default_factory=dict)   # subject -> target -> value
    auto_targets: bool = False        # the targets were picked automatically (no --targets)
    problems: dict[str, dict[str, str]] = field(default_factory=dict)          # subject -> target -> problem
    families: dict[str, str] = field(default_factory=dict)
    sex_unused: str | None = None     # a sex column found but left out of --targets: the splits are not stratified

    def target_problem(self, subject: str) -> str | None:
        """Why the subject's targets cannot be used (missing, non-numeric, unrecognised sex), or None."""
        probs = self.problems.get(subject, {})
        if not probs:
            return None
        text = "; ".join(f"{col}: {msg}" for col, msg in sorted(probs.items()))
        if self.auto_targets:
            text += (f" (column(s) {sorted(probs)} were picked as targets automatically, so the subject is dropped; "
                     "name only the targets you need with --targets to keep it)")
        return text


def _delimiter(path: Path, head: str) -> str:
    if path.suffix.lower() == ".tsv":
        return "\t"
    if path.suffix.lower() == ".csv":
        return ","
    return "\t" if head.count("\t") >= head.count(",") else ","


def _separator_hint(path: Path, head: str, delimiter: str) -> str:
    """A hint when the header looks separated by another character than the one the file's name implies."""
    if delimiter == "\t" and "\t" not in head and "," in head:
        return f" ({path.name} looks comma-separated, but a .tsv is read as tab-separated: name it .csv)"
    if delimiter == "," and "," not in head and "\t" in head:
        return f" ({path.name} looks tab-separated, but a .csv is read as comma-separated: name it .tsv)"
    return ""


def _find(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path,
          hint: str = "") -> str | None:
    if wanted:
        if wanted not in columns:
            raise PhenotypeError(f"{path}: no {what} column '{wanted}'; columns are {columns}{hint}")
        return wanted
    lower = {c.lower(): c for c in columns}
    return next((lower[c.lower()] for c in candidates if c.lower() in lower), None)


def _number(raw: str) -> float | None:
    try:
        val = float(raw)
    except ValueError:
        return None
    return val if math.isfinite(val) else None


def _auto_targets(columns: list[str], rows: list[dict], skip: tuple, sex_col: str | None) -> list[str]:
    """The sex column and every column whose present values are mostly numbers."""
    target_cols = []
    for col in columns:
        if col in skip:
            continue
        present = [v for v in ((r.get(col) or "").strip() for r in rows) if v.lower() not in MISSING]
        if col == sex_col or (present and sum(_number(v) is not None for v in present) >= 0.5 * len(present)):
            target_cols.append(col)
    return target_cols


def _row_values(phen: Phenotypes, sid: str, row: dict) -> dict[str, float | None]:
    """One row's target values; a missing or unusable one is None, its problem recorded in ``phen.problems``."""
    values: dict[str, float | None] = {}
    for col in phen.targets:
        raw = (row.get(col) or "").strip()
        if raw.lower() in MISSING:
            values[col] = None
            phen.problems.setdefault(sid, {})[col] = "missing value"
        elif col == phen.sex_column:
            values[col] = SEX_CODES.get(raw.lower())
            if values[col] is None:
                phen.problems.setdefault(sid, {})[col] = f"unrecognised sex value {raw!r} (use M/F, male/female or 0/1)"
        else:
            values[col] = _number(raw)
            if values[col] is None:
                phen.problems.setdefault(sid, {})[col] = f"non-numeric value {raw!r}"
    return values


def read_phenotypes(
    path: str | Path,
    id_column: str | None = None,
    targets: list[str] | None = None,
    sex_column: str | None = None,
    family_column: str | None = None,
) -> Phenotypes:
    """Read a participants table. Targets default to the sex column plus every mostly-numeric column.

    Sex is coded male = 1, female = 0 (M/F, male/female, or 0/1 as UK Biobank codes it).
    Per-subject problems (a missing or non-numeric value, an unrecognised sex) are recorded, not raised:
    those subjects are skipped and counted by the sharder. Table-wide problems raise PhenotypeError.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PhenotypeError(f"{path}: phenotype file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PhenotypeError(f"{path}: cannot read the phenotype file ({exc})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise PhenotypeError(f"{path}: the phenotype file is empty")
    delimiter = _delimiter(path, lines[0])
    hint = _separator_hint(path, lines[0], delimiter)
    reader = csv.DictReader(lines, delimiter=delimiter)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})    # empty names: trailing delimiters
    if repeated:
        raise PhenotypeError(f"{path}: column(s) {repeated} appear more than once in the header{hint}")
    reader.fieldnames = columns
    id_col = _find(columns, id_column, ID_COLUMNS, "id", path, hint)
    if id_col is None:
        raise PhenotypeError(f"{path}: no subject id column (looked for {list(ID_COLUMNS)}; columns are {columns}); "
                             + (hint.strip(" ()") if hint else "name it with --id-column"))
    sex_col = _find(columns, sex_column, SEX_COLUMNS, "sex", path, hint)
    fam_col = _find(columns, family_column, FAMILY_COLUMNS, "family", path, hint)
    numbered = [(reader.line_num, row) for row in reader]      # line_num: the file's line, blank lines counted
    rows = [row for _, row in numbered]
    if targets:
        missing = [t for t in targets if t not in columns]
        if missing:
            raise PhenotypeError(f"{path}: target column(s) {missing} not in the table; columns are {columns}{hint}")
        target_cols = list(targets)
    else:
        target_cols = _auto_targets(columns, rows, (id_col, fam_col), sex_col)
    phen = Phenotypes(str(path), target_cols, sex_col if sex_col in target_cols else None, fam_col,
                      auto_targets=not targets, sex_unused=sex_col if sex_col not in target_cols else None)
    first_line: dict[str, int] = {}
    for line_no, row in numbered:
        if any((v or "").strip() for v in row.get(None) or []):     # DictReader's key for fields past the header's
            raise PhenotypeError(f"{path}: line {line_no} has {len(columns) + len(row[None])} fields, the header "
                                 f"{len(columns)}{hint}")
        raw_id = (row.get(id_col) or "").strip()
        if not raw_id:
            raise PhenotypeError(f"{path}: line {line_no} has an empty subject id")
        sid = normalise_id(raw_id)
        if sid in first_line:
            raise PhenotypeError(f"{path}: duplicate subject id '{raw_id}' on lines {first_line[sid]} and {line_no}")
        first_line[sid] = line_no
        phen.values[sid] = _row_values(phen, sid, row)
        if fam_col:
            fam = (row.get(fam_col) or "").strip()
            phen.families[sid] = fam if fam.lower() not in MISSING else f"__own_{sid}"
    if not phen.values:
        raise PhenotypeError(f"{path}: the phenotype table has no rows")
    return phen


def make_splits(
    subjects: list[str],
    families: dict[str, str] | None = None,
    strata: dict[str, float | None] | None = None,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict:
    """Seeded train/validation/test subject lists; a family never spans two splits; stratified if ``strata``.

    Families are the unit: they are shuffled within each stratum (a family's stratum is its majority
    value, e.g. sex) and each goes to the split furthest below its target share of subjects.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    families = families or {}
    groups: dict[str, list[str]] = defaultdict(list)
    for sid in sorted(subjects):
        groups[families.get(sid, f"__own_{sid}")].append(sid)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for gid, members in sorted(groups.items()):
        if strata:
            vals = [strata.get(m) for m in members]
            key = str(max(set(vals), key=lambda v: (vals.count(v), str(v))))
        else:
            key = "all"
        by_stratum[key].append(gid)
    rng = random.Random(seed)
    names = SPLIT_NAMES
    out: dict[str, list[str]] = {n: [] for n in names}
    for key in sorted(by_stratum):
        gids = by_stratum[key]
        rng.shuffle(gids)
        gids.sort(key=lambda g: -len(groups[g]))  # big families first, random order among equals (stable sort)
        total = sum(len(groups[g]) for g in gids)
        counts = dict.fromkeys(names, 0)
        for gid in gids:
            deficit = {n: fractions[i] * total - counts[n] for i, n in enumerate(names)}
            target = max(names, key=lambda n: (deficit[n], -names.index(n)))
            counts[target] += len(groups[gid])
            out[target].extend(groups[gid])
    return {
        "seed": seed,
        "fractions": dict(zip(names, fractions)),
        "grouped_by": "family" if families else "subject",
        "stratified": bool(strata),
        **{n: sorted(out[n]) for n in names},
    }
