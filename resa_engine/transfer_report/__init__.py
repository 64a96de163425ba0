"""The transfer report of a (skill, target) pair: what was extracted, how the adapter was built, what
it did to the target (the manifest's `transfer` diagnostics), pass@1 of every evaluated arm with
paired differences against the base, and the compute per stage; as JSON, markdown and a chart.

The verdict is a list of plain sentences computed from the numbers alone (intervals, p-values,
retention and its reason); nothing in it is written in advance.

  report = transfer_report(skill_manifest, adapter_manifest, evaluation)   # evaluation: evaluate.compare's shape
  to_markdown(report); render_chart(report, "report.png")
"""

from .arms import ARMS, CONTRASTS, SOURCE_METHODS, describe_arm
from .build import transfer_report
from .chart import render_chart
from .markdown import to_markdown
from .words import effect, verdict

__all__ = ["ARMS", "CONTRASTS", "SOURCE_METHODS", "describe_arm", "effect", "render_chart", "to_markdown", "transfer_report", "verdict"]
