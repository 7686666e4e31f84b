"""Peak memory and time of converting a ~1B-parameter random Llama (CPU, fp32): HF -> Megatron -> HF.

Each step runs in a fresh child process that reports its own whole-process peak RSS (ru_maxrss); the
target is a peak below 1.3x the checkpoint's size on disk. Forked helper processes (megatron-core's async
dist-checkpoint writer forks some; the converters' synchronous writer does not) are reported separately.

    python bench/convert.py [--work /tmp/nemotune-bench] [--layers 16] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("write", "hf-to-megatron", "megatron-to-hf", "verify-bit-exact")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child(step: str, work: Path, layers: int) -> dict:
    """Run one step in this process; return its peak RSS (bytes) and time."""
    start = time.perf_counter()
    hf, meg, back = work / "hf", work / "megatron", work / "hf-back"
    if step == "write":
        from nemotune.converters.tiny_model import write_tiny_llama

        write_tiny_llama(hf, seed=0, num_layers=layers, hidden=2048, heads=16, kv_heads=4, ffn=5632, vocab=32000,
                         max_shard_size="500MB", copy_tokenizer=False)
    elif step == "hf-to-megatron":
        from nemotune.converters.checkpoint import hf_to_megatron

        hf_to_megatron(hf, meg, overwrite=True, progress=False)
    elif step == "megatron-to-hf":
        from nemotune.converters.checkpoint import megatron_to_hf

        megatron_to_hf(meg, back, max_shard_size="500MB", overwrite=True, progress=False)
    elif step == "verify-bit-exact":
        from safetensors import safe_open

        from nemotune.converters.formats.checkpoint import hf_weight_map

        original, converted = hf_weight_map(hf), hf_weight_map(back)
        assert original.keys() == converted.keys()
        for name in original:
            with safe_open(str(original[name]), "pt") as a, safe_open(str(converted[name]), "pt") as b:
                if not a.get_tensor(name).equal(b.get_tensor(name)):
                    raise SystemExit(f"not bit-exact: {name}")
    seconds = time.perf_counter() - start
    return {
        "step": step,
        "seconds": round(seconds, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "children_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/nemotune-bench-convert", help="scratch dir (~14 GB for 16 layers)")
    parser.add_argument("--layers", type=int, default=16, help="16 layers, hidden 2048 ~ 1.1B parameters")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work)
    if args.child:
        print("BENCH " + json.dumps(child(args.child, work, args.layers)), flush=True)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for step in STEPS:
        if step == "write" and (work / "hf" / "config.json").is_file():
            continue
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--layers",
                               str(args.layers), "--child", step], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(line[0][6:]))
    size = _dir_bytes(work / "hf")
    print(f"checkpoint on disk: {size / 2**30:.2f} GiB ({size / 4 / 1e9:.2f} B fp32 parameters)")
    worst = 0.0
    for r in results:
        ratio = r["peak_rss_bytes"] / size
        if r["step"] in ("hf-to-megatron", "megatron-to-hf"):
            worst = max(worst, ratio)
        print(f"{r['step']:>18}: {r['seconds']:7.1f} s  peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB "
              f"({ratio:.2f}x disk)  forked writers' peak {r['children_peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"worst conversion peak / size on disk = {worst:.2f}x (target < 1.3x): {'OK' if worst < 1.3 else 'OVER'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if worst < 1.3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
