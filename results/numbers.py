"""The paper's reported numbers (results/paper/numbers.yaml), loaded and validated.

Each number has an id ``<table>/<pipeline>/bs<B>/<optimizer>``, a metric (box_ap, mask_ap, pq, miou, in percent),
a value (or ``outcome: diverged``, or a ``range``), and a source with a trust level: A = the authors' own material,
B = an unattributed secondary summary (marked in every table that shows it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

NUMBERS_FILE = Path(__file__).resolve().parent / "paper" / "numbers.yaml"
METRICS = ("box_ap", "mask_ap", "pq", "miou")
METRIC_LABELS = {"box_ap": "box AP", "mask_ap": "mask AP", "pq": "PQ", "miou": "mIoU"}
TRUST_LEVELS = ("A", "B")

__all__ = ["PaperNumber", "Claim", "PaperNumbers", "load_numbers", "parse_id", "NUMBERS_FILE", "METRICS",
           "METRIC_LABELS"]


def parse_id(paper_id: str) -> Tuple[str, str, str, str]:
    """Split ``table/pipeline/bsB/optimizer`` (the last part may be any variant name, e.g. ``anchor_fpn``)."""
    parts = paper_id.split("/")
    if len(parts) == 4:
        return parts[0], parts[1], parts[2], parts[3]
    if len(parts) == 3:  # ablations: table/pipeline/variant
        return parts[0], parts[1], "", parts[2]
    raise ValueError(f"paper id {paper_id!r} must look like 'table1/faster_rcnn/bs512/agvm_sgd' "
                     f"(table/pipeline/bs<B>/optimizer)")


@dataclass(frozen=True)
class PaperNumber:
    id: str
    metric: str
    value: Optional[float]
    source: str
    trust: str
    cite: str
    outcome: str = "reported"  # "reported" or "diverged"
    range: Optional[Tuple[float, float]] = None
    note: str = ""

    @property
    def table(self) -> str:
        return parse_id(self.id)[0]

    def display(self) -> str:
        """The number as a table cell: '36.7', 'diverged (NaN)' or '37.5-37.6'."""
        if self.outcome == "diverged":
            return "diverged (NaN)"
        if self.range is not None:
            return f"{self.range[0]:g}-{self.range[1]:g}"
        return f"{self.value:.1f}"

    def comparable(self) -> Optional[float]:
        """A single number to subtract from ours (the mid-point of a range), or None."""
        if self.outcome == "diverged":
            return None
        if self.range is not None:
            return (self.range[0] + self.range[1]) / 2
        return self.value


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    source: str
    trust: str
    cite: str


@dataclass
class PaperNumbers:
    sources: Dict[str, Dict[str, str]]
    numbers: List[PaperNumber]
    claims: List[Claim] = field(default_factory=list)

    def by_id(self) -> Dict[str, List[PaperNumber]]:
        out: Dict[str, List[PaperNumber]] = {}
        for n in self.numbers:
            out.setdefault(n.id, []).append(n)
        return out

    def get(self, paper_id: str, metric: str) -> Optional[PaperNumber]:
        for n in self.numbers:
            if n.id == paper_id and n.metric == metric:
                return n
        return None

    def ids(self) -> List[str]:
        return sorted({n.id for n in self.numbers})


def _fail(path: Path, where: str, msg: str) -> None:
    raise ValueError(f"{path}: {where}: {msg}")


def load_numbers(path: Path = NUMBERS_FILE) -> PaperNumbers:
    """Load and validate the numbers file; every problem is reported with the entry it is in."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"paper numbers file not found: {path}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "sources" not in data or "numbers" not in data:
        raise ValueError(f"{path}: expected a mapping with 'sources' and 'numbers'")
    sources = data["sources"]
    for name, s in sources.items():
        if not isinstance(s, dict) or s.get("trust") not in TRUST_LEVELS or not s.get("cite"):
            _fail(path, f"source {name!r}", f"needs 'trust' (one of {TRUST_LEVELS}) and 'cite'")
    numbers: List[PaperNumber] = []
    seen = set()
    for k, e in enumerate(data["numbers"]):
        where = f"numbers[{k}] ({e.get('id') if isinstance(e, dict) else e!r})"
        if not isinstance(e, dict):
            _fail(path, where, "each entry must be a mapping")
        for key in ("id", "metric", "source"):
            if key not in e:
                _fail(path, where, f"missing {key!r}")
        try:
            parse_id(e["id"])
        except ValueError as err:
            _fail(path, where, str(err))
        if e["metric"] not in METRICS:
            _fail(path, where, f"unknown metric {e['metric']!r}; known: {METRICS}")
        if e["source"] not in sources:
            _fail(path, where, f"unknown source {e['source']!r}; known: {sorted(sources)}")
        outcome = e.get("outcome", "reported")
        if outcome not in ("reported", "diverged"):
            _fail(path, where, f"outcome must be 'reported' or 'diverged', got {outcome!r}")
        value, rng = e.get("value"), e.get("range")
        if outcome == "reported":
            if value is None and rng is None:
                _fail(path, where, "a reported number needs 'value' or 'range'")
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
                _fail(path, where, f"value must be a finite number, got {value!r}")
            if rng is not None and (len(rng) != 2 or rng[0] > rng[1]):
                _fail(path, where, f"range must be [low, high], got {rng!r}")
        elif value is not None:
            _fail(path, where, "a diverged run has value null")
        if (e["id"], e["metric"]) in seen:
            _fail(path, where, "duplicate (id, metric)")
        seen.add((e["id"], e["metric"]))
        src = sources[e["source"]]
        numbers.append(PaperNumber(
            id=e["id"], metric=e["metric"], value=None if value is None else float(value), source=e["source"],
            trust=src["trust"], cite=src["cite"], outcome=outcome,
            range=None if rng is None else (float(rng[0]), float(rng[1])), note=e.get("note", "")))
    claims = []
    for k, c in enumerate(data.get("claims") or []):
        if c.get("source") not in sources or not c.get("text"):
            _fail(path, f"claims[{k}]", "needs 'text' and a known 'source'")
        src = sources[c["source"]]
        claims.append(Claim(id=c["id"], text=c["text"], source=c["source"], trust=src["trust"], cite=src["cite"]))
    return PaperNumbers(sources=sources, numbers=numbers, claims=claims)
