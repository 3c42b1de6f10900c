"""Run the real validators (dicom3tools, dcmtk) on written objects and read their verdicts."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

# Warnings we have looked at and accept (see reports/coding.py for the private scheme):
ACCEPTED_WARNINGS = (
    # dciodvfy checks what a DICOMDIR would need; the sources' own blank Type 2 values trigger these
    re.compile(r"Missing attribute or value that would be needed to build DICOMDIR"),
    # the private coding scheme of the VQA question concept is, by definition, not among the defined terms
    re.compile(r"Unrecognized defined term <99OMNICT> for value 1 of attribute <Coding Scheme Designator>"),
)


@dataclass
class Verdict:
    errors: list[str]
    warnings: list[str]
    output: str

    @property
    def unexpected_warnings(self) -> list[str]:
        return self.warnings_except()

    def warnings_except(self, *extra: re.Pattern[str]) -> list[str]:
        accepted = (*ACCEPTED_WARNINGS, *extra)
        return [w for w in self.warnings if not any(p.search(w) for p in accepted)]


def _env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def dciodvfy(path: Path) -> Verdict:
    """dciodvfy writes its findings to stderr as "Error - ..." / "Warning - ..." lines."""
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, env=_env())
    lines = (done.stdout + done.stderr).splitlines()
    return Verdict(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=done.stdout + done.stderr,
    )


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    """Full text of an SR tree (+Pl: long values unshortened, +Pc: codes of concept names too)."""
    return subprocess.run(["dsrdump", "+Pl", "+Pc", str(path)], capture_output=True, text=True, timeout=60, env=_env())


def dsr2html(path: Path, html: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dsr2html", str(path), str(html)], capture_output=True, text=True, timeout=60, env=_env())


def content_items(dataset: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR tree, depth first."""
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def children(item: Dataset, value: str, scheme: str) -> list[Dataset]:
    return [child for child in item.get("ContentSequence", []) if concept(child) == (value, scheme)]


def all_uid_values(dataset: Dataset, path: str = "") -> dict[str, str]:
    """Every UI element of a dataset, keyed by its path through sequences."""
    found: dict[str, str] = {}
    for element in dataset:
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                found.update(all_uid_values(item, f"{path}/{element.keyword}[{index}]"))
        elif element.VR == "UI":
            found[f"{path}/{element.keyword}"] = str(element.value)
    return found
