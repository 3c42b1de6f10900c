"""Benchmark: the paper-size OmniCT (random weights) answering a 10-question battery on a 32×384×384 volume, on a GPU.

What it measures, for the ``omnict-3b`` / ``omnict-7b`` preset (SigLIP-so400m-patch14-384 + Qwen2.5-3B/7B shapes,
the LLM keeping Qwen2.5's full vocabulary) in bf16:

* latency of the engine's battery (``OmniCTEngine.ask``: vision tower once, shared prefix once, every organ group and
  question in one packed pass, batched greedy decoding), with and without the per-unit relevance pass;
* peak GPU memory during the battery (``torch.cuda.max_memory_allocated``), beside the weights' own memory;
* with ``--reference``, one full ``model.generate()`` per question on the same model, for the same answers and the
  speed-up (bf16 kernels differ between a packed and a per-question pass, so greedy paths of a RANDOM model may part
  after some tokens; the number of identical answers is printed, not asserted — the CPU bench asserts identity).

Random weights never emit ``<|im_end|>``: every answer runs to ``--max-new-tokens``, the worst case for decoding.
The volume is a phantom study resampled by the node's own preprocessing (window, resample, VSC) to 32×384×384.

    python bench/paper_size_battery.py --preset omnict-3b --device cuda [--reference] [--reps 5]
    python bench/paper_size_battery.py --preset tiny --device cpu --reps 1     # a smoke run of the same code

Last line: ``paper_size_battery_ms=<median engine latency>`` (with ``--reference`` also the speed-up on the line
before it).
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
sys.path.insert(0, str(REPO / "bench"))

from omnict_core.configuration_omnict import omnict_preset  # noqa: E402
from omnict_core.inference.engine import OmniCTEngine, baseline_generate  # noqa: E402
from omnict_core.modeling_omnict import OmniCTForConditionalGeneration  # noqa: E402
from omnict_core.phantom import PhantomSpec, generate_study  # noqa: E402
from omnict_core.preprocessing import prepare_volume  # noqa: E402
from omnict_core.tokenization_omnict import train_tokenizer  # noqa: E402
from vqa_battery import BATTERY  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_random_model(preset: str, tokenizer, device: torch.device, dtype: torch.dtype):
    """The preset with random weights, created directly on ``device`` in ``dtype`` (no CPU copy of 4-8 B params).
    The LLM keeps the preset's vocabulary (Qwen2.5's) so the embedding and LM head have their real sizes."""
    config = omnict_preset(preset)
    preset_vocab = config.text_config.vocab_size
    config.attach_tokenizer(tokenizer)
    config.text_config.vocab_size = max(preset_vocab, len(tokenizer))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = OmniCTForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="omnict-3b", choices=["omnict-3b", "omnict-7b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reference", action="store_true", help="also time one generate() per question")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)

    corpus = [q.text for q in BATTERY] * 10 + ["The liver is normal. No nodule, no stone, no fluid."] * 10
    tokenizer = train_tokenizer(corpus, vocab_size=512)
    (model, build_s) = timed(lambda: build_random_model(args.preset, tokenizer, device, dtype), device)
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {gpu}; torch {torch.__version__}")
    print(f"model: {args.preset}, random weights, {n_params / 1e9:.2f} B parameters, {args.dtype}, "
          f"weights {gib(weights)}, built in {build_s:.1f} s (LLM vocabulary {config.text_config.vocab_size})")

    phantom = generate_study(PhantomSpec(seed=args.seed, slices=96, size=256, findings=["liver_lesion"]))
    study = prepare_volume(phantom.hu, config, labels=phantom.labels.astype("int32"), spacing=phantom.spacing,
                           label_names=phantom.label_names)
    depth, size = config.volume_depth, study.pixel_units.shape[-1]
    per_unit = config.tokens_per_unit("3d")
    print(f"volume: phantom {tuple(phantom.hu.shape)} HU -> {depth}x{size}x{size} (VSC: {study.num_units} units "
          f"of 3 slices) -> {study.num_units} x {per_unit} = {study.num_units * per_unit} global visual tokens "
          f"+ {config.num_organ_tokens('3d')} organ tokens per question")
    engine = OmniCTEngine(model, tokenizer, device=device, max_new_tokens=args.max_new_tokens)
    print(f"battery: {len(BATTERY)} questions, {len({q.organ for q in BATTERY})} organ prefixes, "
          f"max_new_tokens={args.max_new_tokens} (random weights: every answer runs to the limit)")

    answers, first_s = timed(lambda: engine.ask(study, BATTERY), device)  # warm-up (kernels, RoPE table)
    print(f"first battery (cold kernels): {first_s * 1000:.0f} ms; answer lengths "
          f"{[len(a.token_ids) for a in answers]}")

    times: dict[str, list[float]] = {"engine": [], "engine+relevance": []}
    peaks: dict[str, int] = {}
    for _ in range(args.reps):
        for name, relevance in (("engine", False), ("engine+relevance", True)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _, seconds = timed(lambda: engine.ask(study, BATTERY, with_relevance=relevance), device)
            times[name].append(seconds)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
    for name, values in times.items():
        runs = ", ".join(f"{v * 1000:.0f}" for v in values)
        peak = f"; peak GPU memory {gib(peaks[name])} ({gib(peaks[name] - weights)} above the weights)" \
            if name in peaks else ""
        print(f"{name:>17}: median {statistics.median(values) * 1000:8.1f} ms per battery (runs: {runs}){peak}")

    if args.reference:
        def run_reference():
            return [baseline_generate(model, tokenizer, study, q, args.max_new_tokens) for q in BATTERY]

        reference, _ = timed(run_reference, device)  # warm-up
        ref_times = [timed(run_reference, device)[1] for _ in range(max(1, args.reps // 2))]
        same = sum(a.token_ids == r for a, r in zip(answers, reference))
        common = [next((i for i, (x, y) in enumerate(zip(a.token_ids, r)) if x != y), len(r))
                  for a, r in zip(answers, reference)]
        print(f"reference (one generate() per question): median {statistics.median(ref_times) * 1000:.1f} ms "
              f"per battery (runs: {', '.join(f'{v * 1000:.0f}' for v in ref_times)}); answers identical "
              f"{same}/{len(BATTERY)}, identical leading tokens {common}")
        print(f"battery_speedup={statistics.median(ref_times) / statistics.median(times['engine']):.2f}")
    print(f"paper_size_battery_ms={statistics.median(times['engine']) * 1000:.1f}")


if __name__ == "__main__":
    main()
