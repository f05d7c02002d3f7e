"""What a run tells, as data: the Report, made once at the end of a run (run/stages.make_report)
and never edited after. report.json is its to_dict(); report.md, the manifest, the app README and
the plots are rendered from that. ``version`` says which layout a report.json has: it is raised
when a key changes meaning or goes away (keys added keep it).

The sections a runtime or the searches fill in (the target's parity and benchmark, the cost and
the verdicts, the joint search, recovery) keep the layouts their own modules give them (their
``to_dict``s); this module types the sections every run has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mosaic_export.core.version import __version__
from mosaic_export.method.evaluate import Perplexity

VERSION = 1
PROTOCOL = ("non-overlapping windows from the start of the text, each scored alone; "
            "see mosaic_export/method/evaluate.py")


@dataclass(frozen=True)
class Memory:
    """Peak resident memory of the run (this process; with --max-rss, the process tree's too)."""

    peak_rss_bytes: int  # the whole run's high-water mark when the report is made
    peak_rss_after_prune_bytes: int
    dense_fp32_bytes: int
    pruned_fp32_bytes: int
    streamed: bool
    streamed_need_bytes: int | None = None  # a streamed run: what memory.run_needs expected
    tree_peak_bytes: int | None = None  # --max-rss: the process tree's peak, sampled
    max_rss_bytes: int | None = None

    def to_dict(self) -> dict:
        out = {"peak_rss_bytes": self.peak_rss_bytes,
               "peak_rss_after_prune_bytes": self.peak_rss_after_prune_bytes,
               "dense_fp32_bytes": self.dense_fp32_bytes, "pruned_fp32_bytes": self.pruned_fp32_bytes,
               "peak_rss_over_fp32_model": self.peak_rss_bytes / self.dense_fp32_bytes,
               "streamed": self.streamed, "streamed_need_bytes": self.streamed_need_bytes}
        if self.max_rss_bytes is not None:
            out.update(tree_peak_bytes=self.tree_peak_bytes, max_rss_bytes=self.max_rss_bytes)
        return out


@dataclass(frozen=True)
class Perplexities:
    """The dense and the final model on the same windows (and, after recovery, the pruned one)."""

    dense: Perplexity
    pruned: Perplexity  # the model written: recovered when recovery ran
    before_recovery: Perplexity | None = None

    def to_dict(self) -> dict:
        out = {"dense": self.dense.to_dict(), "pruned": self.pruned.to_dict(), "protocol": PROTOCOL}
        if self.before_recovery is not None:
            out["before_recovery"] = self.before_recovery.to_dict()
        return out


@dataclass(frozen=True)
class Report:
    """One run of the main command: what was asked, what was made, what was measured."""

    profile: dict  # Profile.to_dict(), relative budgets resolved
    model: dict  # source and dense shape
    format: dict | None  # {"target", "type"}; None: the resized checkpoint only
    settings: dict  # the plan's PruneSettings
    params: dict  # parameter counts: dense, pruned, planned
    timing: dict
    memory: Memory
    budgets: dict
    layers: list[dict]  # each layer's kept sizes
    environment: dict
    reload: dict  # the checkpoint read back and compared
    perplexity: Perplexities | None = None
    recovery: dict | None = None
    joint: dict | None = None
    runtime: dict | None = None  # the target's section (parity, benchmark), under the target's name
    cost: dict | None = None  # predictions, measurements and verdicts (decide/search, decide/verdict)
    tool: dict = field(default_factory=lambda: {"name": "mosaic-export", "version": __version__})
    version: int = VERSION

    def to_dict(self) -> dict:
        """report.json: the same layout for every run of this version."""
        out = {"report_version": self.version, "tool": self.tool, "profile": self.profile,
               "model": self.model, "format": self.format, "settings": self.settings,
               "params": self.params, "timing": self.timing, "memory": self.memory.to_dict(),
               "budgets": self.budgets, "layers": self.layers, "environment": self.environment}
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity.to_dict()
        for name in ("recovery", "joint"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["reload"] = self.reload
        if self.runtime is not None:
            out[self.format["target"]] = self.runtime
        if self.cost is not None:
            out["cost"] = self.cost
        return out
