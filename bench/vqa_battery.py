"""Benchmark: a 10-question VQA battery on one phantom study, OmniCT engine vs one full ``generate()`` per question.

Reference (what a plain HF user does): for each question, ``model.generate()`` on the whole prompt — vision tower,
prefill of system + image + organ + question tokens, greedy decoding — batch 1.
Engine (omnict_core/inference/engine.py): image encoded once; the shared prefix (system turn + global visual tokens)
prefilled once; every organ group's own tokens and every question in ONE packed pass over a tree-shaped KV buffer;
greedy decoding of all unfinished answers as one packed step each (finished answers drop out), in a lean decode loop
on the model's own weights (no HF generate / Cache / mask machinery), each step also checking draft tokens looked up
in the checkpoint's table of training-answer n-grams (``answer_ngrams.json``, omnict_core/inference/drafting.py):
a draft token is kept only where it equals the model's own greedy choice, so it saves passes, never changes a
token; relevance from the decode pass's own queries and keys. Same model, dtype (fp32), greedy settings and
max_new_tokens; answers are asserted token-identical. One warm-up round, then ``--reps`` interleaved rounds; medians
are compared.

Uses ``checkpoints/omnict-tiny-phantom/`` when it exists, else a randomly initialised tiny model (a random model
never emits <|im_end|>, so every answer runs to max_new_tokens in both paths; no draft table).

What bounds the ratio: the reference runs the vision tower and the whole prompt once per question and
sum(answer lengths) decode steps at batch 1 through HF generate (~3-5 ms a step on this CPU, mostly per-call
machinery); the engine runs the vision tower once (~25% of its time: the same computation as one reference call),
~30% of the reference's prompt tokens (the last layer only for the positions whose logits are needed), and
at most max(answer lengths) packed decode steps of ~1-2 ms each (reading the weights + ~200 small ops), fewer where
drafts are kept (the report-like 10th answer of the leg-3 checkpoint: 31 tokens in 7 passes; of leg 4: 11 in 4).

    .venv/bin/python bench/vqa_battery.py [--checkpoint DIR] [--reps 7] [--max-new-tokens 32] [--threads N]
    .venv/bin/python bench/vqa_battery.py --checkpoint /nonexistent      # random weights

Last line: ``battery_speedup=<median reference time / median engine time>`` (answers only, like the reference);
the lines before it: the engine with its per-unit relevance pass, and the engine without the draft table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omnict_core.inference.drafting import AnswerDrafter  # noqa: E402
from omnict_core.inference.engine import OmniCTEngine, Question, baseline_generate  # noqa: E402
from omnict_core.modeling_omnict import build_model, load_omnict  # noqa: E402
from omnict_core.phantom import PhantomSpec, generate_study  # noqa: E402
from omnict_core.preprocessing import prepare_volume  # noqa: E402
from omnict_core.tokenization_omnict import train_tokenizer  # noqa: E402

DEFAULT_CHECKPOINT = REPO / "checkpoints" / "omnict-tiny-phantom"

BATTERY = [
    Question("Is there a focal lesion in the liver?", "liver"),
    Question("What is the mean attenuation of the liver in HU?", "liver"),
    Question("Are both kidneys present and normal in size?", "kidneys"),
    Question("Is there a stone in either kidney?", "kidneys"),
    Question("Is there a nodule in the lungs?", "lungs"),
    Question("Is there a pneumothorax?", "lungs"),
    Question("Is the spleen enlarged?", "spleen"),
    Question("Is the heart size normal?", "heart"),
    Question("Is there free fluid in the abdomen?"),
    Question("Summarise the main findings of this CT."),
]


def load_model(checkpoint: Path):
    if (checkpoint / "config.json").is_file():
        model, tokenizer = load_omnict(checkpoint, dtype=torch.float32)
        return model.eval(), tokenizer, f"checkpoint {checkpoint}"
    corpus = [q.text for q in BATTERY] * 10 + ["The liver is normal. No nodule, no stone, no fluid."] * 10
    tokenizer = train_tokenizer(corpus, vocab_size=512)
    torch.manual_seed(0)
    return build_model("tiny", tokenizer).eval(), tokenizer, "random tiny model (no checkpoint found)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both paths (1: the tiny model is overhead-bound and extra "
                             "OpenMP threads only add noise on the shared 2-core machine; 0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, source = load_model(args.checkpoint)
    phantom = generate_study(PhantomSpec(seed=args.seed, slices=48, size=128, findings=["liver_lesion"]))
    study = prepare_volume(phantom.hu, model.config, labels=phantom.labels.astype("int32"),
                           spacing=phantom.spacing, label_names=phantom.label_names)
    drafter = AnswerDrafter.load(args.checkpoint, tokenizer) if args.checkpoint.is_dir() else None
    engine = OmniCTEngine(model, tokenizer, max_new_tokens=args.max_new_tokens, drafter=drafter)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {source}, {n_params / 1e6:.1f}M parameters, fp32, torch threads={torch.get_num_threads()}")
    print(f"study: {phantom.hu.shape} HU -> {study.num_units} units; {len(BATTERY)} questions, "
          f"{len({q.organ for q in BATTERY})} organ prefixes, max_new_tokens={args.max_new_tokens}")

    def run_reference():
        return [baseline_generate(model, tokenizer, study, q, args.max_new_tokens) for q in BATTERY]

    def run_engine(with_relevance: bool):
        return engine.ask(study, BATTERY, with_relevance=with_relevance)

    # warm-up + correctness
    reference = run_reference()
    answers = run_engine(True)
    mismatches = [i for i, (a, r) in enumerate(zip(answers, reference)) if a.token_ids != r]
    assert not mismatches, f"engine answers differ from generate() for questions {mismatches}"
    steps = [len(a.token_ids) + int(a.finished) for a in answers]  # tokens incl. the closing <|im_end|>
    decode = engine.last_decode
    print(f"answers identical to per-question generate(): {len(answers)}/{len(BATTERY)}; "
          f"answer lengths {[len(a.token_ids) for a in answers]}")
    print(f"decoder passes after the prompt: reference {sum(steps) - len(steps)} (batch 1), engine {decode.passes} "
          f"(batched; without drafts it would be {max(steps) - 1}); vision tower runs: reference {len(BATTERY)}, "
          f"engine 1")
    print(f"drafts ({'answer n-grams of ' + str(args.checkpoint) if drafter else 'none: no answer_ngrams.json'}): "
          f"{decode.draft_tokens} draft tokens fed, {decode.draft_tokens_kept} kept")
    for q, a in list(zip(BATTERY, answers))[:3]:
        print(f"  [{q.organ or 'whole body'}] {q.text} -> {a.text[:60]!r} key slices {a.key_slices[:6]}")

    undrafted = OmniCTEngine(model, tokenizer, max_new_tokens=args.max_new_tokens)  # same engine, no draft table
    assert [a.token_ids for a in undrafted.ask(study, BATTERY, with_relevance=False)] == reference  # + warm-up
    times = {"reference": [], "engine": [], "engine+relevance": [], "engine, no drafts": []}
    with torch.inference_mode():
        for _ in range(args.reps):
            for name, fn in (("reference", run_reference), ("engine", lambda: run_engine(False)),
                             ("engine+relevance", lambda: run_engine(True)),
                             ("engine, no drafts", lambda: undrafted.ask(study, BATTERY, with_relevance=False))):
                start = time.perf_counter()
                result = fn()
                times[name].append(time.perf_counter() - start)
                ids = result if name == "reference" else [a.token_ids for a in result]
                assert ids == reference, f"{name}: answers changed between rounds"  # every timed round checked
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, values in times.items():
        runs = ", ".join(f"{v * 1000:.0f}" for v in values)
        print(f"{name:>17}: median {medians[name] * 1000:8.1f} ms per battery, "
              f"{medians[name] * 1000 / len(BATTERY):6.1f} ms per question  (runs: {runs})")
    paired = [r / e for r, e in zip(times["reference"], times["engine"])]
    print(f"per-round ratios reference/engine: {', '.join(f'{x:.2f}' for x in paired)} "
          f"(median {statistics.median(paired):.2f})")
    print(f"battery_speedup_without_drafts={medians['reference'] / medians['engine, no drafts']:.2f}")
    print(f"battery_speedup_with_relevance={medians['reference'] / medians['engine+relevance']:.2f}")
    print(f"battery_speedup={medians['reference'] / medians['engine']:.2f}")


if __name__ == "__main__":
    main()
