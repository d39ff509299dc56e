"""Build a transformers CLIPTokenizer folder from the BPE file bundled with open_clip.

The vocabulary follows the order of CLIP's own tokenizer, so token ids equal
``open_clip.tokenize`` ids. It lists 256 byte symbols, the same 256 with the word-end
marker ``</w>``, one token per merge (the 48894 lines after the header), then
``<|startoftext|>`` and ``<|endoftext|>``: 49408 tokens in all. Padding repeats
``<|endoftext|>`` as Stable Diffusion 1.x does, so the ids match open_clip's up to the
end token and differ after it, where open_clip pads with 0. A "!" pad token would
match the padding but split every "!" in a prompt off as the pad token.

Run from the repository root: ``PYTHONPATH=. python samples/testbed/build_tokenizer.py``.
"""

import argparse
import gzip
import json
from pathlib import Path

import open_clip
from transformers import CLIPTokenizer

from common import ASSETS

NUM_MERGES = 49152 - 256 - 2
CONTEXT_LENGTH = 32


def byte_symbols():
    """List the 256 printable unicode characters of CLIP's byte-level alphabet, in CLIP's order.

    Bytes that are printable stand for themselves and come first; every other byte b
    becomes chr(256 + n), n counting those bytes in ascending order.
    """
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + n) for n in range(len(others))]


def read_merges():
    """Return the merge pairs of open_clip's bundled BPE file, skipping its header line."""
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]


def build_vocab(merges):
    """Token-to-id map in CLIP's order: bytes, bytes with ``</w>``, merges, start and end tokens."""
    symbols = byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer(folder):
    """Write vocab.json and merges.txt into ``folder`` and load a CLIPTokenizer from them."""
    merges = read_merges()
    vocab = build_vocab(merges)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CONTEXT_LENGTH)


def check_against_open_clip(tokenizer, captions):
    """Raise AssertionError unless ``tokenizer`` gives open_clip.tokenize's ids up to each end token."""
    encoded = tokenizer(captions, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                        return_tensors="pt")
    theirs = open_clip.tokenize(captions, context_length=CONTEXT_LENGTH)
    mask = encoded.attention_mask.bool()
    if not (encoded.input_ids[mask] == theirs[mask]).all() or not (theirs[~mask] == 0).all():
        raise AssertionError(f"tokenizer ids differ from open_clip.tokenize:\n{encoded.input_ids}\n{theirs}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets folder to write into")
    args = parser.parse_args()
    folder = args.out / "digits-sd" / "tokenizer"
    tokenizer = build_tokenizer(folder)
    check_against_open_clip(tokenizer, ["a handwritten digit seven", "the number 7", "A thick, SLANTED 3!", ""])
    tokenizer.save_pretrained(folder)
    # vocab.json and merges.txt define the tokenizer and are the files the transformers 4
    # CLIPTokenizer reads. The 3.6 MB tokenizer.json that transformers 5 adds repeats them.
    (folder / "tokenizer.json").unlink()

if __name__ == "__main__":
    main()
