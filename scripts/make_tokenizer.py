#!/usr/bin/env python3
"""Build the CLIP BPE tokenizer asset and the tokenizer test cases, offline.

Outputs (paths relative to the repository root):
  assets/tokenizer/clip-vit-large-patch14/tokenizer.json
  tests/fixtures/tokenizer/cases.json

The vocabulary and merges are the OpenAI CLIP BPE ("bpe_simple_vocab_16e6")
shipped inside open-clip-torch. They are turned into a 49408-entry vocabulary
exactly as OpenAI CLIP / transformers do it:

  256 byte symbols, the same 256 symbols + "</w>", 48894 merged symbols,
  "<|startoftext|>" = 49406, "<|endoftext|>" = 49407

and into a HF `tokenizers` pipeline identical to the one transformers builds
for `CLIPTokenizer` (transformers 5.x) / `CLIPTokenizerFast` (4.x), i.e. the
pipeline of openai/clip-vit-large-patch14's tokenizer.json.

Reference ids in cases.json (all with BOS/EOS):
  ids          transformers 5.x `CLIPTokenizer` with pad_token "<|endoftext|>"
               (SD 1.x, SDXL `tokenizer`); the script checks that tokenizer.json,
               loaded with `tokenizers.Tokenizer.from_file` like the Rust crate
               loads it, reproduces them exactly.
  ids_77_eos   truncation=True, max_length=77, padding="max_length" (pad 49407)
  ids_bang     the tokenizer with pad_token "!" (SD 2.x, SDXL `tokenizer_2`).
               transformers (4.34+ and 5.x) registers "!" as a special added
               token, so every "!" in a prompt is split off before BPE and
               becomes id 0 ("!!!" -> 0 0 0 instead of 995). tokenizer.json +
               add_special_tokens(["!"]) (normalized=False) reproduces it.
  ids_77_pad0  ids_bang truncated to 77 and padded with 0
  ids_slow     historical *slow* transformers 4.x `CLIPTokenizer` with ftfy
               (ftfy is a hard dependency of open-clip-torch). transformers 5
               has no slow CLIP tokenizer, so it is re-implemented here and
               verified against transformers 4.57 by
               scripts/check_tokenizer_tf4.py. It differs from `ids` only
               where ftfy rewrites the text (curly quotes, full-width forms,
               ligatures, HTML entities, control characters, mojibake).
  ids_slow_noftfy  the same slow tokenizer without ftfy (BasicTokenizer path:
               spaces around CJK ideographs, Unicode Zs/control handling).
"""

import argparse
import gzip
import json
import os
import sys
import unicodedata
from functools import lru_cache

import regex as re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
SPECIAL_PAT = r"<\|startoftext\|>|<\|endoftext\|>|"
CLIP_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# --------------------------------------------------------------------------
# vocabulary / merges
# --------------------------------------------------------------------------
@lru_cache
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_clip_bpe():
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    assert all(len(m) == 2 for m in merges)
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(vocab) == len(encoder) == 49408, len(vocab)
    assert encoder[BOS] == BOS_ID and encoder[EOS] == EOS_ID and encoder["!"] == 0
    return encoder, merges


# --------------------------------------------------------------------------
# fast tokenizer (tokenizers library) == transformers CLIPTokenizer(Fast)
# --------------------------------------------------------------------------
def special_token(content):
    from tokenizers import AddedToken

    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def build_fast(encoder, merges):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(
        BPE(
            vocab=encoder,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPECIAL_PAT + CLIP_PAT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # same flags as transformers 5 CLIPTokenizer (normalized=False)
    tok.add_special_tokens([special_token(BOS), special_token(EOS)])
    tok.post_processor = processors.RobertaProcessing(
        (EOS, EOS_ID), (BOS, BOS_ID), trim_offsets=False, add_prefix_space=False
    )
    assert tok.get_vocab_size() == 49408
    return tok


# --------------------------------------------------------------------------
# slow tokenizer (transformers 4.x CLIPTokenizer semantics), own implementation
# --------------------------------------------------------------------------
def _is_whitespace(ch):
    if ch in (" ", "\t", "\n", "\r"):
        return True
    return unicodedata.category(ch) == "Zs"


def _is_control(ch):
    if ch in ("\t", "\n", "\r"):
        return False
    return unicodedata.category(ch).startswith("C")


def _is_cjk(cp):
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def basic_clean_noftfy(text):
    """transformers BasicTokenizer(strip_accents=False, do_split_on_punc=False)."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        out.append(" " if _is_whitespace(ch) else ch)
    text = "".join(out)
    text = "".join(f" {ch} " if _is_cjk(ord(ch)) else ch for ch in text)
    text = unicodedata.normalize("NFC", text)
    return " ".join(t.lower() for t in text.strip().split())


class SlowCLIP:
    def __init__(self, encoder, merges, use_ftfy=True):
        self.encoder = encoder
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.cache = {BOS: BOS, EOS: EOS}
        self.pat = re.compile(SPECIAL_PAT + CLIP_PAT, re.IGNORECASE)
        if use_ftfy:
            import ftfy

            self.clean = lambda t: re.sub(r"\s+", " ", ftfy.fix_text(t)).strip().lower()
        else:
            self.clean = basic_clean_noftfy

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            a, b = best
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    new.append(a + b)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        self.cache[token] = word
        return word

    def _tokenize(self, text):
        ids = []
        for piece in self.pat.findall(self.clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece))
        return ids

    def encode(self, text):
        """BOS + tokens + EOS, not truncated, not padded.

        Like PreTrainedTokenizer.tokenize, literal special tokens are split off
        (case-sensitively) before the clean-up/regex step.
        """
        ids = []
        for part in re.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text):
            if part == BOS:
                ids.append(BOS_ID)
            elif part == EOS:
                ids.append(EOS_ID)
            elif part:
                ids.extend(self._tokenize(part))
        return [BOS_ID] + ids + [EOS_ID]


def to_77(ids, pad_id):
    """transformers: truncation=True, max_length=77, padding='max_length'."""
    body = ids[1:-1][:75]
    out = [BOS_ID] + body + [EOS_ID]
    return out + [pad_id] * (77 - len(out))


# --------------------------------------------------------------------------
# test prompts
# --------------------------------------------------------------------------
LONG_77 = (
    "a highly detailed digital painting of a majestic lion standing on a rocky cliff at sunset, "
    "golden light, dramatic clouds, volumetric lighting, intricate fur texture, sharp focus, "
    "trending on artstation, by greg rutkowski and alphonse mucha, concept art, matte painting, "
    "octane render, unreal engine, 8k resolution, cinematic composition, wind in the mane, dust particles, rim light, award winning photograph, masterpiece"
)
LONG_200 = ", ".join(
    [
        "masterpiece",
        "best quality",
        "ultra detailed",
        "(photorealistic:1.4)",
        "a cozy wooden cabin in a snowy pine forest at night",
        "warm light glowing from the windows",
        "aurora borealis in the sky",
        "stars",
        "smoke rising from the chimney",
        "footprints in the snow leading to the door",
        "a red sled leaning against the porch",
        "lanterns hanging from the eaves",
        "icicles",
        "frozen lake in the foreground reflecting the lights",
        "mountains in the distance",
        "wide angle lens",
        "long exposure",
        "award winning photograph",
        "national geographic",
        "hdr",
        "8k uhd",
        "dslr",
        "soft lighting",
        "high quality",
        "film grain",
        "fujifilm xt3",
        "depth of field",
        "bokeh",
        "rule of thirds",
        "golden ratio",
        "symmetrical composition",
        "crisp details",
        "vivid colors",
        "muted shadows",
        "subtle vignette",
        "cinematic color grading",
        "highly intricate",
        "sharp focus",
        "trending on artstation",
        "featured on 500px",
        "atmospheric perspective",
        "volumetric fog between the trees",
        "a family of deer watching from the treeline",
        "an owl perched on a branch",
        "snowflakes gently falling",
        "moonlight",
    ]
)

CASES = [
    "",
    "a photo of a cat",
    "A PHOTO OF A CAT ON A Skateboard",
    "wow!!! what?! ... really??? ---> ok.",
    "hello world! amazing!!! (a cat)!, best!quality",
    "pi is 3.14, e is 2.71828 and there are 1,000 cats (or 1000000?)",
    "don't do it, I'm sure you'll see they've done what we'd do; it's John's",
    "DON'T SHOUT, I'M HERE, IT'S FINE",
    "café naïve résumé Ångström jalapeño",
    "cafe\u0301 (decomposed accent)",
    "猫が好き 猫猫 日本語のテキスト",
    "🐱👍🏽 emoji cat 😀 ❤️ 🇫🇷",
    "multiple   spaces\tand\ttabs\nand\n\nnewlines\r\nend",
    "   leading and trailing whitespace   ",
    "<b>bold</b> and <i>italic</i> <a href=\"x.html\">link</a>",
    "rock &amp; roll &lt;3 &quot;quoted&quot;",
    "(masterpiece:1.2), [bad], {better}, ((best quality)), (worst quality:0.8)",
    "it’s a “quoted” ‘text’ — with an en–dash…",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "ﬁne ﬂower ligatures",
    "hyphen-ated under_score slash/path back\\slash email@example.com https://example.com/a?b=c#d",
    "8k, 4k uhd, 1girl, 2boys, 1920x1080, 50mm f/1.8, 35%",
    "Ελληνικά και русский текст",
    "zero\u200bwidth space and non\u00a0breaking space",
    "a <|endoftext|> literal special token<|startoftext|>inside",
    "dog's cats' DOG'S o'clock rock'n'roll",
    " ".join(["cat"] * 75),  # exactly 77 ids with BOS/EOS: no truncation, no padding
    " ".join(["cat"] * 76),  # 78 ids: the last word is truncated away
    LONG_77,
    LONG_200,
]


def with_bang_pad(tok):
    """What loading a tokenizer whose pad_token is "!" (SD 2.x, SDXL tokenizer_2) does in
    transformers (4.34+ and 5.x): "!" becomes a *special added token*, so every "!" in the
    prompt is split off before BPE and encoded as id 0 ("!!!" -> 0 0 0 instead of 995)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok.to_str())
    tok.add_special_tokens([special_token("!")])
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=ROOT, help="repository root (default: this checkout)")
    args = ap.parse_args()

    encoder, merges = load_clip_bpe()
    built = build_fast(encoder, merges)

    # transformers 5 CLIPTokenizer (what diffusers uses in the pinned env)
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer(vocab=encoder, merges=list(merges))
    assert len(hf.get_vocab()) == 49408, len(hf.get_vocab())
    assert hf.bos_token_id == BOS_ID and hf.eos_token_id == EOS_ID and hf.pad_token_id == EOS_ID
    hf0 = CLIPTokenizer(vocab=encoder, merges=list(merges), pad_token="!")
    assert hf0.pad_token_id == 0
    # our pipeline must be the very same pipeline transformers builds
    assert json.loads(built.to_str()) == json.loads(hf.backend_tokenizer.to_str()), "pipeline differs from transformers"

    out_dir = os.path.join(args.root, "assets/tokenizer/clip-vit-large-patch14")
    os.makedirs(out_dir, exist_ok=True)
    tok_path = os.path.join(out_dir, "tokenizer.json")
    built.save(tok_path, pretty=False)

    # reload exactly as the Rust crate will
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(tok_path)
    assert fast.get_vocab_size() == 49408
    assert fast.token_to_id(BOS) == BOS_ID and fast.token_to_id(EOS) == EOS_ID and fast.token_to_id("!") == 0
    fast_bang = with_bang_pad(fast)

    slow = SlowCLIP(encoder, merges, use_ftfy=True)
    slow_noftfy = SlowCLIP(encoder, merges, use_ftfy=False)

    # sanity: the well-known SD prompt ids
    assert hf("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]

    cases, problems = [], []
    for text in CASES:
        ids = hf(text).input_ids
        ids_bang = hf0(text).input_ids
        if fast.encode(text).ids != ids:
            problems.append(f"tokenizer.json != transformers CLIPTokenizer for {text!r}")
        if fast_bang.encode(text).ids != ids_bang:
            problems.append(f"tokenizer.json + '!' special != transformers CLIPTokenizer(pad='!') for {text!r}")
        e77 = hf(text, padding="max_length", max_length=77, truncation=True).input_ids
        p77 = hf0(text, padding="max_length", max_length=77, truncation=True).input_ids
        if e77 != to_77(ids, EOS_ID) or p77 != to_77(ids_bang, 0):
            problems.append(f"truncate/pad mismatch for {text!r}")
        s = slow.encode(text)
        sn = slow_noftfy.encode(text)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_77_eos": e77,
                "ids_bang": ids_bang,
                "ids_77_pad0": p77,
                "ids_slow": s,
                "slow_matches": s == ids,
                "ids_slow_noftfy": sn,
                "slow_noftfy_matches": sn == ids,
            }
        )

    case_dir = os.path.join(args.root, "crates/engine/tests/fixtures/tokenizer")
    os.makedirs(case_dir, exist_ok=True)
    meta = {
        "description": (
            "CLIP tokenizer reference ids (scripts/make_tokenizer.py). All id lists include BOS/EOS. "
            "ids: transformers 5 CLIPTokenizer with pad_token <|endoftext|> (SD1.x, SDXL tokenizer) == "
            "assets tokenizer.json, not truncated/padded. ids_77_eos: truncation=True, max_length=77 "
            "(BOS + first 75 tokens + EOS) padded with 49407. ids_bang: tokenizer with pad_token '!' "
            "(SD2.x, SDXL tokenizer_2): '!' is a special added token (normalized=false) so each '!' is "
            "split off and encoded as id 0; == tokenizer.json + add_special_tokens('!'). ids_77_pad0: "
            "ids_bang truncated to 77 and padded with 0. ids_slow / ids_slow_noftfy: historical slow "
            "transformers 4.x CLIPTokenizer (pad <|endoftext|>) with / without ftfy, informational."
        ),
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "max_length": 77,
        "cases": cases,
    }
    with open(os.path.join(case_dir, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
        f.write("\n")

    n_bang = sum(c["ids"] != c["ids_bang"] for c in cases)
    print(f"tokenizer.json: {os.path.getsize(tok_path)} bytes, vocab 49408, {len(merges)} merges")
    print(f"{len(cases)} cases; tokenizer.json reproduces transformers CLIPTokenizer (pad EOS and pad '!'): {not problems}")
    print(f"pad '!' changes the ids of {n_bang} cases")
    print(f"slow (ftfy) differs on {sum(not c['slow_matches'] for c in cases)} cases, "
          f"slow (no ftfy) on {sum(not c['slow_noftfy_matches'] for c in cases)}:")
    for c in cases:
        if not c["slow_matches"] or not c["slow_noftfy_matches"]:
            print(f"  {c['text'][:60]!r}: slow==ids {c['slow_matches']}, slow_noftfy==ids {c['slow_noftfy_matches']}")
    if problems:
        print("\n".join(problems))
        sys.exit(1)


if __name__ == "__main__":
    main()
