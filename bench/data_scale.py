"""How the data path scales: synthetic sets of growing size, tiny backbones, one CPU process.

    python bench/data_scale.py [--sizes 2000 10000 50000] [--out bench/results/data_scale.json]

For each size, ``vqadapt data synth --n N --extra_test 0`` (cached under
``bench/results/data-scale/``), then one child process trains the frozen baseline for one epoch
on it from an empty feature cache (the embedded tiny backbones; evaluation on up to ``--eval``
questions) and reports:

- peak RSS of that process (``ru_maxrss``: cache build, training and evaluation), and of its
  largest child (a decoding worker, when there is one);
- cache build seconds (all of ``build_data``), per 1,000 images;
- bytes on disk per image (vision features) and per cached value (every cache);
- the epoch's seconds (training and validation) and training samples/s (``metrics.jsonl``).

Then prints the table and the per-image / per-question figures the README's projection to
real shapes uses (``project``), and measures what those projections need from this machine:
decoding a COCO-size JPEG, and writing to the cache's disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vqadapt.io import atomic_write_json

RESULTS = Path(os.environ.get("VQADAPT_BENCH_RESULTS", "bench/results"))

# Real shapes (random-init backbones of issue 13): DINOv2-base at 224 px, BARTpho-syllable.
REAL_VISION_TOKENS, REAL_VISION_HIDDEN = 257, 768
REAL_TEXT_DMODEL = 1024
REAL_VISION_GFLOP = 2 * 86.6e6 * 257 / 1e9 + 12 * 4 * 257**2 * 768 / 1e9  # per image, forward
DATASETS = {
    # name: (images, questions, tokens per question)
    "ViVQA": (10_328, 15_000, 12),
    "OpenViVQA": (11_000, 37_000, 13),
    "COCO-size (VQAv2-like)": (123_287, 658_000, 12),
}


def synth(n: int) -> Path:
    folder = (RESULTS / "data-scale" / f"shapes-n{n}").resolve()
    if not (folder / "test.csv").is_file():
        argv = ["data", "synth", "--out", str(folder), "--n", str(n), "--extra_test", "0"]
        subprocess.run(
            [sys.executable, "-m", "vqadapt", *argv],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return folder


def child(args) -> None:
    """One epoch of the frozen baseline on ``args.data`` (runs inside a child process)."""
    import vqadapt.train as train_module
    from vqadapt import embedded
    from vqadapt.config import parse_run_config

    if args.backbones:
        tiny = {"vision": args.backbones[0], "text": args.backbones[1]}
    else:
        tiny = embedded.ensure_tiny_backbones(log=lambda _: None)
    out = Path(tempfile.mkdtemp(prefix="data-scale-run-"))
    flags = ["--train_file", str(args.data / "train.csv"), "--test_file"]
    flags += [str(args.data / "test.csv"), "--image_root", str(args.data / "images")]
    flags += ["--vision_model", str(tiny["vision"]), "--text_model", str(tiny["text"])]
    flags += ["--epochs", "1", "--output_dir", str(out), "--no_progress"]
    flags += ["--max_eval_samples", str(args.eval)]
    config = parse_run_config(flags)
    timing = {}
    real_build_data = train_module.build_data

    def timed_build_data(*a, **k):
        started = time.perf_counter()
        data = real_build_data(*a, **k)
        timing["build_data_s"] = time.perf_counter() - started
        timing["data"] = data
        return data

    train_module.build_data = timed_build_data
    started = time.perf_counter()
    train_module.train(config, log=lambda _: None)
    wall = time.perf_counter() - started
    data = timing.pop("data")
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    images = len(data.images.paths)
    result = {
        "questions": sum(len(e) for e in data.encoded.values()),
        "train_questions": len(data.encoded["train"]),
        "images": images,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_child_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "build_s": timing["build_data_s"],
        "build_s_per_1000_images": 1000 * timing["build_data_s"] / images,
        "epoch_s": metrics["seconds"],
        "samples_per_s": metrics["samples_per_s"],
        "wall_s": wall,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
    }
    if hasattr(data.features, "readers"):  # sharded caches (not in the code before them)
        readers = data.features.readers()
        disk = {
            r.spec.folder.name: sum(f.stat().st_size for f in r.spec.folder.glob("*.safetensors"))
            for r in readers
        }
        result["vision_bytes_per_image"] = (
            disk[data.features.vision_features.spec.folder.name] / images
        )
        result["bytes_per_value"] = sum(disk.values()) / sum(r.spec.values for r in readers)
        result["cache_bytes"] = sum(disk.values())
    shutil.rmtree(out, ignore_errors=True)  # the run folder: only its metrics were wanted
    print("RESULT " + json.dumps(result))


def measure(n: int, eval_n: int, backbones: list[str] | None) -> dict:
    from vqadapt.embedded import cache_root

    data = synth(n)
    fresh = Path(tempfile.mkdtemp(prefix="data-scale-cache-"))
    for shared in ("data", "backbones"):  # an empty feature cache: the run builds it
        if (cache_root() / shared).is_dir():
            target = (cache_root() / shared).resolve()
            (fresh / shared).symlink_to(target, target_is_directory=True)
    command = [sys.executable, __file__, "--child", str(data), "--eval", str(eval_n)]
    if backbones:
        command += ["--backbones", *backbones]
    env = {**os.environ, "VQADAPT_CACHE": str(fresh)}
    try:
        done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)  # the feature caches it built (GBs at scale)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return {"n": n, **json.loads(line[len("RESULT ") :])}


def jpeg_decode_ms(repeats: int = 40) -> float:
    """Decode + resize (shortest edge 256) + centre crop 224 of a 640x480 JPEG, one core."""
    import numpy as np
    from PIL import Image

    from vqadapt.backbones import ImagePreprocessing
    from vqadapt.data.stream import prepare_crop

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 640)[None, :, None] * np.ones((480, 1, 3))
    pixels = np.clip(ramp + rng.normal(0, 20, (480, 640, 3)), 0, 255).astype(np.uint8)
    path = Path(tempfile.mkdtemp()) / "coco-like.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    prep = ImagePreprocessing(256, 224, (0.5,) * 3, (0.5,) * 3)
    prepare_crop(path, prep)
    started = time.perf_counter()
    for _ in range(repeats):
        prepare_crop(path, prep)
    return 1000 * (time.perf_counter() - started) / repeats


def disk_write_mb_s(size_mb: int) -> float:
    """Sequential write + fsync into the cache folder's file system."""
    from vqadapt.embedded import cache_root

    block = os.urandom(1 << 20)
    path = cache_root() / f".disk-probe-{os.getpid()}"
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size_mb):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return size_mb / seconds


def checksum_mb_s(size_mb: int) -> float:
    """sha256 throughput (each shard's checksum is computed as it is written)."""
    import hashlib

    data = os.urandom(size_mb << 20)
    started = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return size_mb / (time.perf_counter() - started)


def project(
    rows: list[dict], decode_ms: float, write_mb_s: float, hash_mb_s: float, cores: int
) -> list[dict]:
    """Real-shape figures from the measured per-value and per-question ones."""
    bytes_per_value = max(row["bytes_per_value"] for row in rows)
    first, last = rows[0], rows[-1]
    ram_per_question = (
        (last["peak_rss_mb"] - first["peak_rss_mb"])
        * 2**20
        / (last["questions"] - first["questions"])
    )
    out = []
    for name, (images, questions, tokens) in DATASETS.items():
        vision = images * REAL_VISION_TOKENS * REAL_VISION_HIDDEN * bytes_per_value
        text = questions * tokens * REAL_TEXT_DMODEL * bytes_per_value
        decode_s = images * decode_ms / 1000 / cores
        write_s = (vision + text) / 1e6 / write_mb_s
        hash_s = (vision + text) / 1e6 / hash_mb_s
        out.append(
            {
                "dataset": name,
                "images": images,
                "questions": questions,
                "vision_cache_gb": vision / 1e9,
                "text_cache_gb": text / 1e9,
                "old_ram_gb": images
                * (REAL_VISION_TOKENS * REAL_VISION_HIDDEN * 4 + 224 * 224 * 3)
                / 1e9,
                "data_ram_mb": questions * ram_per_question / 2**20,
                "decode_s": decode_s,
                "write_s": write_s,
                "checksum_s": hash_s,
                "vision_tflop": images * REAL_VISION_GFLOP / 1e3,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000])
    parser.add_argument("--eval", type=int, default=1000, help="questions per evaluated split")
    parser.add_argument("--cores", type=int, default=16, help="decoding cores of the GPU machine")
    parser.add_argument("--out", default=str(RESULTS / "data_scale.json"))
    parser.add_argument(
        "--no_projection", action="store_true", help="only the table (no JPEG / disk probes)"
    )
    parser.add_argument("--probe_mb", type=int, default=256, help="MB written / hashed to time")
    parser.add_argument(
        "--backbones", nargs=2, metavar=("VISION", "TEXT"), help="default: the embedded tiny ones"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.data = args.child
        child(args)
        return

    from vqadapt import embedded

    if not args.backbones:
        embedded.ensure_tiny_backbones()
    rows = []
    for n in args.sizes:
        rows.append(measure(n, args.eval, args.backbones))
        print(f"  measured {n} questions", flush=True)
    header = (
        f"{'set':>8}{'in run':>8}{'images':>8}{'peak RSS MB':>13}{'build s/1k img':>16}"
        f"{'B/image':>10}{'B/value':>9}{'epoch s':>9}{'samples/s':>11}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['n']:>8,}{row['questions']:>8,}{row['images']:>8,}{row['peak_rss_mb']:>13.0f}"
            f"{row['build_s_per_1000_images']:>16.2f}{row.get('vision_bytes_per_image', 0):>10,.0f}"
            f"{row.get('bytes_per_value', 0):>9.4f}{row['epoch_s']:>9.1f}{row['samples_per_s']:>11.0f}"
        )
    if len(rows) > 1:
        print(
            f"peak RSS, largest set / smallest: {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}x"
        )
    if "bytes_per_value" not in rows[0] or args.no_projection:
        print(f"\nwritten: {atomic_write_json(args.out, {'rows': rows})}")
        return
    decode = jpeg_decode_ms()
    write, digest = disk_write_mb_s(args.probe_mb), checksum_mb_s(args.probe_mb)
    projections = project(rows, decode, write, digest, args.cores)
    print(f"\nCOCO-size JPEG decode + resize + crop: {decode:.2f} ms per image per core")
    print(f"disk write (sequential, fsync): {write:,.0f} MB/s; sha256: {digest:,.0f} MB/s")
    for row in projections:
        print(
            f"{row['dataset']:<24} vision {row['vision_cache_gb']:.1f} GB, text {row['text_cache_gb']:.2f} GB"
            f", today's RAM {row['old_ram_gb']:.1f} GB, data RAM {row['data_ram_mb']:.0f} MB, "
            f"decode {row['decode_s']:.0f} s on {args.cores} cores, write {row['write_s']:.0f} s, "
            f"sha256 {row['checksum_s']:.0f} s, {row['vision_tflop']:.0f} TFLOP"
        )
    result = {
        "machine": {"cpus": os.cpu_count()},
        "rows": rows,
        "jpeg_decode_ms": decode,
        "disk_write_mb_s": write,
        "sha256_mb_s": digest,
        "projections": projections,
    }
    print(f"\nwritten: {atomic_write_json(args.out, result)}")


if __name__ == "__main__":
    main()
