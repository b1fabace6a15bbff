#!/usr/bin/env python
"""Load exported Hugging Face directories with transformers and generate greedily from a prompt.

    python scripts/hf_generate.py DIR [DIR ...] [--prompt TEXT] [--tokens N]
"""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--prompt", default="def main(")
    ap.add_argument("--tokens", type=int, default=24)
    a = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for d in a.dirs:
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()
        ids = tok(a.prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=a.tokens, do_sample=False)
        print(f"{d} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params): "
              f"{tok.decode(out[0])!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
