"""Round 1 (the box) generated one sentence at a time vs in left-padded batches (``eval.batch_size``).

    python bench/eval_batch.py

Random-init tiny Qwen2-VL (speed does not depend on the weights) on 32 sentences of a
synthetic val split (128-px images), every answer forced to 20 tokens, a box's length.
Decoding is sequential, one forward per token, so a batch of B sentences takes about as
many forwards as one sentence, each forward costing more with B; the printed speed-up is
the net of the two on this CPU. On a GPU it was not measured.

A batch's cache is padded and not kept, so a sentence whose box parses has its prefix
encoded again for PQPP's points round (``Sam4MLLM.fill_cache``): that cost is printed too.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from sam4mllm.data.refer import ReferDataset
from sam4mllm.data.synthetic import SyntheticConfig, generate_synthetic
from sam4mllm.dialogs import box_question
from sam4mllm.inference import Sam4MLLM
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
        prefixes = [prefix for _, prefix in answers]
        t = time.perf_counter()
        for prefix in prefixes:
            m.fill_cache(prefix)
        per = (time.perf_counter() - t) / len(prefixes)
        print(f"  a batched answer's prefix encoded again for the points round: {1000 * per:.1f} ms per sentence "
              f"(batch 1: {1000 / base:.1f} ms per sentence for round 1)")


if __name__ == "__main__":
    main()
