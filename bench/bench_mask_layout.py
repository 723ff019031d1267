"""How should a CPU-only daemon lay out its threads around a rembg mask? Measured with the pipeline's own
functions (decode, RembgMaskEngine.predict, refine_mask, cleanup, encode), no daemon.

Each layout runs the same images through three stages joined by queues: `prepare` threads decode, `lanes`
threads each run one mask at a time on ONE shared engine (its ONNX Runtime session has `intra` threads),
`finish` threads refine, clean up and encode a transparent PNG. The daemon today is lanes=1 (one device
worker) with prepare=finish=2; `lanes=2, intra=1` is two masks at once, each on one core.

    python bench/bench_mask_layout.py [--model tiny|u2net] [--count 24] [--rounds 2]

Prints images/s, CPU time an image (all threads; spinning counts) and the process's peak RSS so far for
each layout, in rounds that each start with another layout (the machine is shared: compare within a
round). Not a timed test.
"""

from __future__ import annotations

import argparse
import os
import queue
import resource
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# (label, prepare threads, mask lanes, intra-op threads a lane, spinning, OpenCV threads or 0 for its
# default, nice of the prepare and finish threads: above 0 they yield the cores to the mask first)
LAYOUTS = (
    ("before: 1 lane, intra 2, spinning", 2, 1, 2, True, 0, 0),
    ("1 lane, intra 2, no spinning", 2, 1, 2, False, 0, 0),
    ("1 lane, intra 2, pools at nice 10", 2, 1, 2, False, 0, 10),
    ("2 lanes, intra 1 each", 2, 2, 1, False, 0, 0),
    ("2 lanes, intra 1 each, cv2 1 thread", 2, 2, 1, False, 1, 0),
)


def run_layout(paths: list[Path], model: str, prepare: int, lanes: int, intra: int, spinning: bool,
               finish: int, nice: int = 0) -> float:
    from bgwatch.jobs import JobSpec, MaskSpec
    from bgwatch.pipeline import cleanup, imageio, masking, maskweights, refine

    spec = JobSpec(mask=MaskSpec(engine="rembg", model=model))
    session = None
    if spinning:  # the session as rembg makes it with no options of ours (bgwatch before: spinning, arena)
        from rembg import new_session

        session = new_session("u2net_custom" if model.endswith(".onnx") else model,
                              providers=["CPUExecutionProvider"],
                              **({"model_path": str(maskweights.rembg_weights_path(model))}
                                 if model.endswith(".onnx") else {}))
    engine = masking.RembgMaskEngine(model, "cpu", session=session, threads=intra)
    todo: queue.Queue[Path | None] = queue.Queue()
    decoded: queue.Queue[object] = queue.Queue(maxsize=4)
    masked: queue.Queue[object] = queue.Queue(maxsize=4)
    for path in paths:
        todo.put(path)

    def lower() -> None:
        if nice:  # this thread only (Linux: a thread id is a process id for setpriority)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)

    def prepare_loop() -> None:
        lower()
        while True:
            try:
                path = todo.get_nowait()
            except queue.Empty:
                return
            if path is None:
                return
            decoded.put(imageio.decode(path, max_pixels=10**8))

    def lane_loop() -> None:
        while (image := decoded.get()) is not None:
            masked.put((image, refine.to_alpha8(engine.predict(image.rgb))))  # type: ignore[attr-defined]

    def finish_loop() -> None:
        lower()
        while (item := masked.get()) is not None:
            image, alpha = item  # type: ignore[misc]
            refined = refine.refine_mask(alpha, post_process=True)
            imageio.encode(cleanup.cleanup(image.rgb, refined, spec), spec.output)

    engine.predict(imageio.decode(paths[0], max_pixels=10**8).rgb)  # warm-up
    start = time.perf_counter()
    groups = [[threading.Thread(target=f) for _ in range(n)]
              for f, n in ((prepare_loop, prepare), (lane_loop, lanes), (finish_loop, finish))]
    for group in groups:
        for t in group:
            t.start()
    for t in groups[0]:
        t.join()
    for _ in groups[1]:
        decoded.put(None)
    for t in groups[1]:
        t.join()
    for _ in groups[2]:
        masked.put(None)
    for t in groups[2]:
        t.join()
    return len(paths) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "u2net"), default="tiny")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--finish", type=int, default=2, help="finish threads")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()

    from bench_cleanup import model_home, sample_images

    work = args.workdir.resolve()
    images = sample_images(work, args.count, 1024)
    home, model = model_home(work, args.model)
    os.environ["U2NET_HOME"] = str(home)
    from loguru import logger

    logger.remove()
    paths = sorted(images.glob("*.jpg"))[: args.count]
    import cv2

    default_cv2_threads = cv2.getNumThreads()
    print(f"\n{len(paths)} images 1024x1024, model {args.model}, {args.finish} finish threads, "
          f"{os.cpu_count()} cores\n")
    for round_ in range(args.rounds):
        shift = round_ % len(LAYOUTS)  # each round starts with another layout: load drifts
        for label, prepare, lanes, intra, spinning, cv2_threads, nice in LAYOUTS[shift:] + LAYOUTS[:shift]:
            cv2.setNumThreads(cv2_threads or default_cv2_threads)
            before = resource.getrusage(resource.RUSAGE_SELF)
            rate = run_layout(paths, model, prepare, lanes, intra, spinning, args.finish, nice)
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / len(paths)
            print(f"round {round_ + 1}  {label:36} {rate:6.2f} images/s  {cpu * 1000:6.0f} CPU ms/image  "
                  f"peak RSS {after.ru_maxrss / 1024:6.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
