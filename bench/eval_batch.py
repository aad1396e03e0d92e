"""Round 1 (the box) generated one sentence at a time vs in left-padded batches (``eval.batch_size``).

    python bench/eval_batch.py

Random-init tiny Qwen2-VL (speed does not depend on the weights) on 32 sentences of a
synthetic val split (128-px images), every answer forced to 20 tokens, a box's length.
Decoding is sequential, one forward per token, so a batch of B sentences takes about as
many forwards as one sentence, each forward costing more with B; the printed speed-up is
the net of the two on this CPU. On a GPU it was not measured.

PQPP's points round reads each answer's prefix cache: a batch gives each sentence its row of
the batch's cache (padding cut off). Printed against encoding each prefix again
(``Sam4MLLM.fill_cache``, what a batched PQPP round 1 did before 2026-12-07), with the
largest difference between the two caches.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from sam4mllm.data.refer import ReferDataset
from sam4mllm.data.synthetic import SyntheticConfig, generate_synthetic
from sam4mllm.dialogs import box_question
from sam4mllm.inference import PQPPConfig, Sam4MLLM
from sam4mllm.models import build_adapter
from sam4mllm.sam.grabcut import GrabCutSegmenter

N_SENTENCES, ANSWER_TOKENS = 32, 20


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        root = tmp / "synthetic"
        generate_synthetic(root, SyntheticConfig(width=128, height=128, images={"val": 8}, reason_images={}))
        ds = ReferDataset(root / "refer_seg", "refcoco", "val", root / "coco/train2014")
        samples = [ds[i] for i in range(min(N_SENTENCES, len(ds)))]
        adapter = build_adapter("qwen2vl", str(tmp / "tiny"), tiny={"image_pixels": 128 * 128})
        m = Sam4MLLM(adapter, GrabCutSegmenter(), max_new_tokens=ANSWER_TOKENS, min_new_tokens=ANSWER_TOKENS)
        questions = [box_question(s.expression, s.task) for s in samples]
        images = [s.image for s in samples]
        m.generate_many(questions[:4], images[:4])  # warm-up
        print(f"{len(samples)} sentences of {len({s.image_id for s in samples})} images, "
              f"{ANSWER_TOKENS}-token answers, tiny Qwen2-VL on the CPU")
        reference, base = None, None
        for b in (1, 4, 8, 16, 32):
            t = time.perf_counter()
            answers = []
            for k in range(0, len(questions), b):
                answers += m.generate_many(questions[k:k + b], images[k:k + b])
            rate = len(questions) / (time.perf_counter() - t)
            texts = [text for text, _ in answers]
            reference, base = reference or texts, base or rate
            print(f"  batch {b:2d}: {rate:6.1f} sentences/s ({rate / base:4.1f}x batch 1), "
                  f"same answers as batch 1: {texts == reference}")
        t = time.perf_counter()
        rows = [prefix for _, prefix in m.generate_many(questions, images, keep_cache=True)]
        kept = (time.perf_counter() - t) / len(rows)
        # Before: each prefix's model inputs made again (the image processed), then its cache encoded.
        m.pqpp = PQPPConfig(fast=False)  # the reference scoring needs the inputs, so they are made again
        t = time.perf_counter()
        again = [prefix for _, prefix in m.generate_many(questions, images, keep_cache=True)]
        for prefix in again:
            prefix.cache = None
            m.fill_cache(prefix)
        before = (time.perf_counter() - t) / len(rows)
        diff = max((a.keys[..., :b.keys.shape[-2], :] - b.keys).abs().max().item()
                   for row, prefix in zip(rows, again, strict=True)
                   for a, b in zip(prefix.cache.layers, row.cache.layers, strict=True))
        print(f"  batch 32, PQPP's round 1 with each answer's prefix cache: its row of the batch's cache "
              f"{1000 * kept:.1f} ms per sentence, encoding the prefix again {1000 * before:.1f} ms "
              f"({before / kept:.1f}x); largest key difference {diff:.1e}")


if __name__ == "__main__":
    main()
