"""VQA samples from phantom ground truth, in the OmniCT release's message format.

One sample::

    {"id": "train-s000012-q03", "image": "cache://train/2d/41", "dim": "2d",
     "conversations": [{"from": "human", "value": "<image>\\nIs there a lung nodule in the right upper lobe on this slice?"},
                       {"from": "gpt", "value": "Yes"}],
     "task_type": "judgment", "category": "abnormality", "organ": "lungs", "roi": ["lung_upper_lobe_right"],
     "roi_label_ids": [3], "finding_type": "lung_nodule", "size_bucket": "<=10 mm", "answer": "Yes",
     "options": null, "question_key": "...", "study_seed": 123, ...}

Task types (paper Fig. 3): judgment (yes/no), multiple_choice (lettered options), short_answer, report.
Clinical categories: recognition (GIR), abnormality (MAI), interpretation (AII), reasoning (CRD).
``organ`` is the paper's organ class used in Tables 8-9; ``roi`` names the TotalSegmentator labels whose mask feeds
OSE (empty = whole image: recognition and report questions must not be answerable from the mask alone).

Chance is known by construction: every (question text, image kind) key gets as many "yes" as "no" answers, every
multiple-choice key as many samples of each correct option content, with the letters shuffled uniformly — so an
image-blind model scores 0.5 on judgment and 1/k on k-option questions (paper Table 14's stress test relies on it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------------- vocabulary
LOBES = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "lung_upper_lobe_left",
         "lung_lower_lobe_left")
LOBE_TEXT = {"lung_upper_lobe_right": "right upper lobe", "lung_middle_lobe_right": "right middle lobe",
             "lung_lower_lobe_right": "right lower lobe", "lung_upper_lobe_left": "left upper lobe",
             "lung_lower_lobe_left": "left lower lobe"}
SIDE_LOBES = {"right": LOBES[:3], "left": LOBES[3:]}
FINDING_TEXT = {"lung_nodule": "lung nodule", "pleural_effusion": "pleural effusion", "pneumothorax": "pneumothorax",
                "consolidation": "consolidation", "liver_lesion": "liver lesion", "kidney_stone": "kidney stone",
                "splenomegaly": "splenomegaly"}
#: finding types the generator uses (a subset of the phantom's: the ones a 96 px model can plausibly read)
FINDING_TYPES = tuple(FINDING_TEXT)
ORGAN_CLASS = {"lung_nodule": "lungs", "pleural_effusion": "lungs", "pneumothorax": "lungs", "consolidation": "lungs",
               "liver_lesion": "liver", "kidney_stone": "kidneys", "splenomegaly": "spleen"}
RECOGNITION_ORGANS = {"liver": ("liver",), "spleen": ("spleen",), "heart": ("heart",), "left kidney": ("kidney_left",),
                      "right kidney": ("kidney_right",), "stomach": ("stomach",), "trachea": ("trachea",)}
RECOGNITION_CLASS = {"liver": "liver", "spleen": "spleen", "heart": "heart", "left kidney": "kidneys",
                     "right kidney": "kidneys", "stomach": "stomach", "trachea": "trachea"}
SIZE_BUCKETS = {  # finding type -> (upper bounds mm, bucket names); amounts for fluid/air collections
    "lung_nodule": ((10.0, 20.0), ("<=10 mm", "10-20 mm", ">20 mm")),
    "liver_lesion": ((10.0, 20.0), ("<=10 mm", "10-20 mm", ">20 mm")),
    "kidney_stone": ((5.0, 10.0), ("<=5 mm", "5-10 mm", ">10 mm")),
}
AMOUNT_TYPES = ("pleural_effusion", "pneumothorax")
#: smallest size a finding must have to be asked about on the 12 x 96 x 96 volume (27 mm slabs, 4 mm pixels):
#: below it the finding is sub-voxel there and is asked on 2D slices only (the paper's slice-driven path).
VOLUME_MIN_SIZE_MM = {"lung_nodule": 10.0, "liver_lesion": 20.0, "kidney_stone": 6.0}
LETTERS = "ABCDEF"
CHOICE_INSTRUCTION = "Answer with the option's letter."


def size_bucket(finding_type: str, size_mm: float, params: dict | None = None) -> str:
    if finding_type in SIZE_BUCKETS:
        bounds, names = SIZE_BUCKETS[finding_type]
        for bound, name in zip(bounds, names):
            if size_mm <= bound:
                return name
        return names[-1]
    if finding_type in AMOUNT_TYPES and params and "amount" in params:
        return str(params["amount"])
    return "n/a"


def fleischner(size_mm: float) -> str:
    """Fleischner 2017, single solid nodule, low-risk patient."""
    if size_mm < 6:
        return "No routine follow-up"
    if size_mm <= 8:
        return "CT at 6-12 months"
    return "CT at 3 months, PET/CT or tissue sampling"


FLEISCHNER_OPTIONS = ("No routine follow-up", "CT at 6-12 months", "CT at 3 months, PET/CT or tissue sampling")


# ------------------------------------------------------------------------------------------------ truth records
@dataclass
class FindingTruth:
    """What the generator needs to know about one rendered finding."""

    index: int
    type: str
    location: str  # lobe name, 'left'/'right', 'liver', 'kidney_left', 'spleen'
    size_mm: float
    center_z: float  # slice index (fractional) on the rendered grid
    z_range: tuple[int, int] | None  # rendered slices holding finding-mask voxels (None: none labelled)
    params: dict

    @property
    def side(self) -> str | None:
        if self.location in LOBE_TEXT:
            return "right" if self.location.endswith("right") else "left"
        if self.location in ("left", "right"):
            return self.location
        if self.location.startswith("kidney_"):
            return self.location.split("_")[1]
        return None

    @property
    def region(self) -> str:
        """The region a presence question names (lobe / side / organ)."""
        return self.location

    @property
    def bucket(self) -> str:
        return size_bucket(self.type, self.size_mm, self.params)


def region_text(finding_type: str, region: str) -> str:
    if region in LOBE_TEXT:
        return LOBE_TEXT[region]
    if finding_type in ("pleural_effusion", "pneumothorax"):
        return f"{region} hemithorax"
    if region.startswith("kidney_"):
        return f"{region.split('_')[1]} kidney"
    return region


def roi_for(finding_type: str, region: str) -> tuple[str, ...]:
    """TotalSegmentator labels whose mask feeds OSE for a question about ``region``."""
    if region in LOBE_TEXT:
        return (region,)
    if region in ("left", "right"):
        return SIDE_LOBES[region]
    return (region,)


def regions_of(finding_type: str) -> tuple[str, ...]:
    if finding_type in ("lung_nodule", "consolidation"):
        return LOBES
    if finding_type in AMOUNT_TYPES:
        return ("left", "right")
    if finding_type == "kidney_stone":
        return ("kidney_left", "kidney_right")
    if finding_type == "liver_lesion":
        return ("liver",)
    return ("spleen",)


@dataclass
class ImageTruth:
    """One image (a 2D slice or the volume) of a study and what is in it."""

    dim: str
    ref: str
    organ_pixels: dict[str, int]  # TotalSegmentator name -> pixels/voxels at the model resolution
    findings_in: list[FindingTruth]  # findings clearly shown (slice through the finding / volume-visible)
    findings_ambiguous: list[FindingTruth] = field(default_factory=list)  # grazed / sub-voxel: never asked about
    study_findings: list[FindingTruth] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- intents
@dataclass
class Intent:
    """A question before balancing: its key (identical text), the answer content, and sample metadata."""

    key: str
    question: str
    answer: str  # yes/no or option content or short/report text
    task_type: str
    category: str
    organ: str
    roi: tuple[str, ...]
    finding_type: str
    bucket: str
    image: ImageTruth
    options: tuple[str, ...] | None = None  # MC: full option set (shuffled later)
    extra: dict = field(default_factory=dict)


JUDGMENT_ANSWERS = ("Yes", "No")  # the answers of every yes/no question, as the model is trained to give them


def _yes_no(flag: bool) -> str:
    return JUDGMENT_ANSWERS[0] if flag else JUDGMENT_ANSWERS[1]


PRESENCE_TEMPLATES_2D = ("Is there a {f} in the {r} on this slice?", "Does this CT slice show a {f} in the {r}?")
PRESENCE_TEMPLATES_3D = ("Is there a {f} in the {r}?", "Does this CT volume show a {f} in the {r}?")
SPLENOMEGALY_TEMPLATES = ("Is the spleen enlarged?", "Is there splenomegaly?")


def presence_intents(image: ImageTruth, rng: np.random.Generator) -> list[Intent]:
    """MAI judgment: 'is there a <finding> in <region>' for every region shown, yes or no from the truth."""
    out = []
    shown = {(f.type, f.region) for f in image.findings_in}
    unsure = {(f.type, f.region) for f in image.findings_ambiguous}
    templates = PRESENCE_TEMPLATES_2D if image.dim == "2d" else PRESENCE_TEMPLATES_3D
    for ftype in FINDING_TYPES:
        for region in regions_of(ftype):
            roi = roi_for(ftype, region)
            if sum(image.organ_pixels.get(name, 0) for name in roi) < (20 if image.dim == "2d" else 50):
                continue  # the region is not on this image: nothing to ask
            if (ftype, region) in unsure:
                continue
            if ftype == "splenomegaly":
                template = SPLENOMEGALY_TEMPLATES[int(rng.integers(len(SPLENOMEGALY_TEMPLATES)))]
                question = template
            else:
                template = templates[int(rng.integers(len(templates)))]
                question = template.format(f=FINDING_TEXT[ftype], r=region_text(ftype, region))
            positive = (ftype, region) in shown
            finding = next((f for f in image.findings_in if (f.type, f.region) == (ftype, region)), None)
            out.append(Intent(
                key=f"presence|{image.dim}|{question}", question=question, answer=_yes_no(positive),
                task_type="judgment", category="abnormality", organ=ORGAN_CLASS[ftype], roi=roi,
                finding_type=ftype, bucket=finding.bucket if finding else "none", image=image))
    return out


def recognition_intents(image: ImageTruth, rng: np.random.Generator) -> list[Intent]:
    """GIR: organ on this slice (judgment, whole-image OSE) and which organ the mask outlines (MC)."""
    out = []
    if image.dim != "2d":
        return out
    organs = list(RECOGNITION_ORGANS)
    for pick in rng.choice(len(organs), size=2, replace=False):  # two per slice: keep GIR from dominating
        organ, names = organs[int(pick)], RECOGNITION_ORGANS[organs[int(pick)]]
        pixels = sum(image.organ_pixels.get(n, 0) for n in names)
        if 0 < pixels < 40:
            continue  # grazed: ambiguous
        question = f"Is the {organ} visible on this slice?"
        out.append(Intent(key=f"recognition|2d|{question}", question=question, answer=_yes_no(pixels >= 40),
                          task_type="judgment", category="recognition", organ=RECOGNITION_CLASS[organ], roi=(),
                          finding_type="none", bucket="n/a", image=image))
    present = [o for o, names in RECOGNITION_ORGANS.items() if sum(image.organ_pixels.get(n, 0) for n in names) >= 80]
    if present:
        organ = present[int(rng.integers(len(present)))]
        question = "Which organ is outlined by the organ mask?"
        out.append(Intent(key=f"organ_mc|2d|{question}", question=question, answer=organ,
                          task_type="multiple_choice", category="recognition", organ=RECOGNITION_CLASS[organ],
                          roi=RECOGNITION_ORGANS[organ], finding_type="none", bucket="n/a", image=image,
                          options=tuple(RECOGNITION_ORGANS), extra={"n_options": 4}))
    return out


def finding_intents(image: ImageTruth, rng: np.random.Generator) -> list[Intent]:
    """AII (location, size: MC + short answer) and CRD (management) questions about each finding shown."""
    out = []
    d = image.dim
    where = "on this slice" if d == "2d" else "in this study"
    for f in image.findings_in:
        ftype, name = f.type, FINDING_TEXT[f.type]
        roi = roi_for(ftype, f.region)
        common = dict(organ=ORGAN_CLASS[ftype], finding_type=ftype, bucket=f.bucket, image=image)
        lung_roi = SIDE_LOBES["right"] + SIDE_LOBES["left"]
        # location
        if ftype in ("lung_nodule", "consolidation"):
            q = f"In which lobe is the {name} {where}?"
            out.append(Intent(key=f"lobe_mc|{d}|{q}", question=q, answer=LOBE_TEXT[f.location],
                              task_type="multiple_choice", category="interpretation", roi=lung_roi,
                              options=tuple(LOBE_TEXT[lb] for lb in LOBES), **common))
            q = f"Which lobe contains the {name}?"
            out.append(Intent(key=f"lobe_sa|{d}|{q}", question=q, answer=LOBE_TEXT[f.location],
                              task_type="short_answer", category="interpretation", roi=lung_roi, **common))
        elif f.side is not None and ftype in ("pleural_effusion", "pneumothorax", "kidney_stone"):
            both = lung_roi if ftype != "kidney_stone" else ("kidney_left", "kidney_right")
            q = f"On which side is the {name}?"
            out.append(Intent(key=f"side_mc|{d}|{q}", question=q, answer=f.side, task_type="multiple_choice",
                              category="interpretation", roi=both, options=("left", "right"), **common))
            q = f"Which side is the {name} on? Answer left or right."
            out.append(Intent(key=f"side_sa|{d}|{q}", question=q, answer=f.side, task_type="short_answer",
                              category="interpretation", roi=both, **common))
        # size
        if ftype in SIZE_BUCKETS:
            q = f"What is the size category of the {name} in the {region_text(ftype, f.region)}?"
            out.append(Intent(key=f"size_mc|{d}|{ftype}", question=q, answer=f.bucket, task_type="multiple_choice",
                              category="interpretation", roi=roi, options=SIZE_BUCKETS[ftype][1], **common))
            q = f"How large is the {name} in the {region_text(ftype, f.region)}? Give the size range."
            out.append(Intent(key=f"size_sa|{d}|{ftype}", question=q, answer=f.bucket, task_type="short_answer",
                              category="interpretation", roi=roi, **common))
        elif ftype in AMOUNT_TYPES:
            q = f"How large is the {f.side} {name}: small, moderate or large?"
            out.append(Intent(key=f"amount_mc|{d}|{ftype}", question=q, answer=f.bucket,
                              task_type="multiple_choice", category="interpretation", roi=roi,
                              options=("small", "moderate", "large"), **common))
        # reasoning
        if ftype == "lung_nodule":
            q = (f"The {LOBE_TEXT[f.location]} nodule is solid and solitary in a low-risk patient. "
                 "What follow-up do the Fleischner 2017 guidelines recommend?")
            out.append(Intent(key=f"fleischner|{d}", question=q, answer=fleischner(f.size_mm),
                              task_type="multiple_choice", category="reasoning", roi=roi,
                              options=FLEISCHNER_OPTIONS, **common))
        elif ftype == "pneumothorax":
            q = f"Is the {f.side} pneumothorax large (rim of at least 2 cm), so that drainage should be considered?"
            out.append(Intent(key=f"ptx_drain|{d}|{q}", question=q, answer=_yes_no(f.size_mm >= 20.0),
                              task_type="judgment", category="reasoning", roi=roi, **common))
        elif ftype == "kidney_stone":
            q = f"Is the {f.side} kidney stone small enough (5 mm or less) to be likely to pass spontaneously?"
            out.append(Intent(key=f"stone_pass|{d}|{q}", question=q, answer=_yes_no(f.size_mm <= 5.0),
                              task_type="judgment", category="reasoning", roi=roi, **common))
    return out


def report_text(findings: list[FindingTruth]) -> str:
    """Findings / Impression rendered from the ground truth."""
    lines, impressions = [], []
    kinds = {f.type for f in findings}
    for f in sorted(findings, key=lambda f: (FINDING_TYPES.index(f.type), f.location)):
        if f.type == "lung_nodule":
            lines.append(f"A {f.size_mm:.0f} mm solid nodule in the {LOBE_TEXT[f.location]}.")
            advice = fleischner(f.size_mm)
            advice = advice[0].lower() + advice[1:] if advice.startswith("No") else advice  # keep "CT", "PET/CT"
            impressions.append(f"{LOBE_TEXT[f.location].capitalize()} nodule, {f.size_mm:.0f} mm: {advice}.")
        elif f.type == "consolidation":
            lines.append(f"{f.params.get('extent', 'segmental').capitalize()} consolidation in the "
                         f"{LOBE_TEXT[f.location]}.")
            impressions.append(f"{LOBE_TEXT[f.location].capitalize()} consolidation, likely pneumonia.")
        elif f.type == "pleural_effusion":
            lines.append(f"{f.bucket.capitalize()} {f.side} pleural effusion.")
            impressions.append(f"{f.bucket.capitalize()} {f.side} pleural effusion.")
        elif f.type == "pneumothorax":
            lines.append(f"{f.bucket.capitalize()} {f.side} pneumothorax, rim {f.size_mm:.0f} mm.")
            impressions.append(f"{f.side.capitalize()} pneumothorax" + (", consider drainage." if f.size_mm >= 20
                                                                          else ", conservative management."))
        elif f.type == "liver_lesion":
            kind = "cyst" if f.params.get("kind") == "cyst" else "hypodense lesion"
            lines.append(f"A {f.size_mm:.0f} mm liver {kind}.")
            impressions.append("Simple liver cyst." if kind == "cyst" else
                               f"Liver lesion {f.size_mm:.0f} mm, indeterminate; consider MRI.")
        elif f.type == "kidney_stone":
            lines.append(f"A {f.size_mm:.0f} mm stone in the {f.side} kidney.")
            impressions.append(f"{f.side.capitalize()} nephrolithiasis, {f.size_mm:.0f} mm.")
        elif f.type == "splenomegaly":
            lines.append(f"Enlarged spleen, craniocaudal length {f.size_mm / 10:.0f} cm.")
            impressions.append("Splenomegaly.")
    if "pleural_effusion" not in kinds and "pneumothorax" not in kinds:
        lines.append("No pleural effusion or pneumothorax.")
    if not findings:
        lines.insert(0, "The lungs are clear.")
        lines.append("Liver, spleen and kidneys are unremarkable.")
        impressions.append("No acute abnormality.")
    return "Findings: " + " ".join(lines) + " Impression: " + " ".join(impressions)


REPORT_PROMPTS = ("Write the findings and impression for this chest CT.",
                  "Generate a radiology report (findings and impression) for this CT volume.")


def report_intent(image: ImageTruth, rng: np.random.Generator) -> Intent:
    question = REPORT_PROMPTS[int(rng.integers(len(REPORT_PROMPTS)))]
    main = image.study_findings[0].type if image.study_findings else "none"
    return Intent(key=f"report|3d|{question}", question=question, answer=report_text(image.study_findings),
                  task_type="report", category="interpretation",
                  organ=ORGAN_CLASS.get(main, "others"), roi=(), finding_type=main if len(image.study_findings) < 2
                  else "multiple", bucket="n/a", image=image)


def image_intents(image: ImageTruth, rng: np.random.Generator) -> list[Intent]:
    return presence_intents(image, rng) + recognition_intents(image, rng) + finding_intents(image, rng)


# -------------------------------------------------------------------------------------------------- balancing
def balance(intents: list[Intent], rng: np.random.Generator, cap_per_answer: int | None = None) -> list[Intent]:
    """Equal counts of every answer within each key (exact 50/50 yes/no, uniform MC contents).

    Short answers and reports are kept as they are (they are open-ended: no chance level to protect).
    """
    by_key: dict[str, dict[str, list[Intent]]] = defaultdict(lambda: defaultdict(list))
    kept: list[Intent] = []
    for intent in intents:
        if intent.task_type in ("judgment", "multiple_choice"):
            by_key[intent.key][intent.answer].append(intent)
        else:
            kept.append(intent)
    for key in sorted(by_key):
        groups = by_key[key]
        expected = _expected_answers(groups)
        if any(len(groups.get(a, [])) == 0 for a in expected):
            continue  # one answer never occurs for this key: asking it would leak the answer through the text
        n = min(len(groups[a]) for a in expected)
        if cap_per_answer:
            n = min(n, cap_per_answer)
        for answer in expected:
            items = groups[answer]
            chosen = rng.choice(len(items), size=n, replace=False)
            kept.extend(items[i] for i in sorted(chosen))
    return kept


def _expected_answers(groups: dict[str, list[Intent]]) -> list[str]:
    sample = next(iter(groups.values()))[0]
    if sample.task_type == "judgment":
        return list(JUDGMENT_ANSWERS)
    if sample.extra.get("n_options"):  # organ MC: any organ can be right; balance over those that occur
        return sorted(groups)
    return list(sample.options or sorted(groups))


def format_choices(stem: str, options: Sequence[str], correct: str) -> tuple[str, str]:
    """A multiple-choice question and its answer: ``('stem\\nA. x\\nB. y\\n<instruction>', 'B. y')``
    for ``correct == 'y'``. The lettered form every MC sample's human and gpt turns use."""
    lettered = lettered_options(options)
    return f"{stem}\n" + "\n".join(lettered) + f"\n{CHOICE_INSTRUCTION}", lettered[list(options).index(correct)]


def lettered_options(options: Sequence[str]) -> list[str]:
    """``['x', 'y']`` -> ``['A. x', 'B. y']``: the option lines of a question, and the answers they allow."""
    return [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]


def answer_candidates(sample: dict) -> list[str] | None:
    """Every answer a closed question allows, in the form the model was trained to give (``Yes`` / ``No``; the
    lettered options of a multiple-choice question); None for open questions. Ranked answering scores each."""
    if sample.get("task_type") == "judgment":
        return list(JUDGMENT_ANSWERS)
    if sample.get("task_type") == "multiple_choice":
        return lettered_options(sample["options"])
    return None


def choice_stem(sample: dict) -> str:
    """A multiple-choice sample's human turn without its lettered options and instruction (what
    :func:`format_choices` was given); ValueError when the turn does not end with them."""
    human = sample["conversations"][0]["value"]
    lettered, _ = format_choices("", sample["options"], sample["answer_content"])
    if not human.endswith(lettered):
        raise ValueError(f"sample {sample.get('id')}: question does not end with its lettered options")
    return human[: -len(lettered)]


def reletter_choices(sample: dict, rng: np.random.Generator) -> dict:
    """A copy of a multiple-choice sample with its options in a new random order: the question's option lines, the
    answer letter and ``options`` all follow the new order. Any other sample is returned as it is.

    Why: training on fresh letter assignments each time a sample is drawn leaves the answer letter nothing to be
    learned from but the lookup (which listed option says what the image shows); a fixed order per sample lets a
    small LLM fall back on letter priors (model card, "Where the accuracy is lost").
    """
    if sample.get("task_type") != "multiple_choice":
        return sample
    options, correct = list(sample["options"]), sample["answer_content"]
    new_options = [options[i] for i in rng.permutation(len(options))]
    question, answer = format_choices(choice_stem(sample), new_options, correct)
    conversations = [{**sample["conversations"][0], "value": question},
                     {**sample["conversations"][1], "value": answer}, *sample["conversations"][2:]]
    return {**sample, "conversations": conversations, "answer": answer, "options": new_options}


def to_sample(intent: Intent, sample_id: str, rng: np.random.Generator, label_ids: dict[str, int],
              study_seed: int) -> dict[str, Any]:
    """Intent -> JSON sample (letters shuffled for MC)."""
    question, answer, options = intent.question, intent.answer, None
    if intent.task_type == "multiple_choice":
        pool = list(intent.options or ())
        k = int(intent.extra.get("n_options") or len(pool))
        others = [o for o in pool if o != intent.answer]
        picked = [intent.answer] + [others[i] for i in rng.choice(len(others), size=k - 1, replace=False)]
        order = rng.permutation(len(picked))
        options = [picked[i] for i in order]
        question, answer = format_choices(question, options, intent.answer)
    elif intent.task_type == "judgment":
        question = question + " Answer yes or no."
    return {
        "id": sample_id, "image": intent.image.ref, "dim": intent.image.dim,
        "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}],
        "answer": answer, "options": options, "answer_content": intent.answer,
        "task_type": intent.task_type, "category": intent.category, "organ": intent.organ,
        "roi": list(intent.roi), "roi_label_ids": [label_ids[n] for n in intent.roi],
        "finding_type": intent.finding_type, "size_bucket": intent.bucket, "question_key": intent.key,
        "study_seed": study_seed,
    }
