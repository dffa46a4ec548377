#!/usr/bin/env python3
"""Cross-check tests/fixtures/tokenizer/cases.json against transformers 4.x.

transformers 5 (the pinned reference env) no longer has the slow python
CLIPTokenizer, so make_tokenizer.py re-implements it. This script, run in a
*separate* throw-away venv with transformers<5, checks that re-implementation
and the other id sets against the real thing:

    python3 -m venv /tmp/tf4 && /tmp/tf4/bin/pip install "transformers<5" ftfy==6.3.1 regex
    /tmp/tf4/bin/python scripts/check_tokenizer_tf4.py

Needs no network besides pip; vocab.json/merges.txt are rebuilt from the
tokenizer.json asset.
"""

import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    import transformers
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    assert transformers.__version__.startswith("4."), transformers.__version__
    tj = json.load(open(os.path.join(ROOT, "assets/tokenizer/clip-vit-large-patch14/tokenizer.json"), encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    cases = json.load(open(os.path.join(ROOT, "crates/engine/tests/fixtures/tokenizer/cases.json"), encoding="utf-8"))["cases"]

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        v, m = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
        slow = CLIPTokenizer(v, m)
        slow_bang = CLIPTokenizer(v, m, pad_token="!")
        fast = CLIPTokenizerFast(v, m)
        fast_bang = CLIPTokenizerFast(v, m, pad_token="!")
        assert slow.fix_text is not None, "ftfy not installed in this venv"

        bad = 0
        for c in cases:
            t = c["text"]
            checks = [
                ("slow == ids_slow", slow(t).input_ids, c["ids_slow"]),
                ("fast4 == ids", fast(t).input_ids, c["ids"]),
                ("fast4(pad !) == ids_bang", fast_bang(t).input_ids, c["ids_bang"]),
                (
                    "fast4 77 == ids_77_eos",
                    fast(t, padding="max_length", max_length=77, truncation=True).input_ids,
                    c["ids_77_eos"],
                ),
                (
                    "fast4(pad !) 77 == ids_77_pad0",
                    fast_bang(t, padding="max_length", max_length=77, truncation=True).input_ids,
                    c["ids_77_pad0"],
                ),
            ]
            if c["slow_matches"]:  # ftfy leaves the text alone: slow(pad !) must equal ids_bang
                checks.append(("slow(pad !) == ids_bang", slow_bang(t).input_ids, c["ids_bang"]))
            for name, got, want in checks:
                if got != want:
                    bad += 1
                    print(f"MISMATCH {name} for {t[:50]!r}:\n  got  {got}\n  want {want}")
        print(f"transformers {transformers.__version__}: {len(cases)} cases, {bad} mismatches")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
