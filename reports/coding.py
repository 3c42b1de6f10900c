"""Coded concepts used by every OmniCT result object.

Every code here exists in a published terminology: most come from pydicom's DICOM code dictionaries
(``pydicom.sr.codedict.codes``, generated from DICOM PS3.16); SNOMED CT findings that PS3.16 does not list are
written out with their SNOMED CT concept id and preferred term; organ codes come from TotalSegmentator's own
SNOMED mapping (``data/totalsegmentator_snomed.json``, Apache-2.0). Nothing is numbered by us except the few
concepts of the private scheme ``99OMNICT`` (DICOM allows private schemes whose designator starts with "99"),
which every object using them declares in its Coding Scheme Identification Sequence (0008,0110).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# --- Structure of TID 1500 / TID 1501 / TID 1411 (DCM) ---------------------------------------------------------
IMAGING_MEASUREMENT_REPORT = codes.DCM.ImagingMeasurementReport  # (126000, DCM) root of TID 1500
MEASUREMENT_GROUP = codes.DCM.MeasurementGroup  # (125007, DCM)
TRACKING_IDENTIFIER = codes.DCM.TrackingIdentifier  # (112039, DCM)
TRACKING_UNIQUE_IDENTIFIER = codes.DCM.TrackingUniqueIdentifier  # (112040, DCM)
FINDING = codes.DCM.Finding  # (121071, DCM)
FINDING_SITE = codes.SCT.FindingSite  # (363698007, SCT)
PROCEDURE_CT = codes.LN.CTUnspecifiedBodyRegion  # (25045-6, LN) Procedure Reported
ALGORITHM_FAMILY_AI = codes.cid7162.ArtificialIntelligence  # (123110, DCM)

# --- TID 2000 headings for the narrative report ---------------------------------------------------------------
DIAGNOSTIC_IMAGING_REPORT = codes.LN.DiagnosticImagingReport  # (18748-4, LN) root of TID 2000
FINDINGS_SECTION = codes.cid7001.Findings  # (59776-5, LN)
IMPRESSIONS_SECTION = codes.cid7001.Impressions  # (19005-8, LN)
IMPRESSION = codes.DCM.Impression  # (121073, DCM)

# --- Key Object Selection --------------------------------------------------------------------------------------
OF_INTEREST = codes.DCM.OfInterest  # (113000, DCM) document title, CID 7010
KEY_OBJECT_DESCRIPTION = codes.DCM.KeyObjectDescription  # (113012, DCM)

# --- Measurements: concept names (CID 7469 generic intensity and size), derivations (CID 7464), units (CID 7181) --
VOLUME = codes.SCT.Volume  # (118565006, SCT)
ATTENUATION_COEFFICIENT = codes.DCM.AttenuationCoefficient  # (112031, DCM)
MEAN = codes.SCT.Mean  # (373098007, SCT)
STANDARD_DEVIATION = codes.SCT.StandardDeviation  # (386136009, SCT)
# CID 7181 has no "ml": 1 ml == 1 cm3, so volumes are written in cm3 with the same number.
CUBIC_CENTIMETER = codes.UCUM.CubicCentimeter  # (cm3, UCUM)
HOUNSFIELD_UNIT = codes.UCUM.HounsfieldUnit  # ([hnsf'U], UCUM)

# --- Answers ---------------------------------------------------------------------------------------------------
PRESENT = codes.SCT.Present  # (52101004, SCT)
ABSENT = codes.SCT.Absent  # (272519000, SCT)
LEFT = codes.SCT.Left  # (7771000, SCT)
RIGHT = codes.SCT.Right  # (24028007, SCT)

# --- Segmentation categories (CID 7150) -------------------------------------------------------------------------
ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # (91723000, SCT)
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure  # (49755003, SCT)
TISSUE = codes.SCT.Tissue  # (85756007, SCT)

# --- Urgency --------------------------------------------------------------------------------------------------
PRIORITY = Code("260870009", "SCT", "Priority")  # SNOMED CT "Priority (attribute)"


class Urgency(enum.Enum):
    """How soon a reader should look at an answer; the value is the SNOMED CT qualifier written to the SR."""

    ROUTINE = Code("50811001", "SCT", "Routine")
    URGENT = Code("103391001", "SCT", "Urgent")
    EMERGENCY = Code("25876001", "SCT", "Emergency")

    @classmethod
    def parse(cls, value: Urgency | str) -> Urgency:
        """Accept an Urgency or its name in any case ("urgent")."""
        if isinstance(value, Urgency):
            return value
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise ValueError(f"unknown urgency {value!r}; use one of {[u.name.lower() for u in cls]}") from None


# --- Coded findings vocabulary (SNOMED CT clinical findings) ---------------------------------------------------
FINDINGS: dict[str, Code] = {
    "lung_nodule": Code("786838002", "SCT", "Nodule of lung"),
    "pleural_effusion": codes.SCT.PleuralEffusion,  # 60046008
    "pneumothorax": codes.SCT.Pneumothorax,  # 36118008
    "emphysema": Code("87433001", "SCT", "Pulmonary emphysema"),
    "consolidation": Code("95436008", "SCT", "Lung consolidation"),
    "liver_lesion": Code("300331000", "SCT", "Lesion of liver"),
    "kidney_stone": Code("95570007", "SCT", "Kidney stone"),  # FSN "Calculus of kidney (disorder)"
    "splenomegaly": Code("16294009", "SCT", "Splenomegaly"),
    "ascites": Code("389026000", "SCT", "Ascites"),
    "pericardial_effusion": codes.SCT.PericardialEffusion,  # 373945007
    "nodule": codes.SCT.Nodule,  # 27925004
    "lesion": codes.SCT.Lesion,  # 52988006
}


def finding_code(name: str) -> Code:
    """The SNOMED CT code of a finding of the vocabulary, by key ("pleural_effusion") or by meaning."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key in FINDINGS:
        return FINDINGS[key]
    for code in FINDINGS.values():
        if code.meaning.lower() == name.strip().lower():
            return code
    raise KeyError(f"finding {name!r} is not in the coded vocabulary: {sorted(FINDINGS)}")


# --- Private scheme for the VQA question ---------------------------------------------------------------------------
# No DICOM or SNOMED concept names a free-text question put to a model, so it gets a private code (the answer text
# uses the standard Finding (121071, DCM)). dciodvfy warns "Unrecognized defined term <99OMNICT>" for each use:
# expected, a private designator is by definition not in its list.
OMNICT_SCHEME_DESIGNATOR = "99OMNICT"
QUESTION = Code("VQA-QUESTION", OMNICT_SCHEME_DESIGNATOR, "Question")


def private_coding_schemes() -> list[CodingSchemeIdentificationItem]:
    """Items for the Coding Scheme Identification Sequence (0008,0110) declaring the ``99OMNICT`` scheme."""
    return [
        CodingSchemeIdentificationItem(
            designator=OMNICT_SCHEME_DESIGNATOR,
            name="OmniCT node private concepts",
            responsible_organization="OmniCT node",
        )
    ]


# --- Organs ------------------------------------------------------------------------------------------------------
# DICOM 2019+ replaced "Anatomical Structure" 123037004 by 91723000 in CID 7150; TotalSegmentator's table still
# carries the old value, so it is translated on load to what current validators and viewers expect.
_CATEGORY_REPLACEMENTS = {"123037004": ANATOMICAL_STRUCTURE}


@dataclass(frozen=True)
class OrganCoding:
    """How one organ label is coded: Segmented Property Category/Type (+ Type Modifier, e.g. laterality)."""

    category: Code
    property_type: Code
    laterality: Code | None = None
    display_rgb: tuple[int, int, int] | None = None

    @property
    def label(self) -> str:
        """A readable name, e.g. "Kidney, Left"."""
        if self.laterality is None:
            return self.property_type.meaning
        return f"{self.property_type.meaning}, {self.laterality.meaning}"


# Names the node uses that TotalSegmentator's table does not have (whole lungs, body regions).
_EXTRA_ORGANS: dict[str, OrganCoding] = {
    "lung": OrganCoding(ANATOMICAL_STRUCTURE, codes.SCT.Lung),
    "lung_left": OrganCoding(ANATOMICAL_STRUCTURE, codes.SCT.Lung, LEFT),
    "lung_right": OrganCoding(ANATOMICAL_STRUCTURE, codes.SCT.Lung, RIGHT),
    "pleura": OrganCoding(ANATOMICAL_STRUCTURE, codes.SCT.Pleura),
    "abdomen": OrganCoding(ANATOMICAL_STRUCTURE, codes.SCT.Abdomen),
    "chest": OrganCoding(ANATOMICAL_STRUCTURE, codes.SCT.Chest),
}


def _code(triple: list[str] | None) -> Code | None:
    if not triple:
        return None
    value, scheme, meaning = triple
    return _CATEGORY_REPLACEMENTS.get(value) or Code(value, scheme, meaning)


@cache
def organ_table() -> dict[str, OrganCoding]:
    """All organ names the node can code, keyed by TotalSegmentator label name ("kidney_left", "liver", ...)."""
    raw = json.loads(resources.files("reports").joinpath("data/totalsegmentator_snomed.json").read_text())
    table: dict[str, OrganCoding] = {}
    for name, entry in raw["structures"].items():
        category, property_type = _code(entry["category"]), _code(entry["type"])
        assert category is not None and property_type is not None, name
        color = entry.get("color")
        table[name] = OrganCoding(category, property_type, _code(entry["modifier"]), tuple(color) if color else None)
    table.update(_EXTRA_ORGANS)
    return table


def organ_coding(label_name: str) -> OrganCoding:
    """The coding of an organ label name; raises KeyError naming the label when it is unknown."""
    key = _organ_key(label_name)
    table = organ_table()
    if key not in table:
        raise KeyError(
            f"organ label {label_name!r} has no SNOMED CT coding; pass OrganMeasurement(coding=OrganCoding(...)) "
            "or use a TotalSegmentator label name"
        )
    return table[key]


def has_organ_coding(label_name: str) -> bool:
    """Whether :func:`organ_coding` knows ``label_name``."""
    return _organ_key(label_name) in organ_table()


def _organ_key(label_name: str) -> str:
    return label_name.strip().lower().replace(" ", "_")
