"""``vtc eval`` (or ``python -m vtc.eval``): accuracy, visual tokens, latency and memory of vtc methods on a VQA task.

    vtc eval --model shapes-llava --methods none,fastervlm,divprune,dart,random \\
        --keep 256,128,64,32,16 --task shapes --limit 500 --output results/shapes-llava

--model is the shipped organism (shapes-llava), a local directory or a hub id. --methods are vtc
method names (``python -c "import vtc; print(vtc.list_methods())"``), "none" for the uncompressed model, options
after colons (``fastervlm:signal=attention_received``). --task is shapes or moving_shapes (generated, offline;
moving_shapes asks about videos: Qwen2-VL, Qwen2.5-VL and Qwen3-VL only) or a standard
benchmark read from --data: gqa, vqav2, textvqa, pope, mme, scienceqa, mmbench. The output directory receives
samples.jsonl (one record per sample and setting), summary.json, summary.csv and accuracy_vs_tokens.png.
Data-parallel: ``accelerate launch --num_processes N -m vtc.eval ...`` (results are gathered on the main process).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from vtc import extras, loading
from vtc.adapters.llava_next import BUDGETS
from vtc.api import POSITIONS
from vtc.method_spec import split_specs


def build_parser(prog: str = "python -m vtc.eval") -> argparse.ArgumentParser:
    """The options of ``python -m vtc.eval`` / ``vtc eval``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2]
    )
    parser.add_argument("--model", required=True, help="shapes-llava, a local dir or a hub id")
    parser.add_argument(
        "--methods",
        default="none,fastervlm,divprune,dart,random",
        help="comma-separated method names, none for the uncompressed model, options after colons "
        "(fastervlm:signal=attention_received)",
    )
    parser.add_argument("--keep", default="64", help="comma-separated visual tokens kept per image")
    parser.add_argument(
        "--task",
        default="shapes",
        help="shapes, moving_shapes (videos), gqa, vqav2, textvqa, pope, mme, scienceqa, mmbench",
    )
    parser.add_argument(
        "--data", help="the benchmark's local data (parquet file/dir or .jsonl); shapes, moving_shapes: the split"
    )
    parser.add_argument("--limit", type=int, help="evaluate the first N questions only")
    parser.add_argument("--output", required=True, help="directory for the result files")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate() call (default 16)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the task's")
    parser.add_argument(
        "--budget",
        help="how keep is shared by an image's parts: LLaVA-NeXT's and OneVision's crops (global, per_crop, "
        "thumbnail), InternVL's tiles (global, per_crop)",
    )
    parser.add_argument(
        "--positions",
        default="original",
        help="position ids of the kept tokens: original (default: dropping equals masking) or compact (numbered as "
        "if the dropped tokens had never been there, as the reference repositories and vLLM do; LLaVA families)",
    )
    parser.add_argument("--device", help="default: this process's accelerator (cuda:N under accelerate) or cpu")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, ...")
    return parser


def parse_args(argv: list[str] | None, prog: str = "python -m vtc.eval") -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        args.keeps = [int(k) for k in args.keep.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--keep takes comma-separated integers, got {args.keep!r}")
    if any(k < 1 for k in args.keeps):
        parser.error(f"--keep values must be >= 1, got {args.keeps}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.budget is not None and args.budget not in BUDGETS:
        parser.error(f"--budget must be one of {', '.join(BUDGETS)}, got {args.budget!r}")
    if args.positions not in POSITIONS:
        parser.error(f"--positions must be one of {', '.join(POSITIONS)}, got {args.positions!r}")
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
            parser.error(f"--dtype must be auto or a floating dtype (float32, bfloat16, float16), got {args.dtype!r}")
    if args.device is not None:
        try:
            loading.available_device(args.device)
        except ValueError as error:
            parser.error(str(error))
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        parser.error(f"--output {args.output!r} is a file, not a directory")
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--output {args.output!r}: cannot create a directory under {str(existing)!r}")
    args.method_specs = split_specs(args.methods)
    if not args.method_specs:
        parser.error("--methods names no method")
    return args


class _Processes:
    """This process's rank among ``accelerate launch`` processes (one process without it)."""

    def __init__(self) -> None:
        import os

        self.state = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            extras.require("eval", "accelerate", needed_by="running on several processes")
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available())  # gloo between CPU processes
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if self.state is not None:
            return self.state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def close(self) -> None:
        """Leave the process group together, once the main process has written the results. A process that
        exits while the group lives on (gloo's threads, the main process's store still serving) can die in
        C++ teardown ("terminate called without an active exception") and fail the launch after good work."""
        if self.state is None:
            return
        self.state.wait_for_everyone()
        torch.distributed.destroy_process_group()

    def gather(self, items: list) -> list:
        if self.state is None:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)


def main(argv: list[str] | None = None, prog: str = "python -m vtc.eval") -> int:
    args = parse_args(argv, prog)
    # Everything that can be wrong with the request fails here, before a model is loaded.
    try:
        extras.require("eval", "tqdm", "matplotlib", needed_by=prog)
        from vtc.eval import report, runner
        from vtc.eval.tasks import get_task

        task = get_task(args.task)
        plan = runner.settings(args.method_specs, args.keeps)
        samples = task.samples(args.data, args.limit)
        if any(sample.video is not None for sample in samples):
            runner.check_video_model(task, args.model)
    except (ValueError, FileNotFoundError, extras.MissingExtra) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not samples:
        print(f"error: {args.task} has no samples in {args.data!r}", file=sys.stderr)
        return 2
    try:
        processes = _Processes()
    except extras.MissingExtra as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device) if args.device else processes.device()

    try:
        model, processor = loading.load(args.model, device=device, dtype=args.dtype)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:  # now, not after the whole run; every process, so that all of them stop alike
        Path(args.output).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"error: --output {args.output!r}: {error}", file=sys.stderr)
        return 2
    mine = [(i, s) for i, s in enumerate(samples) if i % processes.world == processes.rank]
    if processes.main:
        count = f"{len(samples)} questions x {len(plan)} settings"
        print(f"{args.model} on {args.task}: {count}, {processes.world} process(es)")

    summaries, all_records, skipped = [], [], []
    for setting in plan:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"{setting.name} keep={setting.keep}", disable=not processes.main)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            records = runner.run_setting(
                model,
                processor,
                task,
                mine,
                setting,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                budget=args.budget,
                positions=args.positions,
                progress=bar,
                worker=processes.rank,
            )
            error = None
        except ValueError as exc:  # e.g. a [CLS] method on a tower without [CLS], or keep above the image's tokens
            records, error = [], str(exc)
        bar.close()
        peak = max(processes.gather([runner.peak_memory_mb(device)]))
        errors = [e for e in processes.gather([error]) if e]
        gathered = processes.gather(records)
        if errors:
            skipped.append({"method": setting.name, "keep": setting.keep, "reason": errors[0]})
            if processes.main:
                print(f"skipped {setting.name} keep={setting.keep}: {errors[0]}")
            continue
        gathered.sort(key=lambda r: r["index"])
        indices = [r["index"] for r in gathered]
        if indices != list(range(len(samples))):
            raise RuntimeError(f"gathered {len(indices)} records for {len(samples)} samples: not exactly once each")
        summary = {"task": task.name, **runner.summarize_setting(task, setting, gathered, peak)}
        summaries.append(summary)
        all_records.extend(gathered)
        if processes.main:
            print(
                f"  {setting.name:<12} keep={str(setting.keep):<5} tokens={summary['visual_tokens_last_layer']:6.1f}"
                f"  accuracy={summary['accuracy']:.4f}  prefill/sample={summary['prefill_ms_per_sample']:.1f} ms"
            )
    if processes.main:
        header = {
            "model": args.model,
            "task": task.name,
            "data": args.data,
            "limit": args.limit,
            "questions": len(samples),
            "processes": processes.world,
            "batch_size": args.batch_size,
            "budget": args.budget,
            "positions": args.positions,
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype),
            "environment": _environment(device),
            "skipped": skipped,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        paths = report.write(Path(args.output), header, summaries, all_records)
        print("wrote " + ", ".join(str(p) for p in paths))
    processes.close()
    return 0


def _environment(device: torch.device) -> dict:
    import transformers

    import vtc

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device_name": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vtc": vtc.__version__ if hasattr(vtc, "__version__") else "",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    sys.exit(main())
