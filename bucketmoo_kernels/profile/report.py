"""What :func:`~bucketmoo_kernels.profile_conflicts` returns: one record per segment and a reading.

:class:`ConflictReport` holds plain Python numbers (JSON-ready): per segment a
:class:`SegmentRecord`, the same record for the whole model (``report.global_segment``), the
tasks' mean losses and where it was measured. Everything else is derived from those records:

* :meth:`ConflictReport.summary` -- conflict share overall and per layer, the share of the
  gradient's mass that lies in conflicting segments, how far the per-segment weights are from
  the global ones, and a plain-words reading;
* :meth:`ConflictReport.to_markdown`, :meth:`ConflictReport.to_dict` / :meth:`from_dict`;
* :meth:`ConflictReport.plot` -- heat maps (matplotlib, imported when called).

Definitions (per step s = 1..K, then averaged over the K steps):

* a segment *conflicts* in a step when some pair of tasks has a negative cosine there;
  ``conflict_share`` is the share of steps in which it does;
* a segment's *mass* in a step is the sum over tasks of its squared gradient norm (the trace
  of its Gram) divided by the same sum over the whole model; ``mass_share`` is its mean over
  steps and ``conflict_mass_share`` the mean of the mass in the steps where it conflicts;
* ``weight_distance`` is the total-variation distance ``0.5 * sum_t |w_t - w_global,t|``
  between the segment's weights and the global ones of the same step (0: the same
  combination, 1: disjoint), averaged over steps.

Per-layer numbers weight each segment by the number of its elements in the layer (a bucket
that spans two layers counts for both in proportion); mass is spread over a segment's
elements the same way, which is exact with ``granularity="param"``.
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SegmentRecord", "ConflictReport"]

_REPORT_VERSION = 1


@dataclass(frozen=True)
class SegmentRecord:
    """The profile of one segment (a parameter, a bucket, a chunk, or the whole model).

    Attributes:
        name: the parameter's name (``param``), or ``bucket k`` / ``chunk k`` / ``global``.
        params: names of the parameters the segment covers, in gradient-buffer order.
        numel: number of gradient elements.
        layers: elements of the segment in each layer (see :func:`.layout.layer_of`).
        cosine: ``T x T`` task cosine similarities, averaged over the steps.
        conflict_share: share of steps where some pair of tasks has a negative cosine.
        pair_conflict_share: share of the task pairs with a negative cosine, averaged over
            the steps (a graded measure: with many tasks ``conflict_share`` is soon 1).
        norms: per task, the gradient norm in the segment, averaged over the steps.
        weights: per task, the chosen method's weights, averaged over the steps.
        weight_distance: mean total-variation distance of the weights to the global ones.
        mass_share: mean share of the model's squared gradient norm (summed over tasks).
        conflict_mass_share: mean over steps of the mass share when the segment conflicts.
    """

    name: str
    params: tuple[str, ...]
    numel: int
    layers: dict[str, int]
    cosine: list[list[float]]
    conflict_share: float
    pair_conflict_share: float
    norms: list[float]
    weights: list[float]
    weight_distance: float
    mass_share: float
    conflict_mass_share: float

    @property
    def min_cosine(self) -> float:
        """The lowest off-diagonal entry of :attr:`cosine` (1.0 with fewer than two tasks)."""
        t = len(self.cosine)
        return min((self.cosine[i][j] for i in range(t) for j in range(i + 1, t)), default=1.0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["params"] = list(self.params)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentRecord":
        return cls(**{**data, "params": tuple(data["params"])})


def _pct(x: float) -> str:
    if 0 < x < 0.001:
        return "<0.1%"
    if 0 < x < 0.01:
        return f"{100 * x:.1f}%"
    return f"{100 * x:.0f}%"


def _strength(distance: float) -> str:
    if distance < 0.02:
        return "hardly"
    if distance < 0.1:
        return "slightly"
    return "substantially"


@dataclass
class ConflictReport:
    """Where the tasks' gradients conflict in a model (see the module docstring).

    Attributes:
        tasks: task names, in the order of every ``T``-sized list.
        granularity: ``param``, ``bucket``, ``chunk:<n>`` or ``global``.
        method: the method whose weights are reported (``mgda`` by default).
        steps: number of profiled steps (fresh batches).
        segments: one :class:`SegmentRecord` per segment, in gradient-buffer order.
        global_segment: the same record for the whole model (one segment).
        losses: per task, the mean loss over the steps.
        layers: layer names in model (parameter) order, with their element counts.
        bucket_cap_mb: the bucket cap used by ``bucket`` and ``chunk:<n>`` (None: DDP's defaults).
        world_size: 1, or the size of the process group the tasks were spread over.
        meta: free-form provenance (device, backend, command, commit, date...).
    """

    tasks: list[str]
    granularity: str
    method: str
    steps: int
    segments: list[SegmentRecord]
    global_segment: SegmentRecord
    losses: list[float]
    layers: dict[str, int]
    bucket_cap_mb: float | None = None
    world_size: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ basics
    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Task index pairs ``(i, j)``, ``i < j``, in the order of every per-pair list."""
        t = len(self.tasks)
        return [(i, j) for i in range(t) for j in range(i + 1, t)]

    @property
    def pair_names(self) -> list[str]:
        return [f"{self.tasks[i]}/{self.tasks[j]}" for i, j in self.pairs]

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.segments)

    # ------------------------------------------------------------------ summary
    def layer_table(self) -> list[dict]:
        """Per layer (model order): elements, conflict share, mass in conflict, mean cosine per
        pair, lowest segment cosine per pair, mean weights (element-weighted over segments)."""
        t = len(self.tasks)
        rows = []
        for layer, count in self.layers.items():
            parts = [(r, r.layers[layer]) for r in self.segments if r.layers.get(layer)]
            total = sum(n for _, n in parts) or 1
            mass = sum(r.mass_share * n / r.numel for r, n in parts if r.numel)
            conflict_mass = sum(r.conflict_mass_share * n / r.numel for r, n in parts if r.numel)
            rows.append({
                "layer": layer,
                "numel": count,
                "conflict_share": sum(r.conflict_share * n for r, n in parts) / total,
                "pair_conflict_share": sum(r.pair_conflict_share * n for r, n in parts) / total,
                "mass_share": mass,
                "mass_in_conflict": conflict_mass / mass if mass > 0 else 0.0,
                "cosine": [sum(r.cosine[i][j] * n for r, n in parts) / total for i, j in self.pairs],
                "min_cosine": [min((r.cosine[i][j] for r, _ in parts), default=1.0) for i, j in self.pairs],
                "weights": [sum(r.weights[k] * n for r, n in parts) / total for k in range(t)],
                "weight_distance": sum(r.weight_distance * n for r, n in parts) / total,
            })
        return rows

    def summary(self) -> dict:
        """Conflict overall and by layer, weights vs global, and a plain-words ``reading``.

        Returns a JSON-ready dict with ``overall``, ``by_layer`` (:meth:`layer_table`),
        ``weights`` and ``reading`` (a list of sentences).
        """
        n = self.numel or 1
        segs = self.segments
        pair_elements = [sum(r.numel for r in segs if r.cosine[i][j] < 0) / n for i, j in self.pairs]
        g = self.global_segment
        pair_global = [g.cosine[i][j] for i, j in self.pairs]
        overall = {
            "elements_in_conflict": sum(r.conflict_share * r.numel for r in segs) / n,
            "segments_in_conflict": sum(r.conflict_share for r in segs) / max(1, len(segs)),
            "pairs_in_conflict": sum(r.pair_conflict_share * r.numel for r in segs) / n,
            "mass_in_conflict": sum(r.conflict_mass_share for r in segs),
            "global_conflict_share": g.conflict_share,
            "global_cosine": dict(zip(self.pair_names, pair_global)),
            "pair_elements_negative": dict(zip(self.pair_names, pair_elements)),
            "min_segment_cosine": min((r.min_cosine for r in segs), default=1.0),
        }
        distances = [r.weight_distance for r in segs]
        weights = {
            "method": self.method,
            "global": list(g.weights),
            "distance_mean": sum(r.weight_distance * r.numel for r in segs) / n,
            "distance_max": max(distances, default=0.0),
            "elements_distance_over_0.1": sum(r.numel for r in segs if r.weight_distance > 0.1) / n,
        }
        by_layer = self.layer_table()
        return {"overall": overall, "by_layer": by_layer, "weights": weights,
                "reading": self._reading(overall, by_layer, weights)}

    def _reading(self, overall: dict, by_layer: list[dict], weights: dict) -> list[str]:
        unit = {"param": "parameters", "bucket": "buckets", "global": "segments"}.get(
            self.granularity, "chunks")
        local = overall["elements_in_conflict"]
        lines = [
            f"On an average step, {_pct(local)} of the gradient's elements (and {_pct(overall['mass_in_conflict'])} "
            f"of its squared norm) lie in {unit} where at least two tasks pull in opposite directions "
            f"(a negative cosine); the lowest mean cosine of a single segment is "
            f"{overall['min_segment_cosine']:+.2f}."
        ]
        if self.pairs:
            worst = min(range(len(self.pairs)), key=lambda k: list(overall["global_cosine"].values())[k])
            gcos = list(overall["global_cosine"].values())[worst]
            agree = self.global_segment.conflict_share == 0
            lines.append(
                f"Over the whole model the task gradients {'agree' if agree else 'conflict'}: the lowest "
                f"global cosine is {gcos:+.2f} ({self.pair_names[worst]}), and the global gradients conflict in "
                f"{_pct(overall['global_conflict_share'])} of the steps."
                + (" The conflicts are local: a method that weights the whole model at once cannot see them, "
                   "a per-segment one can." if agree and local > 0.05 else "")
            )
            pair_neg = overall["pair_elements_negative"]
            top_pair = max(pair_neg, key=pair_neg.get)
            if pair_neg[top_pair] > 0:
                lines.append(f"The pair that disagrees on most elements (mean cosine < 0) is {top_pair} "
                             f"({_pct(pair_neg[top_pair])} of the elements).")
        ranked = sorted(by_layer, key=lambda r: (-r["pair_conflict_share"], -r["conflict_share"]))
        if len(ranked) > 1 and self.pairs and ranked[0]["pair_conflict_share"] == 0:
            lines.append("No layer has a pair of tasks with a negative mean cosine in any step.")
        elif len(ranked) > 1 and self.pairs:
            count = min(3, len(ranked) // 2)
            what = lambda r: f"{r['layer']} ({_pct(r['pair_conflict_share'])})"  # noqa: E731
            top = [r for r in ranked[:count] if r["pair_conflict_share"] > 0]
            low = [r for r in ranked[::-1] if r not in top][:count]
            lines.append(
                f"By layer, the share of task pairs with a negative cosine is highest in "
                f"{', '.join(what(r) for r in top)} and lowest in "
                f"{', '.join(what(r) for r in low)} (element-weighted, mean over steps; "
                f"{_pct(overall['pairs_in_conflict'])} over the whole model).")
        if self.granularity != "global":
            d = weights["distance_mean"]
            lines.append(
                f"Per-{self.granularity} {self.method} weights differ from the global ones by {d:.2f} on average "
                f"(total variation, 0 = same combination, 1 = disjoint; largest {weights['distance_max']:.2f}): "
                f"{self.granularity}-level {self.method} would {_strength(d)} change the update compared with "
                f"global {self.method}."
            )
        d = weights["distance_mean"]
        if local < 0.05:
            verdict = "Conflicts are rare at this point: a conflict-resolving method has little to resolve"
            if self.granularity != "global" and d >= 0.1:
                verdict += (f" (its per-{self.granularity} weights still differ from the global ones because the "
                            "tasks' gradient norms vary from segment to segment, not because the tasks conflict)")
            verdict += "."
        elif self.global_segment.conflict_share > 0.5:
            verdict = ("The tasks conflict even over the whole model: global weighting acts already, and "
                       "per-segment weighting adds where the local picture differs from the global one.")
        else:
            verdict = (f"Conflicts are local: {self.granularity}-level multi-objective weighting is worth trying "
                       f"here{', at a finer granularity than the buckets' if self.granularity == 'param' else ''}.")
        lines.append(verdict + f" (Measured over {self.steps} step(s) at the model's current weights; "
                               "conflicts change as training goes on.)")
        return lines

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        """A JSON-ready dict (with the :meth:`summary`); :meth:`from_dict` reads it back."""
        return {
            "version": _REPORT_VERSION, "tasks": list(self.tasks), "granularity": self.granularity,
            "method": self.method, "steps": self.steps, "bucket_cap_mb": self.bucket_cap_mb,
            "world_size": self.world_size, "losses": list(self.losses), "layers": dict(self.layers),
            "meta": dict(self.meta), "global_segment": self.global_segment.to_dict(),
            "segments": [r.to_dict() for r in self.segments], "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ConflictReport":
        if data.get("version") != _REPORT_VERSION:
            raise ValueError(f"not a ConflictReport dict of version {_REPORT_VERSION}; got version "
                             f"{data.get('version')!r}")
        return cls(tasks=list(data["tasks"]), granularity=data["granularity"], method=data["method"],
                   steps=int(data["steps"]), segments=[SegmentRecord.from_dict(r) for r in data["segments"]],
                   global_segment=SegmentRecord.from_dict(data["global_segment"]), losses=list(data["losses"]),
                   layers=dict(data["layers"]), bucket_cap_mb=data.get("bucket_cap_mb"),
                   world_size=int(data.get("world_size", 1)), meta=dict(data.get("meta", {})))

    def to_json(self, path: str) -> str:
        """Write :meth:`to_dict` to ``path``; returns the path."""
        _parent(path)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=1)
            fh.write("\n")
        return path

    def format_summary(self) -> str:
        """The reading and the per-layer table as plain text (what the CLI prints)."""
        rows = self.layer_table()
        width = max([len("layer")] + [len(r["layer"]) for r in rows])
        pairs = self.pair_names if len(self.pairs) <= 10 else []
        cols = [max(6, len(p)) for p in pairs]
        head = (f"{'layer':<{width}}  {'elements':>9}  {'conflict':>8}  {'pairs':>6}  {'mass in conf':>12}  min cos"
                + "".join(f"  {p:>{c}}" for p, c in zip(pairs, cols)))
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r['layer']:<{width}}  {r['numel']:>9}  {_pct(r['conflict_share']):>8}  "
                         f"{_pct(r['pair_conflict_share']):>6}  "
                         f"{_pct(r['mass_in_conflict']):>12}  {min(r['min_cosine'], default=1.0):>+7.2f}"
                         + "".join(f"  {v:>+{c}.2f}" for v, c in zip(r["cosine"], cols)))
        legend = ("conflict: elements in segments where some task pair has a negative cosine; pairs: task pairs "
                  "with a negative cosine; mass in conf: squared gradient norm in conflicting segments; min cos: "
                  "lowest segment cosine" + ("; then the mean cosine per pair" if pairs else "")
                  + " (element-weighted, mean over steps)")
        return "\n".join(lines + [textwrap.fill(legend, 110), ""] + [f"* {s}" for s in self.summary()["reading"]])

    def to_markdown(self, path: str | None = None, *, figures: list[str] = (), max_segments: int = 300) -> str:
        """The report as Markdown (written to ``path`` when given); returns the text.

        Args:
            path: file to write, or None.
            figures: image paths (relative to the Markdown file) to show after the layer table.
            max_segments: rows of the per-segment table at most (the rest is counted).
        """
        s = self.summary()
        pairs, tasks = self.pair_names, self.tasks
        lines = [f"# Gradient conflict profile: {', '.join(tasks)} ({self.granularity})", ""]
        if self.meta:
            lines += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in self.meta.items()] + [""]
        lines += [f"{len(tasks)} tasks, {self.steps} step(s), granularity `{self.granularity}`"
                  + (f" (bucket cap {self.bucket_cap_mb:g} MiB)" if self.bucket_cap_mb is not None
                     and self.granularity != "param" and self.granularity != "global" else "")
                  + f", {len(self.segments)} segments over {self.numel:,} elements, weights of `{self.method}`"
                  + (f", {self.world_size} ranks" if self.world_size > 1 else "") + ".", ""]
        lines += ["Mean loss per task: " + ", ".join(f"{t} {v:.3f}" for t, v in zip(tasks, self.losses)), ""]
        lines += ["## Reading", ""] + [f"* {x}" for x in s["reading"]] + [""]
        o = s["overall"]
        lines += ["## Overall", "", "| measure | value |", "|---|---|",
                  f"| elements in conflicting segments (mean over steps) | {_pct(o['elements_in_conflict'])} |",
                  f"| segments in conflict (mean over steps) | {_pct(o['segments_in_conflict'])} |",
                  f"| task pairs with a negative cosine (element-weighted) | {_pct(o['pairs_in_conflict'])} |",
                  f"| gradient mass (squared norm) in conflicting segments | {_pct(o['mass_in_conflict'])} |",
                  f"| steps where the global gradients conflict | {_pct(o['global_conflict_share'])} |",
                  f"| lowest segment cosine (mean over steps) | {o['min_segment_cosine']:+.3f} |",
                  f"| {self.method} weights, global | {_vec(s['weights']['global'])} |",
                  f"| weight distance to global, mean / max | {s['weights']['distance_mean']:.3f} / "
                  f"{s['weights']['distance_max']:.3f} |", ""]
        lines += ["| pair | global cosine | elements with mean cosine < 0 |", "|---|---|---|"]
        lines += [f"| {p} | {o['global_cosine'][p]:+.3f} | {_pct(o['pair_elements_negative'][p])} |" for p in pairs]
        lines += ["", "## By layer", "",
                  "Conflict: share of the layer's elements in segments where some pair of tasks has a negative "
                  "cosine; pairs in conflict: share of the task pairs with a negative cosine; both element-weighted "
                  "over the layer's segments and averaged over the steps, like the cosines (cos) and weights (w).",
                  "",
                  "| layer | elements | conflict | pairs in conflict | mass in conflict | "
                  + " | ".join(f"cos {p}" for p in pairs) + " | " + " | ".join(f"w {t}" for t in tasks) + " |",
                  "|---|---|---|---|---|" + "---|" * (len(pairs) + len(tasks))]
        for r in s["by_layer"]:
            lines.append(f"| {r['layer']} | {r['numel']:,} | {_pct(r['conflict_share'])} | "
                         f"{_pct(r['pair_conflict_share'])} | "
                         f"{_pct(r['mass_in_conflict'])} | " + " | ".join(f"{c:+.2f}" for c in r["cosine"])
                         + " | " + " | ".join(f"{w:.2f}" for w in r["weights"]) + " |")
        lines.append("")
        for fig in figures:
            lines += [f"![{os.path.basename(fig)}]({fig})", ""]
        lines += ["## Segments", "",
                  "| segment | elements | conflict | pairs in conflict | min cos | mass | weights "
                  "| distance to global |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in self.segments[:max_segments]:
            label = r.name if r.name in r.params else f"{r.name} ({_params_label(r.params)})"
            lines.append(f"| {label} | {r.numel:,} | {_pct(r.conflict_share)} | {_pct(r.pair_conflict_share)} | "
                         f"{r.min_cosine:+.2f} | "
                         f"{100 * r.mass_share:.1f}% | {_vec(r.weights)} | {r.weight_distance:.3f} |")
        if len(self.segments) > max_segments:
            lines.append(f"| ... {len(self.segments) - max_segments} more segments (see the JSON) | | | | | | | |")
        text = "\n".join(lines) + "\n"
        if path is not None:
            _parent(path)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    def plot(self, path: str, *, by: str = "layer") -> str:
        """Heat maps of the mean task-pair cosines (rows: layers or segments; the last row is the
        whole model) and of the method's weights per row; writes a PNG to ``path``.

        ``by``: ``"layer"`` (element-weighted per layer) or ``"segment"``. Needs matplotlib
        (``ImportError`` saying so otherwise). Returns ``path``.
        """
        from .plot import plot_report

        return plot_report(self, path, by=by)


def _params_label(params: tuple[str, ...]) -> str:
    if len(params) <= 3:
        return ", ".join(params)
    return f"{params[0]} ... {params[-1]}, {len(params)} params"


def _vec(values) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
