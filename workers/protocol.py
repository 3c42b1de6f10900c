"""The question protocol: which questions every study is asked, and what a "yes" means clinically.

A protocol is a TOML file (default ``workers/protocols/default.toml``; ``model.protocol`` names another). Each question
has a region (``roi`` TotalSegmentator labels, or ``fallback_roi`` when the segmentation backend gives only coarser
organs, e.g. the classical backend's whole lungs instead of lobes) and is asked only when that region is present:
per-organ questions for the organs present. Its mask feeds the model's organ-level semantic enhancement.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PROTOCOL = Path(__file__).parent / "protocols" / "default.toml"


class ProtocolQuestion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    text: str
    finding: str = Field(description="Key into reports.coding.FINDINGS: the code of a positive answer.")
    roi: tuple[str, ...] = ()
    fallback_roi: tuple[str, ...] = ()
    finding_site: str | None = None
    urgency_weight: float = 0.0
    critical: bool = False

    def region(self, present_labels: Iterable[str]) -> tuple[str, ...] | None:
        """The labels to use as this question's organ mask, or None when the region is not in the study."""
        present = set(present_labels)
        for candidate in (self.roi, self.fallback_roi):
            if candidate and all(name in present for name in candidate):
                return candidate
        return None


class Protocol(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    report_prompt: str
    questions: tuple[ProtocolQuestion, ...]

    def battery(self, present_labels: Iterable[str]) -> list[tuple[ProtocolQuestion, tuple[str, ...]]]:
        """The questions to ask a study whose label map holds ``present_labels``, each with its region."""
        present = list(present_labels)
        battery = []
        for question in self.questions:
            region = question.region(present)
            if region is not None:
                battery.append((question, region))
        return battery


def load_protocol(path: Path | None = None) -> Protocol:
    """Read and validate a protocol file; unknown finding keys are errors (they would have no code)."""
    from reports.coding import FINDINGS

    path = Path(path or DEFAULT_PROTOCOL)
    if not path.is_file():
        raise FileNotFoundError(f"question protocol not found: {path}")
    protocol = Protocol(**tomllib.loads(path.read_text()))
    unknown = sorted({q.finding for q in protocol.questions} - set(FINDINGS))
    if unknown:
        raise ValueError(f"protocol {path} names findings without a code: {', '.join(unknown)}")
    return protocol


def judgment(answer_text: str) -> bool | None:
    """A yes/no answer as a boolean; None when the model said something else."""
    word = answer_text.strip().split(maxsplit=1)[0].strip(".,!").lower() if answer_text.strip() else ""
    return {"yes": True, "no": False}.get(word)
