"""Paper Tables 2-6 from evaluation outputs, with the paper's published numbers beside them.

Every cell reads ``ours / paper``; ``-`` marks a run that does not exist. The paper's
numbers are reference values copied from the publication, never produced here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sam4mllm.report import markdown_table

# (variant row label in the paper) -> {(dataset, split, metric): value}, from the ECCV 2024 paper.
PAPER: dict[str, dict[tuple[str, str, str], float]] = {
    "ppg": {
        **{("refcoco", s, "cIoU"): v for s, v in zip(("val", "testA", "testB"), (76.2, 80.1, 72.0), strict=True)},
        **{("refcoco+", s, "cIoU"): v for s, v in zip(("val", "testA", "testB"), (71.2, 75.9, 64.3), strict=True)},
        **{("refcocog", s, "cIoU"): v for s, v in zip(("val", "test"), (74.2, 74.3), strict=True)},
        **{("grefcoco", s, m): v for s, vals in (("val", (68.37, 65.66, 63.71)), ("testA", (69.05, 69.62, 65.96)),
                                                  ("testB", (63.71, 62.35, 61.25)))
           for m, v in zip(("gIoU", "cIoU", "N-acc"), vals, strict=True)},
        ("reasonseg", "val", "gIoU"): 46.1, ("reasonseg", "val", "cIoU"): 47.9,
        ("vqav2", "val2014", "accuracy"): 78.7,
    },
    "pqpp": {
        **{("refcoco", s, "cIoU"): v for s, v in zip(("val", "testA", "testB"), (77.1, 80.9, 72.5), strict=True)},
        **{("refcoco+", s, "cIoU"): v for s, v in zip(("val", "testA", "testB"), (71.5, 76.8, 64.7), strict=True)},
        **{("refcocog", s, "cIoU"): v for s, v in zip(("val", "test"), (74.5, 75.2), strict=True)},
        **{("grefcoco", s, m): v for s, vals in (("val", (68.96, 66.33, 62.96)), ("testA", (70.54, 70.13, 65.82)),
                                                  ("testB", (63.98, 63.21, 61.61)))
           for m, v in zip(("gIoU", "cIoU", "N-acc"), vals, strict=True)},
        ("reasonseg", "val", "gIoU"): 46.7, ("reasonseg", "val", "cIoU"): 48.1,
        ("vqav2", "val2014", "accuracy"): 78.7,
    },
}
TABLE6_PAPER = {"thr0.6": 69.5, "thr0.7": 70.8, "thr0.8": 72.2, "default": 74.5, "thr0.95": 73.8,
                "grid6": 74.4, "random25": 73.7, "random36": 74.2}


def collect(eval_root: str | Path) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """``(variant-family, dataset, split, eval name) -> metrics`` for every ``metrics.json`` found."""
    out = {}
    for p in sorted(Path(eval_root).glob("*/*/*/metrics.json")):
        m = json.loads(p.read_text())
        out[(p.parts[-4], m["dataset"], m["split"], p.parts[-2])] = m
    return out


def _cell(metrics: dict[str, Any], metric: str, paper: float | None) -> str:
    ours = metrics.get(metric)
    a = "-" if ours is None else f"{100 * ours:.1f}" if metric != "accuracy" else f"{ours:.1f}"
    if ours is not None and metrics.get("official_n") not in (None, metrics.get("n")):
        a += f"* (n={metrics['n']} of {metrics['official_n']})"
    return f"{a} / {'-' if paper is None else paper}"


def _row(results: dict, run: str, variant: str, cols: list[tuple[str, str, str]]) -> list[str]:
    return [_cell(results.get((run, ds, split, "default"), {}), metric, PAPER.get(variant, {}).get((ds, split, metric)))
            for ds, split, metric in cols]


def render_tables(eval_root: str | Path) -> str:
    """Markdown of Tables 2-6 (cells ``ours / paper``, metrics in percent)."""
    if not Path(eval_root).is_dir():  # a mistyped folder would otherwise print the paper's numbers alone
        raise FileNotFoundError(f"no evaluation folder at {eval_root}; scripts/eval.py writes each run's "
                                "metrics.json under outputs/eval/<variant>-<family>/<dataset>-<split>/<eval>/")
    results = collect(eval_root)
    runs = sorted({r for r, *_ in results}) or ["pqpp-qwenvl", "ppg-qwenvl"]
    t2 = [(d, s, "cIoU") for d in ("refcoco", "refcoco+") for s in ("val", "testA", "testB")]
    t2 += [("refcocog", s, "cIoU") for s in ("val", "test")]
    t3 = [("grefcoco", s, m) for s in ("val", "testA", "testB") for m in ("gIoU", "cIoU", "N-acc")]
    t4 = [("reasonseg", "val", m) for m in ("gIoU", "cIoU")]
    t5 = [("vqav2", "val2014", "accuracy")]
    out = ["Cells: ours / paper. Ours are whatever runs exist under the evaluation folder; the paper's",
           "numbers are the published ones, not reproduced here. `*`: scored on another number of samples",
           "than the official split has (a subset, or images missing): not comparable with the paper.\n"]
    if not results:
        out.insert(0, f"**No evaluation found under {eval_root}: every 'ours' cell is '-'.**\n")
    for title, cols in (("Table 2: refCOCO / refCOCO+ / refCOCOg (cIoU)", t2),
                        ("Table 3: gRefCOCO (gIoU, cIoU, N-acc)", t3),
                        ("Table 4: ReasonSeg val (zero-shot)", t4), ("Table 5: VQAv2", t5)):
        rows = [[run, *_row(results, run, run.split("-")[0], cols)] for run in runs]
        out += [f"### {title}", markdown_table(["run", *(f"{d} {s} {m}" for d, s, m in cols)], rows), ""]
    rows, shown = [], {(run, ds, split, "default") for run in runs for ds, split, _ in t2 + t3 + t4 + t5}
    # Table 6 ablates PQPP's points round only: a PPG or box-only run has no row there.
    for run in [r for r in runs if r.split("-")[0] == "pqpp"] or ["pqpp-qwenvl"]:
        for name, paper in TABLE6_PAPER.items():
            key = (run, "refcocog", "val", name)
            if key not in results and name == "default":  # eval=table6a writes the 0.9 row as thr0.9
                key = (run, "refcocog", "val", "thr0.9")
            shown.add(key)
            rows.append([run, name, _cell(results.get(key, {}), "cIoU", paper)])
    out += ["### Table 6: PQPP ablations on refCOCOg val (cIoU)", markdown_table(["run", "setting", "cIoU"], rows)]
    # Say what was found but fits no cell (the synthetic benchmark, another split or eval setting),
    # rather than leave a user wondering why a finished evaluation reads "-".
    hidden = [" ".join(key) for key in results if key not in shown]
    if hidden:
        out += ["", f"Evaluations under {eval_root} that no table shows (run, dataset, split, eval):",
                *(f"- {h}" for h in hidden)]
    return "\n".join(out)
