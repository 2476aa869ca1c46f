"""The label job at scale with the zero-cost box-fill model: throughput, driver CPU, memory and
object store over the run, exactly-once check of every committed file, and a driver SIGKILL +
rerun (benchmark, not a test).

    python -m bench.label_scale run --shards 1000 --per-shard 1000 --out bench/results/label_1m.json
    python -m bench.label_scale run --shards 1000 --per-shard 1000 --kill-at 0.5 --out ...kill.json
    python -m bench.label_scale run --shards 100 --per-shard 1000 --s3 --out bench/results/label_100k_s3.json
    python -m bench.label_scale listing --committed 1000,10000,100000 --out bench/results/listing.json

Inputs: ``--distinct`` shards of 128x96 JPEGs with 3 labelled boxes each (the synthetic shapes),
hard-linked (local) or copied (S3) under ``--shards`` names. ``run`` labels them in this process
(the driver is this process: its CPU time is ``getrusage(RUSAGE_SELF)``); with ``--kill-at F``
the first run is the CLI in a child process, SIGKILLed once F of the shards are committed, and
the rerun happens here. ``listing`` times start-up work against committed-shard counts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from bench.benchlib import cpu_model


class Sampler:
    """Every ``interval_s``: the driver's RSS, all Ray worker processes' RSS, /dev/shm (the object
    store's memory) and the committed image count."""

    def __init__(self, interval_s: float = 5.0, committed_dir: str | None = None, per_shard: int = 0) -> None:
        import psutil

        self.psutil, self.interval_s, self.rows = psutil, interval_s, []
        self.committed_dir, self.per_shard = committed_dir, per_shard
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.time()

    def _sample(self) -> dict:
        me = self.psutil.Process()
        workers = 0
        for p in self.psutil.process_iter(["name", "cmdline", "memory_info"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if p.pid != me.pid and (cmd.startswith("ray::") or "default_worker.py" in cmd):
                    mem = p.info["memory_info"]
                    workers += mem.rss - mem.shared  # private memory: shared libraries and plasma counted once
            except (self.psutil.Error, TypeError):
                continue
        cpu = me.cpu_times()
        committed = None
        if self.committed_dir and os.path.isdir(self.committed_dir):
            committed = len(os.listdir(self.committed_dir)) * self.per_shard
        return {
            "t_s": round(time.time() - self.t0, 1),
            "driver_rss_mib": round(me.memory_info().rss / 2**20, 1),
            "workers_private_mib": round(workers / 2**20, 1),
            "driver_cpu_s": round(cpu.user + cpu.system, 2),
            "shm_used_mib": round(shutil.disk_usage("/dev/shm").used / 2**20, 1),
            "images_committed": committed,
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.rows.append(self._sample())

    def __enter__(self) -> Sampler:
        self.rows.append(self._sample())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.rows.append(self._sample())

    def summary(self) -> dict:
        out = {}
        for k in ("driver_rss_mib", "workers_private_mib", "shm_used_mib"):
            values = [r[k] for r in self.rows]
            n = max(1, len(values) // 4)
            out[k] = {"first_quarter_max": max(values[:n]), "last_quarter_max": max(values[-n:]), "max": max(values)}
        done = [r for r in self.rows if r["images_committed"]]
        if len(done) >= 4:  # the middle half of the run: no start-up, no tail
            total = done[-1]["images_committed"]
            a = next(r for r in done if r["images_committed"] >= 0.25 * total)
            z = next(r for r in done if r["images_committed"] >= 0.75 * total)
            if z["images_committed"] > a["images_committed"]:
                images = z["images_committed"] - a["images_committed"]
                cpu_ms = 1000 * (z["driver_cpu_s"] - a["driver_cpu_s"])
                out["steady"] = {
                    "images_per_s": round(images / (z["t_s"] - a["t_s"]), 1),
                    "driver_cpu_ms_per_image": round(cpu_ms / images, 4),
                }
        return out


def make_inputs(root: str, *, shards: int, per_shard: int, distinct: int, s3: str | None) -> str:
    """``shards`` shard names over ``distinct`` generated shards; returns the input location."""
    from ovsam_ray.data.synthetic import generate_shards

    gen = os.path.join(root, "distinct")
    urls = generate_shards(
        gen,
        num_images=distinct * per_shard,
        images_per_shard=per_shard,
        seed=0,
        image_size=(128, 96),
        min_objects=3,
        max_objects=3,
    )
    if s3:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3})
        for i in range(shards):
            fs.put_file(urls[i % distinct], f"bench/shards/shard-{i:06d}.tar")
        return "s3://bench/shards/"
    src = os.path.join(root, "shards")
    os.makedirs(src)
    for i in range(shards):
        os.link(urls[i % distinct], os.path.join(src, f"shard-{i:06d}.tar"))
    return src


def verify(output: str, images: int, s3: str | None) -> dict:
    """Read every committed file: one row per (shard, key), all ok, ``images`` rows."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    from ovsam_ray import storage
    from ovsam_ray.labels.committer import ShardCommitter

    committer = ShardCommitter(output, s3_endpoint=s3)
    fs, _ = storage.get_filesystem(output, s3_endpoint=s3)
    paths = [storage.get_filesystem(u, s3_endpoint=s3)[1] for u in committer.committed_parquet_urls()]
    table = pds.dataset(paths, format="parquet", filesystem=fs).to_table(columns=["shard", "key", "status"])
    ids = pc.binary_join_element_wise(table["shard"], table["key"], "/")
    return {
        "rows": table.num_rows,
        "expected": images,
        "unique": len(pc.unique(ids)),
        "ok": int(pc.sum(pc.equal(table["status"], "ok")).as_py()),
        "files": len(paths),
        "exactly_once": table.num_rows == images == len(pc.unique(ids)),
    }


def _kill_cli_at(src: str, out: str, fraction: float, total: int, args: argparse.Namespace, s3: str | None) -> dict:
    from ovsam_ray.labels.committer import ShardCommitter

    cmd = [
        sys.executable,
        "-m",
        "ovsam_ray.cli",
        "label",
        "--input",
        src,
        "--output",
        out,
        "--baseline",
        "box-fill",
        "--vocab",
        args.vocab,
        "--batch-size",
        str(args.batch_size),
        "--ray-address",
        "local",
    ]
    if s3:
        cmd += ["--s3-endpoint", s3]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    committer = ShardCommitter(out, s3_endpoint=s3)
    t0 = time.time()
    while proc.poll() is None and len(committer.committed_shards()) < fraction * total:
        time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(2.0)
    before = {n: committer.read_marker(n)["committed_at"] for n in committer.committed_shards()}
    return {"killed_after_s": round(time.time() - t0, 1), "committed_before_kill": len(before), "markers": before}


def run(args: argparse.Namespace) -> dict:
    import ray

    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.labels.committer import ShardCommitter
    from ovsam_ray.pipeline.label_job import LabelConfig, run_label

    root = tempfile.mkdtemp(prefix="ovsam_scale_", dir=args.work)
    s3 = _start_s3() if args.s3 else None
    result: dict = {
        "shards": args.shards,
        "per_shard": args.per_shard,
        "images": args.shards * args.per_shard,
        "storage": "s3 (moto server, 127.0.0.1)" if s3 else "local disk",
    }
    try:
        t0 = time.time()
        src = make_inputs(root, shards=args.shards, per_shard=args.per_shard, distinct=args.distinct, s3=s3)
        out = "s3://bench/labels" if s3 else os.path.join(root, "labels")
        result["inputs_s"] = round(time.time() - t0, 1)
        if args.kill_at:
            result["kill"] = _kill_cli_at(src, out, args.kill_at, args.shards, args, s3)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        cfg = LabelConfig(
            input=src,
            output=out,
            baseline="box-fill",
            batch_size=args.batch_size,
            decode_chunk=args.decode_chunk,
            progress_interval_s=30.0,
            model=ModelConfig(random_init=True, vocab=args.vocab, s3_endpoint=s3),
        )
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        committed_dir = None if s3 else os.path.join(out, "_committed")
        with Sampler(args.sample_s, committed_dir, args.per_shard) as sampler:
            summary = run_label(cfg)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        driver_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        result.update(
            {
                "wall_s": round(summary.wall_time_s, 1),
                "images_labelled": summary.images,
                "images_per_s": round(summary.images_per_s, 1),
                "driver_cpu_s": round(driver_cpu, 2),
                "driver_cpu_ms_per_image": round(1000 * driver_cpu / max(summary.images, 1), 4),
                "driver_parts": summary.driver_parts,
                "shards_committed": summary.shards_committed,
                "shards_skipped": summary.shards_skipped,
                "shards_failed": len(summary.shards_failed),
                "memory": sampler.summary(),
                "samples": sampler.rows,
            }
        )
        result["verify"] = verify(out, args.shards * args.per_shard, s3)
        if args.kill_at:
            committer = ShardCommitter(out, s3_endpoint=s3)
            before = result["kill"].pop("markers")
            result["kill"]["recomputed_after_rerun"] = sum(
                committer.read_marker(n)["committed_at"] != t for n, t in before.items()
            )
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _start_s3() -> str:
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return endpoint


def _committed_output(src: str, out: str, n: int, s3: str | None, args: argparse.Namespace) -> None:
    """A real run on one shard, then ``n`` more shards that look committed: input tars (empty:
    never read), Parquet files, markers, per-shard statistics and a run ``_stats.json`` that counts them."""
    import json as _json

    from ovsam_ray import storage
    from ovsam_ray.data.synthetic import generate_shards
    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.pipeline.label_job import LabelConfig, run_label
    from ovsam_ray.pipeline.stats import merge_stats

    generate_shards(src, num_images=2, images_per_shard=2, seed=0, image_size=(32, 24), s3_endpoint=s3)
    run_label(
        LabelConfig(
            input=src,
            output=out,
            baseline="box-fill",
            model=ModelConfig(random_init=True, vocab=args.vocab, s3_endpoint=s3),
        )
    )
    one = _json.loads(storage.read_bytes(storage.join(out, "_stats", "shard-000000.json"), s3_endpoint=s3))
    fs, _ = storage.get_filesystem(out, s3_endpoint=s3)
    payloads = {}
    for i in range(1, n + 1):
        name = f"shard-{i:06d}"
        payloads[storage.join(src, f"{name}.tar")] = b""
        payloads[storage.join(out, f"{name}.parquet")] = b"PAR1"
        payloads[storage.join(out, "_committed", f"{name}.json")] = b"{}"
        payloads[storage.join(out, "_stats", f"{name}.json")] = _json.dumps(one).encode()
    paths = {storage.get_filesystem(u, s3_endpoint=s3)[1]: data for u, data in payloads.items()}
    if s3:
        fs.pipe(paths)  # batched PUTs
    else:
        for path, data in paths.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
    stats = merge_stats([one] * (n + 1))
    storage.atomic_write_bytes(storage.join(out, "_stats.json"), _json.dumps(stats).encode(), s3_endpoint=s3)


def listing(args: argparse.Namespace) -> dict:
    """The start-up and finish of a label run whose shards are all committed (listing the input,
    the run record check, clean-up, the committed listing and skip, the run statistics), against
    the number of committed shards."""
    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.pipeline.label_job import LabelConfig, run_label

    rows = []
    s3 = _start_s3() if args.s3 else None
    for n in [int(x) for x in args.committed.split(",")]:
        root = tempfile.mkdtemp(prefix="ovsam_listing_", dir=args.work)
        try:
            src = f"s3://bench/l{n}/shards" if s3 else os.path.join(root, "shards")
            out = f"s3://bench/l{n}/labels" if s3 else os.path.join(root, "labels")
            t0 = time.perf_counter()
            _committed_output(src, out, n, s3, args)
            made = time.perf_counter() - t0
            t0 = time.perf_counter()
            summary = run_label(
                LabelConfig(
                    input=src,
                    output=out,
                    baseline="box-fill",
                    model=ModelConfig(random_init=True, vocab=args.vocab, s3_endpoint=s3),
                )
            )
            rows.append(
                {
                    "committed": n + 1,
                    "skipped": summary.shards_skipped,
                    "start_to_end_s": round(time.perf_counter() - t0, 3),
                    "setup_s": round(made, 1),
                }
            )
            print(rows[-1], flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return {"storage": "s3 (moto server, 127.0.0.1)" if s3 else "local disk", "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--shards", type=int, default=16)
    r.add_argument("--per-shard", type=int, default=500)
    r.add_argument("--distinct", type=int, default=4, help="shards actually generated (then linked/copied)")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--decode-chunk", type=int, help="images per decoded block (default: the job's)")
    r.add_argument("--kill-at", type=float, help="SIGKILL a first run's driver at this fraction of committed shards")
    r.add_argument("--s3", action="store_true", help="input and output on a local S3-compatible server")
    r.add_argument("--sample-s", type=float, default=5.0)
    l_ = sub.add_parser("listing")
    l_.add_argument("--committed", default="1000,10000,100000")
    l_.add_argument("--s3", action="store_true", help="on a local S3-compatible server")
    for q in (r, l_):
        q.add_argument("--work", default=None, help="scratch folder (default: the system temp folder)")
        q.add_argument("--out", required=True)
    args = p.parse_args()
    from ovsam_ray.data.synthetic import shape_vocabulary_names

    args.vocab = os.path.join(tempfile.mkdtemp(), "shapes.txt")
    with open(args.vocab, "w") as f:
        f.write("\n".join(shape_vocabulary_names()))
    result = {
        "benchmark": f"label_scale {args.cmd}",
        "date": dt.date.today().isoformat(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "command": " ".join(sys.argv),
        **(run(args) if args.cmd == "run" else listing(args)),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    shown = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(shown, indent=1))


if __name__ == "__main__":
    main()
