"""What token selection costs, next to the papers' own code, and what it saves in prefill time.

    python benchmarks/selection.py [--device cpu|cuda] [--repeats R] [--quick]

Part 1 times ``vtc.get_method(name).plan(signals, keep)`` for every registered method (and DART with
merge=True) on random signals of LLaVA-1.5-7B's shape (N=576 tokens, D=4096), next to straightforward
"paper form" implementations written below: DivPrune's greedy loop over a full distance matrix, DART's
Python-set loop, FasterVLM's top-k. vtc's DivPrune and FasterVLM selections must equal the paper
forms' on the benchmark input (checked here, the script stops otherwise).

Part 2 times the full forward (vision tower + LLM prefill) of a random-weight LLaVA built with
vtc.tiny.tiny_llava, one prompt with one image, uncompressed and compressed to 192/128/64 tokens.

Timings: warm-up calls, then the median of ``--repeats`` calls; the candidates of one table are
interleaved call by call, so drift hits them alike. Threads are whatever the environment gives
(OMP_NUM_THREADS); run with nothing else on the machine: the share of CPU time other processes took
during the run is measured (Linux) and printed. A full run appends one JSON row to
benchmarks/results/selection.jsonl, after the test suite passes (results are refused while tests fail).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

import vtc
from vtc.tiny import tiny_llava, tiny_llava_inputs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "selection.jsonl"

FULL = {
    "repeats": 20,
    "warmup": 3,
    "selection": {"tokens": 576, "dim": 4096, "keep": 64, "vision_layers": 23},
    # LLM-dominated: 4 decoder layers on ~630 tokens against 2 vision layers (LLaVA-1.5-7B: 32 vs 24 but
    # each LLM layer is ~4x a CLIP-L layer). hidden 512 keeps a forward near a second on 2 cores.
    "model": {"hidden_size": 512, "text_layers": 4, "vision_layers": 2, "heads": 8, "intermediate_size": 1376},
    "text_lengths": (35, 20),  # text tokens before / after the image, about a LLaVA-1.5 prompt
    "keeps": (192, 128, 64),
}
QUICK = {
    "repeats": 3,
    "warmup": 1,
    "selection": {"tokens": 576, "dim": 1024, "keep": 64, "vision_layers": 23},
    "model": {"hidden_size": 128, "text_layers": 2, "vision_layers": 2, "heads": 4, "intermediate_size": 344},
    "text_lengths": (35, 20),
    "keeps": (192, 64),
}
# Image benchmarks: the temporal methods (evs) need a video's (T, H, W) grid.
PREFILL_METHODS = tuple(name for name in vtc.list_methods("pre") if not vtc.get_method(name).temporal)


# -- paper forms: written the way the original repositories write them, batch of one image -----------------


def pairwise_cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, N], as vbdi/divprune computes it."""
    normed = x / x.norm(dim=1, keepdim=True)
    return torch.mm(normed, normed.t())


def divprune_paper(features: torch.Tensor, keep: int) -> torch.Tensor:
    """vbdi/divprune's greedy max-min: full distance matrix, then step i takes the min over the i picked rows."""
    dist = 1.0 - pairwise_cosine_similarity(features[0])
    picked = torch.empty(keep, dtype=torch.long, device=features.device)
    for i in range(keep):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]  # nearest-neighbour distance
        else:
            scores = torch.min(dist.index_select(0, picked[:i]), dim=0).values
        picked[i] = torch.argmax(scores)
    return picked.sort().values.unsqueeze(0)


def dart_paper(features: torch.Tensor, keep: int, num_pivots: int = 8) -> torch.Tensor:
    """ZichenWen1/DART's selection loop on visual tokens: pivots by L1 norm, then per pivot (Python set
    order) the remaining candidates of lowest cosine similarity. The per-pivot count is (keep - P) // P so
    that, like vtc, it keeps ``keep`` tokens when P divides keep (the original takes keep // P per pivot)."""
    x = features[0]
    pivots = x.norm(p=1, dim=-1).topk(num_pivots).indices.tolist()
    per_pivot = (keep - num_pivots) // num_pivots
    kept = set(pivots)
    candidates = set(range(x.shape[0]))
    candidates.difference_update(pivots)
    for pivot in list(kept):
        candidate_list = list(candidates)
        similarity = -F.cosine_similarity(x[pivot, :], x[candidate_list, :], dim=-1)
        chosen = [candidate_list[i] for i in similarity.topk(per_pivot).indices.tolist()]
        kept.update(chosen)
        candidates.difference_update(chosen)
    return torch.tensor(sorted(kept), device=features.device).unsqueeze(0)


def fastervlm_paper(cls_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """Theia-4869/FasterVLM: top-k of the [CLS] attention, kept in original order."""
    return cls_attention.topk(keep, dim=1).indices.sort(dim=1).values


# -- timing -------------------------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def time_interleaved(
    candidates: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
    setup: dict[str, Callable[[], Callable[[], None]]] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per call of each candidate; one call of each in turn per round, so drift hits all alike.

    ``setup[name]()`` (untimed) runs before each call of ``name`` and returns an untimed teardown.
    """
    sync = synchronizer(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(warmup + repeats):
        for name, fn in candidates.items():
            teardown = setup[name]() if setup and name in setup else None
            sync()
            start = time.perf_counter()
            fn()
            sync()
            elapsed = (time.perf_counter() - start) * 1e3
            if teardown is not None:
                teardown()
            if round_ >= warmup:
                samples[name].append(elapsed)
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


class ForeignLoad:
    """Share of the machine's CPU time spent by other processes between start() and stop() (Linux /proc)."""

    def __init__(self) -> None:
        self._start: tuple[int, int, int] | None = None

    @staticmethod
    def _read() -> tuple[int, int, int] | None:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # /proc/stat cpu line: user nice system idle iowait irq softirq steal [guest guest_nice, inside user]
        total = sum(values[:8])
        busy = total - values[3] - values[4]
        own = int(fields[11]) + int(fields[12])  # utime + stime of all our threads
        return total, busy, own

    def start(self) -> ForeignLoad:
        self._start = self._read()
        return self

    def stop(self) -> float | None:
        """Percent of total CPU capacity used by others (100 = every core busy), None where unknown."""
        end = self._read()
        if self._start is None or end is None or end[0] == self._start[0]:
            return None
        total, busy, own = (e - s for e, s in zip(end, self._start, strict=True))
        return max(0.0, 100.0 * (busy - own) / total)


# -- part 1: selection ----------------------------------------------------------------------------------


def selection_signals(tokens: int, dim: int, vision_layers: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, tokens, dim, generator=generator)
    layers = torch.randn(1, vision_layers, tokens, generator=generator).softmax(dim=-1)
    return {
        "features": features.to(device),
        "cls_attention": layers[:, -1].to(device),
        "cls_attention_layers": layers.to(device),
    }


def bench_selection(cfg: dict[str, Any], device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    sel = cfg["selection"]
    keep = sel["keep"]
    signals = selection_signals(sel["tokens"], sel["dim"], sel["vision_layers"], device)

    methods = {name: vtc.get_method(name) for name in PREFILL_METHODS}
    methods["dart(merge=True)"] = vtc.get_method("dart", merge=True)
    paper = {
        "divprune": lambda: divprune_paper(signals["features"], keep),
        "dart": lambda: dart_paper(signals["features"], keep, methods["dart"].num_pivots),
        "fastervlm": lambda: fastervlm_paper(signals["cls_attention"], keep),
    }

    checks = {}
    for name in ("divprune", "fastervlm"):
        ours, theirs = methods[name].plan(signals, keep).kept, paper[name]()
        if not torch.equal(ours.cpu(), theirs.cpu()):
            raise AssertionError(f"vtc's {name} selection differs from the paper form's on the benchmark input")
        checks[f"{name}_equals_paper_form"] = True
    dart_overlap = len(set(methods["dart"].plan(signals, keep).kept[0].tolist()) & set(paper["dart"]()[0].tolist()))
    checks["dart_overlap_with_paper_form"] = dart_overlap

    candidates: dict[str, Callable[[], Any]] = {}
    for name, method in methods.items():
        candidates[f"vtc:{name}"] = lambda method=method: method.plan(signals, keep)
    for name, fn in paper.items():
        candidates[f"paper:{name}"] = fn
    samples = time_interleaved(candidates, repeats, warmup, device)

    rows = []
    for name in methods:
        ours = samples[f"vtc:{name}"]
        theirs = samples.get(f"paper:{name}")
        rows.append(
            {
                "method": name,
                "vtc_ms": median(ours),
                "paper_ms": None if theirs is None else median(theirs),
                "paper_over_vtc": None if theirs is None else median(theirs) / median(ours),
                "vtc_samples_ms": [round(s, 4) for s in ours],
                "paper_samples_ms": None if theirs is None else [round(s, 4) for s in theirs],
            }
        )
    return {"shape": {**sel, "batch": 1}, "rows": rows, "checks": checks}


def print_selection(result: dict[str, Any], device: torch.device, repeats: int) -> None:
    s = result["shape"]
    print(
        f"\nSelection: features [1, {s['tokens']}, {s['dim']}] fp32, keep={s['keep']}, {device.type}, "
        f"median of {repeats} (ms); ratio = paper-form / vtc (> 1: vtc faster)"
    )
    checks = result["checks"]
    print(
        f"check: vtc divprune selection == paper form: {checks['divprune_equals_paper_form']}; "
        f"vtc fastervlm == paper form: {checks['fastervlm_equals_paper_form']}; "
        f"dart shares {checks['dart_overlap_with_paper_form']}/{s['keep']} tokens with the paper form "
        "(pivot order differs by design)"
    )
    print(f"{'method':<17} | {'vtc median ms':>13} | {'paper-form median ms':>20} | {'ratio':>6}")
    print(f"{'-' * 17}-+-{'-' * 13}-+-{'-' * 20}-+-{'-' * 6}")
    for row in result["rows"]:
        paper = "-" if row["paper_ms"] is None else f"{row['paper_ms']:.3f}"
        ratio = "-" if row["paper_over_vtc"] is None else f"{row['paper_over_vtc']:.2f}"
        print(f"{row['method']:<17} | {row['vtc_ms']:>13.3f} | {paper:>20} | {ratio:>6}")


# -- part 2: prefill ------------------------------------------------------------------------------------


def bench_prefill(cfg: dict[str, Any], device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    model = tiny_llava(**cfg["model"]).to(device)
    model.eval()
    inputs = {k: v.to(device) for k, v in tiny_llava_inputs(model, text_lengths=(cfg["text_lengths"],)).items()}
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2

    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, output: captured.__setitem__("features", output.detach())
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    generator = torch.Generator().manual_seed(0)
    signals = {
        "features": captured["features"],  # this model's real projected tokens [1, N, hidden]
        "cls_attention": torch.randn(1, tokens, generator=generator).softmax(dim=-1).to(device),
        # one row per vision layer up to the feature layer (vision_feature_layer -2)
        "cls_attention_layers": torch.randn(1, vision.num_hidden_layers - 1, tokens, generator=generator)
        .softmax(dim=-1)
        .to(device),
    }

    def forward() -> None:
        with torch.no_grad():
            model(**inputs)

    candidates: dict[str, Callable[[], Any]] = {"none": forward}
    setup: dict[str, Callable[[], Callable[[], None]]] = {}
    for method in PREFILL_METHODS:
        for keep in cfg["keeps"]:
            name = f"{method}@{keep}"
            candidates[name] = forward
            setup[name] = lambda method=method, keep=keep: vtc.compress(model, method, keep=keep).remove
    samples = time_interleaved(candidates, repeats, warmup, device, setup)

    selection_candidates: dict[str, Callable[[], Any]] = {}
    for method in PREFILL_METHODS:
        instance = vtc.get_method(method)
        for keep in cfg["keeps"]:
            selection_candidates[f"{method}@{keep}"] = lambda m=instance, k=keep: m.plan(signals, k)
    with torch.no_grad():
        selection = time_interleaved(selection_candidates, repeats, warmup, device)

    base = median(samples["none"])
    rows = [{"method": "none", "keep": tokens, "prefill_ms": base, "speedup": 1.0, "samples_ms": samples["none"]}]
    for method in PREFILL_METHODS:
        for keep in cfg["keeps"]:
            name = f"{method}@{keep}"
            prefill = median(samples[name])
            select = median(selection[name])
            saved = base - prefill
            rows.append(
                {
                    "method": method,
                    "keep": keep,
                    "prefill_ms": prefill,
                    "speedup": base / prefill,
                    "selection_ms": select,
                    "selection_pct_of_saved": 100.0 * select / saved if saved > 0 else None,
                    "samples_ms": [round(s, 3) for s in samples[name]],
                    "selection_samples_ms": [round(s, 4) for s in selection[name]],
                }
            )
    rows[0]["samples_ms"] = [round(s, 3) for s in rows[0]["samples_ms"]]
    return {
        "model": dict(cfg["model"]),
        "text_lengths": list(cfg["text_lengths"]),
        "sequence_length": int(inputs["input_ids"].shape[1]),
        "visual_tokens": tokens,
        "rows": rows,
    }


def print_prefill(result: dict[str, Any], device: torch.device, repeats: int) -> None:
    m = result["model"]
    print(
        f"\nPrefill: tiny_llava(hidden={m['hidden_size']}, text_layers={m['text_layers']}, "
        f"vision_layers={m['vision_layers']}, heads={m['heads']}, intermediate={m['intermediate_size']}), "
        f"1 image, {result['sequence_length']} tokens uncompressed, full forward (vision + LLM prefill), "
        f"{device.type}, median of {repeats} (ms)"
    )
    base = result["rows"][0]
    for method in PREFILL_METHODS:
        print(f"\n{method}")
        header = ("keep", "prefill ms", "speed-up vs 576", "selection ms", "selection % of saved")
        print(f"{header[0]:>4} | {header[1]:>10} | {header[2]:>15} | {header[3]:>12} | {header[4]:>20}")
        print(f"{'-' * 4}-+-{'-' * 10}-+-{'-' * 15}-+-{'-' * 12}-+-{'-' * 20}")
        print(f"{base['keep']:>4} | {base['prefill_ms']:>10.1f} | {'1.00x':>15} | {'-':>12} | {'-':>20}")
        for row in result["rows"][1:]:
            if row["method"] != method:
                continue
            pct = "-" if row["selection_pct_of_saved"] is None else f"{row['selection_pct_of_saved']:.2f}%"
            speedup = f"{row['speedup']:.2f}x"
            print(
                f"{row['keep']:>4} | {row['prefill_ms']:>10.1f} | {speedup:>15} | "
                f"{row['selection_ms']:>12.3f} | {pct:>20}"
            )


# -- run ------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
    }


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", ".", ":!benchmarks/results")  # appended rows are not code
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def run_tests() -> bool:
    print("running the test suite before recording results (results are refused while tests fail) ...", flush=True)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    print("\n".join(lines[-1:] if done.returncode == 0 else lines[-30:]))
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per candidate (default 20, quick 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repeats, nothing saved")
    parser.add_argument("--out", type=Path, default=None, help=f"JSONL to append to (default {RESULTS})")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the tests first (implies --no-save)")
    args = parser.parse_args(argv)

    cfg = QUICK if args.quick else FULL
    repeats = cfg["repeats"] if args.repeats is None else args.repeats
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    save = out is not None and not args.no_save and not args.skip_tests
    if save and not run_tests():
        print("tests fail: no result recorded. Fix them, or pass --no-save to only print timings.")
        return 1

    info = machine(device)
    idle = ForeignLoad().start()
    time.sleep(0.5)
    before = idle.stop()
    print(
        f"vtc {vtc.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{info['device_name']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch threads "
        f"(OMP_NUM_THREADS={info['omp_num_threads_env']})"
    )
    if before is not None and before > 5:
        print(f"warning: other processes use {before:.0f}% of the CPU right now; timings will be noisy")

    load = ForeignLoad().start()
    started = time.perf_counter()
    selection = bench_selection(cfg, device, repeats, cfg["warmup"])
    print_selection(selection, device, repeats)
    prefill = bench_prefill(cfg, device, repeats, cfg["warmup"])
    print_prefill(prefill, device, repeats)
    foreign = load.stop()
    elapsed = time.perf_counter() - started
    print(
        f"\nother processes' CPU use during the run: "
        f"{'unknown' if foreign is None else f'{foreign:.1f}% of the machine'}; took {elapsed:.1f} s"
    )
    if foreign is not None and foreign > 5:
        print("warning: the machine was not idle; rerun with nothing else running before trusting these numbers")

    row = {
        "benchmark": "selection",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "versions": {"vtc": vtc.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "git": git_state(),
        "tests": "passed" if save else "not run",
        "quick": args.quick,
        "repeats": repeats,
        "warmup": cfg["warmup"],
        "other_cpu_percent_before": before,
        "other_cpu_percent_during": foreign,
        "seconds": elapsed,
        "selection": selection,
        "prefill": prefill,
    }
    if save:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"appended one row to {out}")
    else:
        print("not saved (--quick, --no-save or --skip-tests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
