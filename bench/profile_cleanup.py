"""Where the time of one transparent cleanup goes, stage by stage, in one thread (no daemon).

    python bench/profile_cleanup.py [--model tiny|u2net] [--count 10] [--workdir bench/out] [--precisions fp32,int8]

For each image and each mask precision (fp32, and the net's int8 variant, made once when missing): decode,
the mask engine's predict (split into the net's input, the ONNX Runtime run and the guided upsampling),
refine_mask, cleanup and the PNG encode; the median of each
in ms, as wall time and as CPU time of the whole process (ORT's pool threads included; its pool does not
spin, so this is work done, and it moves much less than wall time when others share the machine).
`--sessions`: ORT alone under a few session settings (threads, spinning). Not a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "u2net"), default="tiny")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--sessions", action="store_true", help="also time ORT under other session options")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (default: the cores)")
    parser.add_argument("--precisions", default="fp32,int8", help="mask.precision of each column (fp32, int8)")
    args = parser.parse_args()

    import os

    from bench_cleanup import model_home, sample_images

    work = args.workdir.resolve()
    images = sample_images(work, args.count, 1024)
    home, model = model_home(work, args.model)
    os.environ["U2NET_HOME"] = str(home)

    from bgwatch.jobs import JobSpec, MaskSpec
    from bgwatch.pipeline import cleanup, imageio, masking, maskweights, refine
    from bgwatch.pipeline.onnxnets import mask8

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if "int8" in precisions:
        from bench_cleanup import ensure_int8

        print(ensure_int8(home, model))
    paths = sorted(images.glob("*.jpg"))[: args.count]
    tables: dict[str, dict[str, list[tuple[float, float]]]] = {}
    engine: masking.RembgMaskEngine | None = None
    for precision in precisions:
        spec = JobSpec(mask=MaskSpec(engine="rembg", model=model, precision=precision))
        loaded = masking.load_mask_engine(spec.mask, "cpu", threads=args.threads or None)
        assert isinstance(loaded, masking.RembgMaskEngine) and loaded.precision == precision
        engine = loaded
        rows = tables.setdefault(precision, {})

        def timed(name: str, start: tuple[float, float], rows: dict[str, list[tuple[float, float]]] = rows
                  ) -> tuple[float, float]:
            now = (time.perf_counter(), time.process_time())
            rows.setdefault(name, []).append(((now[0] - start[0]) * 1000, (now[1] - start[1]) * 1000))
            return now

        engine.predict(imageio.decode(paths[0], max_pixels=10**8).rgb)  # warm-up
        for path in paths:
            t = (time.perf_counter(), time.process_time())
            image = imageio.decode(path, max_pixels=10**8)
            t = timed("decode", t)
            alpha = refine.to_alpha8(engine.predict(image.rgb))
            t = timed("mask (predict + to_alpha8)", t)
            pre = engine.preprocess(image.rgb)
            t = timed("  mask: the net's input", t)
            raw = engine.run(pre)
            t = timed("  mask: ONNX Runtime run", t)
            engine.upscale(mask8(raw), image.rgb)
            t = timed("  mask: guided upsampling", t)
            refined = refine.refine_mask(alpha, post_process=True)
            t = timed("refine_mask", t)
            out = cleanup.cleanup(image.rgb, refined, spec)
            t = timed("cleanup (transparent)", t)
            imageio.encode(out, spec.output)
            timed("encode PNG", t)
    assert engine is not None
    print(f"\n{len(paths)} images 1024x1024, model {args.model}, one image at a time, ORT intra-op threads "
          f"{engine.threads}, median ms\n")
    print(f"{'':30}" + "".join(f" {p + ' wall':>11} {p + ' CPU':>10}" for p in precisions))
    totals = {p: [0.0, 0.0] for p in precisions}
    for name in tables[precisions[0]]:
        line = f"{name:30}"
        for precision in precisions:
            values = tables[precision][name]
            wall, cpu = (statistics.median(v[i] for v in values) for i in (0, 1))
            if not name.startswith("  "):
                totals[precision][0] += wall
                totals[precision][1] += cpu
            line += f" {wall:11.1f} {cpu:10.1f}"
        print(line)
    print(f"{'total':30}" + "".join(f" {totals[p][0]:11.1f} {totals[p][1]:10.1f}" for p in precisions))

    if args.sessions:
        import onnxruntime as ort

        feed = engine.preprocess(imageio.decode(paths[0], max_pixels=10**8).rgb)
        path = str(maskweights.rembg_weights_path(model))
        print("\nONNX Runtime alone, median of 5 runs:")
        for intra, spin in ((2, "1"), (2, "0"), (1, "1"), (1, "0")):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = intra
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
            sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            sess.run(None, {name: feed})
            times, cpu = [], []
            for _ in range(5):
                t, c = time.perf_counter(), time.process_time()
                sess.run(None, {name: feed})
                times.append((time.perf_counter() - t) * 1000)
                cpu.append((time.process_time() - c) * 1000)
            print(f"  intra_op {intra}, spinning {spin}: {statistics.median(times):7.1f} ms wall, "
                  f"{statistics.median(cpu):7.1f} ms CPU")
            del sess
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
