"""oneDNN vs PyTorch's default (MKL) CPU matrix products at the demo model's shapes.

    python -m benchmarks.cpu_linear            # the products alone, about 30 s
    python -m benchmarks.cpu_linear --eval     # also the demo's base evaluation both ways (about 2 min; needs
                                               # the embedded model) and whether every reply is the same

Rows are the number of token rows per product: 1 and 8 are decoding steps (one or eight sequences),
48 the demo's evaluation batch, 512 a training micro-batch. The two kernels alternate (ABAB...) and
medians are reported, so load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from openrlhf_safesteer.cpu_kernels import onednn_available, onednn_linear

# (out, in) of Qwen2.5-0.5B's projections: q/o, k/v, gate/up, down, the LM head
SHAPES = {"q_proj": (896, 896), "k_proj": (128, 896), "gate_proj": (4864, 896), "down_proj": (896, 4864),
          "lm_head": (151936, 896)}


def paired_ms(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    for _ in range(3):
        fn_a(), fn_b()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, a), (fn_b, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def matmul_rows(rows: list[int]) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(0)
    for name, (n_out, n_in) in SHAPES.items():
        weight = torch.randn(n_out, n_in, generator=g) * 0.02
        for m in rows:
            x = torch.randn(m, n_in, generator=g)
            repeats = 10 if name == "lm_head" else 50
            with torch.no_grad():
                def mkl(x=x, weight=weight):
                    F.linear(x, weight)

                def fast(x=x, weight=weight):   # the op itself: onednn_linear keeps small matrices on MKL
                    torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")

                stock, onednn = paired_ms(mkl, fast, repeats)
            out.append({"matrix": name, "rows": m, "mkl_ms": round(stock, 3), "onednn_ms": round(onednn, 3),
                        "speedup": round(stock / onednn, 2)})
    return out


def eval_both() -> dict:
    from openrlhf_safesteer.demo.evaluate import EvalSets, evaluate
    from openrlhf_safesteer.loading import load_model

    model, tokenizer = load_model()
    sets = EvalSets.default()
    results = {}
    for use in (False, True, False, True):       # alternate; keep the second of each
        with onednn_linear(use):
            results[use] = evaluate(model, tokenizer, sets, refusal_tokens=12, progress=False)
    same = sum(a["reply"] == b["reply"] for kind in ("harmful", "harmless", "general")
               for a, b in zip(results[False]["samples"][kind], results[True]["samples"][kind]))
    total = sum(len(results[False]["samples"][k]) for k in ("harmful", "harmless", "general"))
    return {"mkl_s": round(results[False]["seconds"], 1), "onednn_s": round(results[True]["seconds"], 1),
            "same_replies": f"{same}/{total}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 48, 512])
    parser.add_argument("--eval", action="store_true", help="also time the demo's base evaluation both ways")
    args = parser.parse_args(argv)
    if not onednn_available():
        print("this PyTorch build has no oneDNN linear op")
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| matrix | rows | MKL ms | oneDNN ms | speed-up |\n|---|---|---|---|---|")
    for r in matmul_rows(args.rows):
        print(f"| {r['matrix']} {SHAPES[r['matrix']]} | {r['rows']} | {r['mkl_ms']} | {r['onednn_ms']} | "
              f"{r['speedup']}x |")
    if args.eval:
        print("\ndemo base evaluation (24 harmful + 24 harmless + 100 general):", eval_both())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
