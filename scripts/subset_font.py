#!/usr/bin/env python3
"""Makes the bundled CJK font: a subset of Noto Sans CJK JP for the GUI's Japanese text.

Writes assets/fonts/NotoSansCJKjp-Regular-subset.otf (CFF outlines, no hinting, no vertical
metrics, GPOS `kern` only) from the Japanese face (index 0) of Debian's NotoSansCJK-Regular.ttc.
It keeps:
  - Basic Latin, Latin-1, General Punctuation (U+2000-206F);
  - all of CJK Symbols and Punctuation (U+3000-303F), Hiragana (U+3040-309F), Katakana
    (U+30A0-30FF) and Halfwidth/Fullwidth Forms (U+FF00-FFEF);
  - the 2,136 Joyo kanji (kJoyoKanji = 2010 in Unihan, plus the 4 traditional forms Unihan
    maps onto them), read from the unicode-data package;
  - every other non-ASCII character in the repository's text: the files under
    assets/knowledge and assets/world, the vocabulary of assets/world/tokenizer.json
    (byte-level BPE: each token mapped back to bytes and decoded as UTF-8, partial sequences
    dropped) and src/**/*.rs (the corpus templates and GUI strings live there).
Then reloads the result, checks a few sample strings and every requested character the source
font has, and prints the glyph count and size. Exits non-zero if a check fails.

Needs: pip install fonttools
       apt-get install fonts-noto-cjk unicode-data   (Debian/Ubuntu)
Usage: python3 scripts/subset_font.py [FONT] [--font-number N] [--output PATH]
                                      [--unihan PATH] [--no-joyo]
"""

import argparse
import bz2
import json
import sys
import unicodedata
from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTFont

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FONT = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"
DEFAULT_OUTPUT = REPO / "assets/fonts/NotoSansCJKjp-Regular-subset.otf"
DEFAULT_UNIHAN = "/usr/share/unicode/Unihan_OtherMappings.txt.bz2"

RANGES = [
    (0x0020, 0x007E),  # Basic Latin
    (0x00A0, 0x00FF),  # Latin-1 Supplement
    (0x2000, 0x206F),  # General Punctuation
    (0x3000, 0x303F),  # CJK Symbols and Punctuation
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0xFF00, 0xFFEF),  # Halfwidth and Fullwidth Forms
]

SAMPLES = ["東京", "横浜", "日本の首都は", "ソウル", "アルジェリア", "ｶﾀｶﾅ", "。、「」", "Tokyo"]


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tokenizer_chars(path):
    tok = json.loads(path.read_text(encoding="utf-8"))
    byte_of = bytes_to_unicode()
    tokens = list(tok["model"]["vocab"]) + [t["content"] for t in tok.get("added_tokens", [])]
    chars = set()
    for token in tokens:
        if all(c in byte_of for c in token):
            # errors="ignore" drops the partial sequences at the token's ends.
            chars |= set(bytes(byte_of[c] for c in token).decode("utf-8", errors="ignore"))
        else:
            chars |= set(token)  # an added token stored as plain text
    return chars


def text_chars(path):
    data = path.read_bytes()
    if b"\0" in data:
        return set()
    try:
        return set(data.decode("utf-8"))
    except UnicodeDecodeError:
        return set()


def asset_chars():
    """Non-ASCII characters of the repository's text, and where they came from (for the log)."""
    chars, counts = set(), {}
    tokenizer = REPO / "assets/world/tokenizer.json"
    files = sorted(
        p
        for d in ("assets/knowledge", "assets/world")
        for p in (REPO / d).rglob("*")
        if p.is_file() and p.suffix != ".safetensors" and p != tokenizer
    )
    files += sorted((REPO / "src").rglob("*.rs"))
    for p in files:
        found = {c for c in text_chars(p) if ord(c) > 0x7F}
        chars |= found
        rel = p.relative_to(REPO)
        key = "src/**/*.rs" if rel.parts[0] == "src" else str(rel)
        counts.setdefault(key, set()).update(found)
    if tokenizer.exists():
        found = {c for c in tokenizer_chars(tokenizer) if ord(c) > 0x7F}
        chars |= found
        counts[str(tokenizer.relative_to(REPO)) + " (decoded vocab)"] = found
    return chars, {k: len(v) for k, v in counts.items()}


def joyo_kanji(unihan):
    path = Path(unihan)
    opener = bz2.open if path.suffix == ".bz2" else open
    kanji = set()
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("U+") and "\tkJoyoKanji\t" in line:
                code, _, value = line.rstrip("\n").split("\t")
                kanji.add(chr(int(code[2:], 16)))
                if value.startswith("U+"):
                    kanji.add(chr(int(value[2:], 16)))
    return kanji


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("font", nargs="?", default=DEFAULT_FONT, help=f"source font (default {DEFAULT_FONT})")
    ap.add_argument("--font-number", type=int, default=0, help="face in a .ttc (default 0: Noto Sans CJK JP)")
    ap.add_argument("--output", default=str(DEFAULT_OUTPUT), help="output font path")
    ap.add_argument("--unihan", default=DEFAULT_UNIHAN, help="Unihan_OtherMappings.txt[.bz2] for the Joyo list")
    ap.add_argument("--no-joyo", action="store_true", help="leave the Joyo kanji out")
    args = ap.parse_args()

    wanted = {chr(c) for lo, hi in RANGES for c in range(lo, hi + 1)}
    extra, counts = asset_chars()
    for source, n in counts.items():
        print(f"{source}: {n} non-ASCII characters")
    wanted |= extra
    if not args.no_joyo:
        joyo = joyo_kanji(args.unihan)
        print(f"Joyo kanji (from {args.unihan}): {len(joyo)}")
        if len(joyo) < 2136:
            sys.exit(f"expected at least 2136 Joyo kanji in {args.unihan}")
        wanted |= joyo
    wanted |= set("".join(SAMPLES))

    font = TTFont(args.font, fontNumber=args.font_number, lazy=False, recalcTimestamp=False)
    source_cmap = font.getBestCmap()
    unicodes = sorted(ord(c) for c in wanted)
    missing = [u for u in unicodes if u not in source_cmap]
    print(f"requested {len(unicodes)} code points; {len(missing)} not in the source font", end="")
    print(f" (assigned: {''.join(chr(u) for u in missing if unicodedata.category(chr(u)) != 'Cn')})")

    opts = subset.Options()
    opts.hinting = False
    opts.layout_features = ["kern"]
    opts.drop_tables += ["vhea", "vmtx", "VORG", "BASE"]
    opts.name_IDs = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14]
    opts.notdef_outline = True
    opts.glyph_names = False
    opts.recalc_timestamp = False  # same input -> same bytes
    sub = subset.Subsetter(opts)
    sub.populate(unicodes=unicodes)
    sub.subset(font)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    font.save(str(out))

    # Check the result.
    check = TTFont(str(out))
    cmap = check.getBestCmap()
    ok = True
    for s in SAMPLES:
        absent = [c for c in s if ord(c) not in cmap]
        print(f"check {s!r}: {'ok' if not absent else 'MISSING ' + ''.join(absent)}")
        ok &= not absent
    lost = [u for u in unicodes if u in source_cmap and u not in cmap]
    if lost:
        print(f"{len(lost)} requested characters the source has are missing from the subset")
        ok = False
    print(f"{out}: {check['maxp'].numGlyphs} glyphs, {len(cmap)} code points, {out.stat().st_size} bytes")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
