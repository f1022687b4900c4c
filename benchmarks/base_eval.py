"""Does the demo's base evaluation slow down after a model conversion, or on its first call in a process?

    python -m benchmarks.base_eval                        # evaluate 3 times in one process (about 3 min)
    python -m benchmarks.base_eval --limit 10 --fresh-conversion   # convert the embedded model into an empty
                                                          # cache first, as a new user's first demo does (~2 min)

The check behind docs/demo.md's "base-evaluation anomaly": prints the CPU threads before and after loading, the
seconds of each evaluation of the same model and sets, and of one more after reloading the model from disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each evaluation set")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fresh-conversion", action="store_true",
                        help="convert the embedded model into a temporary cache first (deleted afterwards)")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="safesteer-cache-") if args.fresh_conversion else None
    if cache:
        os.environ["SAFESTEER_CACHE"] = cache
    try:
        import torch

        from openrlhf_safesteer.cpu_kernels import onednn_linear
        from openrlhf_safesteer.demo.evaluate import EvalSets, evaluate
        from openrlhf_safesteer.loading import load_model

        sets = EvalSets.default(args.limit)
        print(f"threads before loading: {torch.get_num_threads()}", flush=True)
        start = time.time()
        model, tokenizer = load_model()
        print(f"{'convert and ' if cache else ''}load: {time.time() - start:.1f} s; "
              f"threads after: {torch.get_num_threads()}", flush=True)
        with onednn_linear(True):
            for i in range(args.repeats):
                start = time.time()
                evaluate(model, tokenizer, sets, 12, progress=False)
                print(f"evaluation {i + 1}: {time.time() - start:.1f} s", flush=True)
            model, tokenizer = load_model()
            start = time.time()
            evaluate(model, tokenizer, sets, 12, progress=False)
            print(f"after reloading the model: {time.time() - start:.1f} s", flush=True)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
