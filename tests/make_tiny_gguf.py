"""Generate a tiny random llama-architecture GGUF (SentencePiece-style vocab) for CPU tests.

    python tests/make_tiny_gguf.py OUT.gguf [--embd 64 --layers 2 --ff 128 --ctx 2048]

Random weights: llama-server loads and serves it, and produces junk text (assert structure,
token counts and finish_reason, never the text).
"""

from __future__ import annotations

import argparse

import gguf
import numpy as np

N_HEAD = 4
N_HEAD_KV = 4


def vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, 256 byte-fallback tokens, then word pieces (higher score merges first)."""
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []

    def add(tok: str, score: float, ttype: int) -> None:
        tokens.append(tok)
        scores.append(score)
        types.append(ttype)

    add("<unk>", 0.0, gguf.TokenType.UNKNOWN)
    add("<s>", 0.0, gguf.TokenType.CONTROL)
    add("</s>", 0.0, gguf.TokenType.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, gguf.TokenType.BYTE)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:;'-"
    words = "the a is of and to in hello world user assistant system you I it that this ok yes no"
    pieces = ["\u2581", *chars, *("\u2581" + w for w in words.split())]
    for i, piece in enumerate(pieces):
        add(piece, -float(i), gguf.TokenType.NORMAL)
    return tokens, scores, types


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="tiny.gguf")
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ff", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=2048)
    a = ap.parse_args()
    n_embd, n_layer, n_ff = a.embd, a.layers, a.ff
    rng = np.random.default_rng(0)
    tokens, scores, types = vocab()

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(a.ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // N_HEAD)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")

    def t(*shape: int) -> np.ndarray:  # numpy (rows=out, cols=in); GGUF's ne is reversed
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = np.ones(n_embd, np.float32)
    hd = n_embd // N_HEAD
    w.add_tensor("token_embd.weight", t(len(tokens), n_embd))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", t(len(tokens), n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "attn_q.weight", t(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", t(N_HEAD_KV * hd, n_embd))
        w.add_tensor(p + "attn_v.weight", t(N_HEAD_KV * hd, n_embd))
        w.add_tensor(p + "attn_output.weight", t(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", ones)
        w.add_tensor(p + "ffn_gate.weight", t(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", t(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", t(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out}: vocab={len(tokens)} embd={n_embd} layers={n_layer}")


if __name__ == "__main__":
    main()
